"""Idempotency-Key answers of ``POST /me/redemptions`` (CONTRACT section 4).

The first request under a person's key gets an answer; every repeat of the same request gets that
answer again, and a different request under the key is refused. A request still running holds a
transaction-scoped advisory lock on (person, key), so a repeat meanwhile is told to retry at once
instead of waiting. How the hold itself uses these is in :mod:`settlement.services.holds`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connection

from clearinghouse.db import advisory_lock_id, insert_sql
from settlement.exceptions import (
    IdempotencyKeyInFlight,
    IdempotencyKeyInvalid,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    RedemptionRefused,
)
from settlement.models import Redemption, RedemptionRequest
from settlement.selectors import redemption_json

IDEMPOTENCY_KEY_MAX = 255
_KEY_TEXT = re.compile(r"^[\x20-\x7e]+$")


@dataclass(frozen=True, slots=True)
class RedemptionAnswer:
    """What a redemption request under a key answers, the same for every repeat of the key: the
    redemption it held (``held``; ``body`` is the redemption as held), or why not (``body`` is the
    refusal's problem document). ``replayed``: a repeat got the key's stored answer."""

    body: dict[str, Any]
    held: bool
    replayed: bool = False


def idempotency_key_clean(raw: str | None) -> str:
    """The key as stored: the header's value, without the double quotes of its structured-field form
    (``"abc"`` and ``abc`` are one key). Raises :class:`IdempotencyKeyMissing` or :class:`IdempotencyKeyInvalid`."""
    if raw is None or not raw.strip():
        raise IdempotencyKeyMissing("Send an Idempotency-Key header: a unique string per redemption you mean to make.")
    key = raw.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1]
    if not key or len(key) > IDEMPOTENCY_KEY_MAX or not _KEY_TEXT.match(key):
        raise IdempotencyKeyInvalid(f"An Idempotency-Key is 1 to {IDEMPOTENCY_KEY_MAX} printable ASCII characters.")
    return key


def redemption_request_hash(*, reward_code: str, quantity: int) -> str:
    """SHA-256 over the canonical request: what a repeat of the key must match."""
    canonical = json.dumps({"quantity": quantity, "reward": reward_code}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def request_lock_id(person_id: int, key: str) -> int:
    """The advisory lock id of (person, Idempotency-Key): held by the transaction answering it."""
    return advisory_lock_id(f"redemption-request\x00{person_id}\x00{key}")


def request_lock_try(person_id: int, key: str) -> bool:
    """Take the transaction's advisory lock on (person, key) if free; False while another request holds it.

    SQLite runs one writer at a time, so there no request is ever in flight beside another."""
    if connection.vendor != "postgresql":
        return True
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [request_lock_id(person_id, key)])
        row = cursor.fetchone()
    return bool(row and row[0])


def key_in_flight() -> IdempotencyKeyInFlight:
    return IdempotencyKeyInFlight("A request with this Idempotency-Key is still running; retry shortly.")


def answer_replayed(request_hash: str, response: Any, redemption_id: int | None, digest: str) -> RedemptionAnswer:
    """The stored answer of a key sent again; :class:`IdempotencyKeyReused` if the request differs.
    A held redemption's answer is stored without its body: the redemption as held, rebuilt from its rows
    (answers stored before settlement migration 0007 kept that body, and give it as stored)."""
    if request_hash != digest:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was used for another request; use a new key for a new redemption."
        )
    if response is None:
        assert redemption_id is not None, "an answer without a body is a held redemption"
        redemption = Redemption.objects.select_related("reward", "provider").get(pk=redemption_id)
        return RedemptionAnswer(body=redemption_json(redemption, as_held=True), held=True, replayed=True)
    body = json.loads(response) if isinstance(response, str) else response
    return RedemptionAnswer(body=body, held=redemption_id is not None, replayed=True)


def answer_stored(*, person_id: int, key: str, digest: str) -> RedemptionAnswer | None:
    """The key's stored answer, replayed (see :func:`answer_replayed`); None if it has none."""
    stored = (
        RedemptionRequest.objects.filter(person_id=person_id, key=key)
        .values_list("request_hash", "response", "redemption_id")
        .first()
    )
    if stored is None:
        return None
    return answer_replayed(*stored, digest)


def refusal_stored(
    refusal: RedemptionRefused, *, person_id: int, key: str, digest: str, now: datetime
) -> RedemptionAnswer:
    """Store a refusal found before anything was written as the key's answer, and return it.

    On the database path the hold's statement has committed and released the key's lock by now, so a
    request with the same key may have stored its answer in between: that answer, the key's first,
    is then the one given (the insert does nothing)."""
    answer = RedemptionAnswer(body=refusal.problem(), held=False)
    sql, params = insert_sql(
        RedemptionRequest(person_id=person_id, key=key, request_hash=digest, response=answer.body, created_at=now)
    )
    with connection.cursor() as cursor:
        cursor.execute(f"{sql} ON CONFLICT (person_id, key) DO NOTHING", params)
        inserted = cursor.rowcount
    if inserted:
        return answer
    first = answer_stored(person_id=person_id, key=key, digest=digest)
    assert first is not None, "a conflicting answer is committed"
    return first
