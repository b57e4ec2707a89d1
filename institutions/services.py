"""Writes of the institutions app: registration, credentials and their rotation, the hub's keys."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.fernet import InvalidToken
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.db import IntegrityError, models, transaction
from django.utils import timezone

from clearinghouse.keys import Signer
from institutions import crypto
from institutions.exceptions import InstitutionExists, InvalidCredential, InvalidInstitution
from institutions.models import Credential, HubKey, Institution
from institutions.selectors import forget_institution

CODE_PATTERN = re.compile(r"^[a-z0-9-]{2,40}$")


@dataclass
class IssuedCredentials:
    """Secrets made for an institution. Shown once; the hub keeps only what verifies them."""

    code: str
    hmac_secret: str | None = None
    api_token: str | None = None
    ed25519_public_key: str | None = None
    credential_ids: list[int] = field(default_factory=list)


def _add_credentials(
    institution: Institution, *, hmac: bool, ed25519_public_key: str | None, api_token: bool
) -> IssuedCredentials:
    issued = IssuedCredentials(code=institution.code)
    rows: list[Credential] = []
    if hmac:
        secret = crypto.new_hmac_secret()
        issued.hmac_secret = secret
        rows.append(
            Credential(
                institution=institution,
                kind=Credential.Kind.HMAC,
                secret_sealed=crypto.seal(secret),
                hint=secret[:10] + "…",
            )
        )
    if ed25519_public_key:
        try:
            raw = crypto.public_key_bytes(ed25519_public_key)
            crypto.load_public_key(raw)
        except (crypto.MalformedKey, ValueError) as exc:
            raise InvalidCredential(f"--ed25519-public-key: {exc}") from exc
        issued.ed25519_public_key = ed25519_public_key
        rows.append(
            Credential(
                institution=institution,
                kind=Credential.Kind.ED25519,
                public_key=crypto.format_public_key(raw)[len(crypto.PUBLIC_KEY_PREFIX) :],
                hint=ed25519_public_key[:13] + "…",
            )
        )
    if api_token:
        token = crypto.new_api_token()
        issued.api_token = token
        rows.append(
            Credential(
                institution=institution,
                kind=Credential.Kind.API_TOKEN,
                token_hash=crypto.hash_token(token),
                hint=token[:10] + "…",
            )
        )
    for row in rows:
        row.save()
        issued.credential_ids.append(row.pk)
    forget_institution(institution.code)
    return issued


@transaction.atomic
def institution_register(
    *,
    code: str,
    name: str,
    hmac: bool = False,
    ed25519_public_key: str | None = None,
    endpoint_url: str = "",
    is_provider: bool = False,
) -> IssuedCredentials:
    """Create an institution with its first credentials and an API token.

    Raises :class:`InstitutionExists` when the code is taken (nothing is changed then) and
    :class:`InvalidInstitution` / :class:`InvalidCredential` for bad input.
    """
    if not CODE_PATTERN.fullmatch(code):  # fullmatch: "$" alone lets a trailing newline through
        raise InvalidInstitution("The code must match [a-z0-9-]{2,40}.")
    if not name.strip():
        raise InvalidInstitution("The name must not be empty.")
    if len(name.strip()) > 200:  # Institution.name.max_length: longer fails in the database instead
        raise InvalidInstitution("The name is at most 200 characters.")
    if not hmac and not ed25519_public_key:
        raise InvalidCredential("Give at least one of --hmac or --ed25519-public-key.")
    if endpoint_url:
        _check_endpoint(endpoint_url)
    if Institution.objects.filter(code=code).exists():
        raise InstitutionExists(f"An institution with code {code!r} is already registered; nothing was changed.")
    try:
        with transaction.atomic():
            institution = Institution.objects.create(
                code=code, name=name.strip(), endpoint_url=endpoint_url, is_provider=is_provider
            )
    except IntegrityError as exc:  # a concurrent registration of the same code won
        raise InstitutionExists(f"An institution with code {code!r} is already registered.") from exc
    return _add_credentials(institution, hmac=hmac, ed25519_public_key=ed25519_public_key, api_token=True)


def _check_endpoint(url: str) -> None:
    from django.core.exceptions import ValidationError
    from django.core.validators import URLValidator

    try:
        URLValidator(schemes=["https", "http"])(url)
    except ValidationError as exc:
        raise InvalidInstitution(f"The endpoint {url!r} is not an http(s) URL.") from exc


@transaction.atomic
def credential_add(
    *,
    institution: Institution,
    hmac: bool = False,
    ed25519_public_key: str | None = None,
    api_token: bool = False,
) -> IssuedCredentials:
    """Add credentials beside the active ones (rotation step one). Nothing is retired here."""
    if not (hmac or ed25519_public_key or api_token):
        raise InvalidCredential("Name at least one credential to add: --hmac, --ed25519-public-key or --api-token.")
    return _add_credentials(institution, hmac=hmac, ed25519_public_key=ed25519_public_key, api_token=api_token)


@transaction.atomic
def credential_retire(*, credential: Credential) -> Credential:
    """Retire a credential (rotation step two). Refuses to leave an institution unable to sign.

    Idempotent: retiring a retired credential changes nothing.
    """
    credential = Credential.objects.select_for_update().get(pk=credential.pk)
    if credential.status == Credential.Status.RETIRED:
        return credential
    if credential.kind in (Credential.Kind.HMAC, Credential.Kind.ED25519):
        others = Credential.objects.filter(
            institution_id=credential.institution_id,
            status=Credential.Status.ACTIVE,
            kind__in=[Credential.Kind.HMAC, Credential.Kind.ED25519],
        ).exclude(pk=credential.pk)
        if not others.exists():
            raise InvalidCredential("This is the institution's last signing credential; add another first.")
    credential.status = Credential.Status.RETIRED
    credential.retired_at = timezone.now()
    credential.save(update_fields=["status", "retired_at"])
    forget_institution(credential.institution.code)
    return credential


@transaction.atomic
def institution_set_status(*, institution: Institution, status: str) -> Institution:
    """Suspend or reactivate. A suspended institution's requests are refused like an unknown one's."""
    if status not in Institution.Status.values:
        raise InvalidInstitution(f"Unknown status {status!r}.")
    Institution.objects.filter(pk=institution.pk).update(status=status)
    institution.status = status
    forget_institution(institution.code)
    return institution


@transaction.atomic
def institution_update(
    *,
    institution: Institution,
    name: str,
    endpoint_url: str = "",
    is_provider: bool = False,
    rate_limit_per_second: int | None = None,
) -> Institution:
    """Change an institution's profile. The code, status and credentials have services of their own.

    Raises :class:`InvalidInstitution` for an empty name or an endpoint that is not an http(s) URL.
    """
    if not name.strip():
        raise InvalidInstitution("The name must not be empty.")
    if endpoint_url:
        _check_endpoint(endpoint_url)
    institution.name = name.strip()
    institution.endpoint_url = endpoint_url
    institution.is_provider = is_provider
    institution.rate_limit_per_second = rate_limit_per_second
    institution.save(update_fields=["name", "endpoint_url", "is_provider", "rate_limit_per_second"])
    forget_institution(institution.code)  # the intake caches the rate limit
    return institution


# --- The hub's own signing key ---------------------------------------------------------------------


def hub_signing_key() -> tuple[HubKey, Ed25519PrivateKey]:
    """The active hub key and its private half, creating the first key on first use."""
    key = HubKey.objects.filter(status=HubKey.Status.ACTIVE).first()
    if key is None:
        key = _hub_key_create()
    return key, crypto.private_key_from_string(crypto.unseal(key.private_key_sealed))


def _hub_key_create() -> HubKey:
    private, public = crypto.new_ed25519_keypair()
    try:
        with transaction.atomic():
            return HubKey.objects.create(
                key_id="hk_" + secrets.token_hex(8),
                public_key=public,
                private_key_sealed=crypto.seal(private),
                status=HubKey.Status.ACTIVE,
            )
    except IntegrityError:  # another process created it first: use that one
        return HubKey.objects.get(status=HubKey.Status.ACTIVE)


@transaction.atomic
def hub_key_rotate() -> HubKey:
    """Make a new signing key; the old one stays published so signatures in flight still verify."""
    HubKey.objects.filter(status=HubKey.Status.ACTIVE).update(status=HubKey.Status.PUBLISHED)
    return _hub_key_create()


def hub_public_keys() -> list[HubKey]:
    """Keys institutions should trust: the active one first, then ones still published."""
    hub_signing_key()
    return list(HubKey.objects.exclude(status=HubKey.Status.RETIRED).order_by("status", "-created_at"))


def hub_signer() -> Signer:
    """Sign with the hub's active key (created on first use), naming the key and its public half: the
    keeper's half of :mod:`clearinghouse.keys`, which the ledger seals blocks with."""
    key, private = hub_signing_key()

    def sign(message: bytes) -> tuple[str, str, bytes]:
        return key.key_id, key.public_key, private.sign(message)

    return sign


def hub_trusted_keys() -> dict[str, str]:
    """Every key the hub has published, retired ones included: blocks sealed before a rotation stay valid."""
    return dict(HubKey.objects.values_list("key_id", "public_key"))


# --- Sealed subjects ---------------------------------------------------------------------------------


def sealed_subjects_reseal(
    *, model: type[models.Model], batch_size: int = 500, on_batch: Callable[[int], None] | None = None
) -> int:
    """Re-encrypt the ``subject_sealed`` column of ``model`` under the newest ``HUB_ENCRYPTION_KEYS`` key
    (the rows where it is set); the hub's sealing is the edge's, whichever app's table holds the column.

    Runs in batches of ``batch_size``, each committed on its own with its rows locked, so an interrupted
    run can simply be started again; ``on_batch(rows resealed)`` is called after each batch. Returns how
    many rows were resealed. Raises :class:`~institutions.crypto.MalformedKey` naming the row when a
    sealed subject cannot be decrypted with any configured key (the rows before it stay resealed).
    """
    manager: Any = model._default_manager
    done = 0
    last_pk = 0
    while True:
        with transaction.atomic():
            rows = list(
                manager.select_for_update()
                .filter(pk__gt=last_pk)
                .exclude(subject_sealed="")
                .order_by("pk")[:batch_size]
            )
            if not rows:
                return done
            for row in rows:
                try:
                    row.subject_sealed = crypto.reseal(row.subject_sealed)
                except InvalidToken as exc:
                    raise crypto.MalformedKey(
                        f"{str(model._meta.verbose_name).capitalize()} {row.pk}: its sealed subject cannot be"
                        " decrypted with any configured key."
                    ) from exc
            manager.bulk_update(rows, ["subject_sealed"])
        last_pk = rows[-1].pk
        done += len(rows)
        if on_batch is not None:
            on_batch(len(rows))
