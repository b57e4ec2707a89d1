"""Cryptographic primitives of the edge: Standard Webhooks signatures, sealing and keyed hashes.

Standard Webhooks 1.0: the signed content is ``<webhook-id>.<webhook-timestamp>.<body>``;
``v1`` is HMAC-SHA256 with the decoded ``whsec_`` secret, ``v1a`` is Ed25519 with a ``whpk_`` key.
Everything here works on bytes and is free of Django models so the signer used by demo traffic,
benchmarks and outbound delivery is the very code the verifier trusts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence
from functools import lru_cache

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

HMAC_PREFIX = "whsec_"
PUBLIC_KEY_PREFIX = "whpk_"
PRIVATE_KEY_PREFIX = "whsk_"
API_TOKEN_PREFIX = "chtok_"  # noqa: S105 (a prefix, not a secret)


class MalformedKey(ValueError):
    """A secret or key string that is not of the documented form."""


# --- Keys -------------------------------------------------------------------------------------------


def new_hmac_secret() -> str:
    return HMAC_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def hmac_secret_bytes(secret: str) -> bytes:
    if not secret.startswith(HMAC_PREFIX):
        raise MalformedKey("An HMAC secret starts with whsec_.")
    try:
        raw = base64.b64decode(secret[len(HMAC_PREFIX) :], validate=True)
    except binascii.Error as exc:
        raise MalformedKey("The part after whsec_ is not base64.") from exc
    if not 24 <= len(raw) <= 64:
        raise MalformedKey("An HMAC secret decodes to 24 to 64 bytes.")
    return raw


def public_key_bytes(public_key: str) -> bytes:
    """Decode ``whpk_<base64 of 32 bytes>``, raising :class:`MalformedKey` on anything else."""
    if not public_key.startswith(PUBLIC_KEY_PREFIX):
        raise MalformedKey("An Ed25519 public key starts with whpk_.")
    try:
        raw = base64.b64decode(public_key[len(PUBLIC_KEY_PREFIX) :], validate=True)
    except binascii.Error as exc:
        raise MalformedKey("The part after whpk_ is not base64.") from exc
    if len(raw) != 32:
        raise MalformedKey("An Ed25519 public key is 32 bytes.")
    return raw


def format_public_key(raw: bytes) -> str:
    return PUBLIC_KEY_PREFIX + base64.b64encode(raw).decode()


def new_ed25519_keypair() -> tuple[str, str]:
    """Return ``(whsk_..., whpk_...)``: a private key (raw 32 bytes) and its public key."""
    private = Ed25519PrivateKey.generate()
    raw_private = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    raw_public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return PRIVATE_KEY_PREFIX + base64.b64encode(raw_private).decode(), format_public_key(raw_public)


def private_key_from_string(private_key: str) -> Ed25519PrivateKey:
    if not private_key.startswith(PRIVATE_KEY_PREFIX):
        raise MalformedKey("An Ed25519 private key starts with whsk_.")
    return Ed25519PrivateKey.from_private_bytes(base64.b64decode(private_key[len(PRIVATE_KEY_PREFIX) :]))


@lru_cache(maxsize=1024)
def load_public_key(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def new_api_token() -> str:
    return API_TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --- Standard Webhooks signatures ------------------------------------------------------------------


def signed_content(msg_id: str, timestamp: str | int, body: bytes) -> bytes:
    return b"%s.%s.%s" % (msg_id.encode(), str(timestamp).encode(), body)


def sign(
    msg_id: str,
    timestamp: int,
    body: bytes,
    *,
    hmac_secrets: Sequence[bytes] = (),
    ed25519_keys: Sequence[Ed25519PrivateKey] = (),
) -> str:
    """The ``webhook-signature`` header value: one ``v1`` per secret, one ``v1a`` per key."""
    content = signed_content(msg_id, timestamp, body)
    parts = [f"v1,{base64.b64encode(hmac.digest(s, content, 'sha256')).decode()}" for s in hmac_secrets]
    parts += [f"v1a,{base64.b64encode(k.sign(content)).decode()}" for k in ed25519_keys]
    return " ".join(parts)


def parse_signature_header(header: str) -> list[tuple[str, bytes]]:
    """``[(version, signature bytes)]`` for the well-formed entries; malformed entries are dropped.

    An entry without a comma, with bad base64 or with a version other than ``v1``/``v1a`` cannot
    verify, so it is skipped; a header with nothing usable verifies against nothing.
    """
    entries = []
    for item in header.split():
        version, sep, encoded = item.partition(",")
        if not sep or version not in ("v1", "v1a"):
            continue
        try:
            entries.append((version, base64.b64decode(encoded, validate=True)))
        except binascii.Error:
            continue
    return entries


def verify(
    msg_id: str,
    timestamp: str,
    body: bytes,
    signature_header: str,
    *,
    hmac_secrets: Iterable[bytes],
    ed25519_public_keys: Iterable[bytes],
) -> bool:
    """True when any listed signature verifies against any of the given credentials.

    HMAC comparisons use :func:`hmac.compare_digest`; every candidate is compared (no early exit on
    the first mismatch), so timing does not tell which credential came close.
    """
    entries = parse_signature_header(signature_header)
    if not entries:
        return False
    content = signed_content(msg_id, timestamp, body)
    matched = False
    v1 = [sig for version, sig in entries if version == "v1"]
    if v1:
        for secret in hmac_secrets:
            expected = hmac.digest(secret, content, "sha256")
            for candidate in v1:
                matched |= hmac.compare_digest(expected, candidate)
    if matched:
        return True
    v1a = [sig for version, sig in entries if version == "v1a" and len(sig) == 64]
    for raw_key in ed25519_public_keys if v1a else ():
        key = load_public_key(raw_key)
        for candidate in v1a:
            try:
                key.verify(candidate, content)
                return True
            except _CryptoInvalidSignature:
                continue
    return False


# --- Sealing and keyed hashes -----------------------------------------------------------------------


@lru_cache(maxsize=8)
def _fernet(keys: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([Fernet(k.encode()) for k in keys])


def _configured_fernet() -> MultiFernet:
    from django.conf import settings

    return _fernet(tuple(settings.HUB_ENCRYPTION_KEYS))


def seal(plaintext: str) -> str:
    """Encrypt with the newest hub encryption key (Fernet: AES-CBC with HMAC, timestamped)."""
    return _configured_fernet().encrypt(plaintext.encode()).decode()


def unseal(token: str) -> str:
    """Decrypt with any configured key, so old rows stay readable after a key rotation."""
    try:
        return _configured_fernet().decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise MalformedKey("Sealed value cannot be decrypted with any configured key.") from exc


def reseal(token: str) -> str:
    """Re-encrypt under the newest key (for key rotation jobs)."""
    return _configured_fernet().rotate(token.encode()).decode()


def subject_ref(institution_code: str, subject: str) -> str:
    """The keyed hash that stands in for an institution's subject id everywhere in the hub."""
    from django.conf import settings

    message = f"{institution_code}\x00{subject}".encode()
    return hmac.digest(settings.HUB_SUBJECT_KEY.encode(), message, "sha256").hex()  # one-shot: runs per event


def webhook_headers(
    body: bytes,
    *,
    msg_id: str,
    timestamp: int,
    hmac_secrets: Sequence[bytes] = (),
    ed25519_keys: Sequence[Ed25519PrivateKey] = (),
) -> dict[str, str]:
    """The three Standard Webhooks headers for ``body``, as a sender sets them."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(msg_id, timestamp, body, hmac_secrets=hmac_secrets, ed25519_keys=ed25519_keys),
    }
