"""Reads of the institutions app, including the per-process credential cache of the intake."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from django.conf import settings

from institutions import crypto
from institutions.models import Credential, InboxEvent, Institution


@dataclass(frozen=True, slots=True)
class Verifier:
    """What the intake needs to authenticate one institution's requests."""

    institution_id: int
    code: str
    active: bool
    rate_limit_per_second: int
    hmac_secrets: tuple[bytes, ...]
    ed25519_public_keys: tuple[bytes, ...]


_cache: dict[str, tuple[float, Verifier | None]] = {}
_cache_lock = threading.Lock()
# Misses are cached too, and the code comes from an unauthenticated URL: without a bound, requests
# naming ever new codes would grow the cache for the life of the process.
CACHE_MAX_ENTRIES = 10_000


def institution_verifier(code: str) -> Verifier | None:
    """The verifier for ``code``, or None when no such institution exists.

    Cached per process for ``HUB_CREDENTIAL_CACHE_SECONDS`` because the intake looks it up on every
    request; a rotation, retirement or suspension is seen by every process within that time, and
    at once by the process that made it.
    """
    now = time.monotonic()
    hit = _cache.get(code)
    if hit is not None and hit[0] > now:
        return hit[1]
    verifier = _load_verifier(code)
    with _cache_lock:
        if len(_cache) >= CACHE_MAX_ENTRIES:
            _cache.clear()
        _cache[code] = (now + settings.HUB_CREDENTIAL_CACHE_SECONDS, verifier)
    return verifier


def forget_institution(code: str) -> None:
    with _cache_lock:
        _cache.pop(code, None)


def forget_all_institutions() -> None:
    with _cache_lock:
        _cache.clear()


def _load_verifier(code: str) -> Verifier | None:
    institution = Institution.objects.filter(code=code).first()
    if institution is None:
        return None
    hmac_secrets: list[bytes] = []
    public_keys: list[bytes] = []
    credentials = Credential.objects.filter(
        institution=institution,
        status=Credential.Status.ACTIVE,
        kind__in=[Credential.Kind.HMAC, Credential.Kind.ED25519],
    ).order_by("-created_at")
    for credential in credentials:
        if credential.kind == Credential.Kind.HMAC:
            hmac_secrets.append(crypto.hmac_secret_bytes(crypto.unseal(credential.secret_sealed)))
        else:
            public_keys.append(base64.b64decode(credential.public_key))
    return Verifier(
        institution_id=institution.pk,
        code=institution.code,
        active=institution.is_active,
        rate_limit_per_second=institution.rate_limit_per_second or settings.HUB_INTAKE_RATE_LIMIT_PER_SECOND,
        hmac_secrets=tuple(hmac_secrets),
        ed25519_public_keys=tuple(public_keys),
    )


def institution_for_token(token: str) -> Institution | None:
    """The active institution whose active API token this is, or None."""
    credential = (
        Credential.objects.select_related("institution")
        .filter(token_hash=crypto.hash_token(token), kind=Credential.Kind.API_TOKEN, status=Credential.Status.ACTIVE)
        .first()
    )
    if credential is None or not credential.institution.is_active:
        return None
    return credential.institution


def points_validity_months(issuer_ids: Iterable[int]) -> dict[int, int]:
    """How many months each issuer's points stay valid (its own setting, else ``HUB_POINTS_VALIDITY_MONTHS``):
    what the ledger's books need to date a credit's lot. No query for no issuers."""
    ids = list(issuer_ids)
    months = dict.fromkeys(ids, settings.HUB_POINTS_VALIDITY_MONTHS)
    if ids:
        for pk, own in Institution.objects.filter(pk__in=ids).values_list("pk", "points_validity_months"):
            if own is not None:
                months[pk] = own
    return months


def inbox_events_named(*, type: str, pairs: Iterable[tuple[int, str]]) -> dict[tuple[int, str], InboxEvent]:
    """The inbox rows of ``type`` named by (institution id, event id), keyed so: how a handler finds the
    earlier event a new one refers to (a reversal's original). One query."""
    wanted = set(pairs)
    if not wanted:
        return {}
    rows = InboxEvent.objects.filter(
        type=type, institution_id__in={i for i, _ in wanted}, event_id__in={e for _, e in wanted}
    )
    return {(row.institution_id, row.event_id): row for row in rows}


# --- For other apps: an institution as they need to see it -------------------------------------------
# (Each has an SQL twin in institutions/sql for their SQL, which reads institutions through it.)


def provider_state(institution_id: int) -> tuple[str, bool] | None:
    """``(code, providing)`` of an institution as a reward's provider: providing is active and a
    provider. None if there is no such institution. SQL twin: ``institutions_provider``."""
    row = Institution.objects.filter(pk=institution_id).values_list("code", "status", "is_provider").first()
    if row is None:
        return None
    code, status, is_provider = row
    return code, status == Institution.Status.ACTIVE and is_provider


def institution_codes(ids: Iterable[int]) -> dict[int, str]:
    """``{id: code}`` of the institutions with these ids. SQL twin: ``institutions_codes``."""
    return dict(Institution.objects.filter(pk__in=set(ids)).values_list("pk", "code"))
