"""The database hold engine: a redemption hold as one call of ``settlement_redemption_hold``.

On PostgreSQL (unless ``HUB_REDEMPTION_HOLD_IN_DATABASE`` is off) the locks, checks and writes of a
hold, the key's answer and the provider's webhook are one statement: with Django's autocommit one
round trip that commits. The function (``settlement/sql/settlement_redemption_hold.v3.sql``, which
describes its answers) makes the same decisions and writes as the portable engine
(:mod:`settlement.services.hold_portable`), and moves the points through the ledger's own ``ledger_post``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError, connection
from django.utils import timezone

from clearinghouse.db import execute_prepared
from institutions.outbox import outbox_source
from ledger.books import owner_lock_id, person_owner
from ledger.exceptions import InsufficientBalance
from ledger.services import ledger_refusal
from ledger.units import standard_today
from settlement.exceptions import RedemptionRefused
from settlement.models import RedemptionStatus, new_redemption_id
from settlement.selectors import redemption_body
from settlement.services.hold_refusals import points_gone, refusal, stock_gone
from settlement.services.idempotency import request_lock_id
from settlement.webhooks import REDEMPTION_REQUESTED


class AnsweredMeanwhile(Exception):
    """The hold's key got its answer (a refusal) while the hold ran; the hold rolled back (CH003)."""


def hold_in_database() -> bool:
    """Whether holds run as the database function ``settlement_redemption_hold``: on PostgreSQL unless
    ``HUB_REDEMPTION_HOLD_IN_DATABASE`` is off. One statement, with the key's answer and the webhook,
    instead of the portable engine's many; the same decisions and rows
    (``tests/settlement/test_hold_engines.py``)."""
    return connection.vendor == "postgresql" and settings.HUB_REDEMPTION_HOLD_IN_DATABASE


@dataclass(frozen=True, slots=True)
class HoldOutcome:
    """What ``settlement_redemption_hold`` answered (its SQL file describes each ``kind``)."""

    kind: str  # in-flight, stored, refused, held
    public_id: str
    quantity: int
    now: datetime
    hold_expires_at: datetime
    refusal: RedemptionRefused | None = None
    request_hash: str = ""
    response: Any = None
    redemption_pk: int | None = None  # held: the redemption; stored: the answer's, if it held one
    reward: str = ""
    provider_code: str = ""
    points: int = 0
    milligrams: dict[str, int] | None = None


_HOLD_CALL = (
    "SELECT settlement_redemption_hold(%s::bigint, %s::bigint, %s::bigint, %s::text, %s::text, %s::integer,"
    " %s::timestamptz, %s::date, %s::text, %s::timestamptz, %s::text, %s::text, %s::text)"
)


def hold_call(
    *,
    person_id: int,
    key: str | None,
    reward_code: str,
    quantity: int,
    now: datetime | None,
    request_hash: str = "",
    today: date | None = None,
) -> HoldOutcome:
    """Call ``settlement_redemption_hold``: one statement that, when it holds, also stores the key's
    answer (given ``key`` and ``request_hash``) and the provider's webhook; in autocommit its own
    transaction, else part of the caller's. Raises :class:`InsufficientPoints` or :class:`OutOfStock`
    when a concurrent change beat the hold after its writes began (the statement's writes roll back;
    so must a caller's transaction, as it will when the exception leaves its ``atomic``)."""
    now = now or timezone.now()
    public_id = new_redemption_id()
    hold_expires_at = now + timedelta(hours=settings.HUB_REDEMPTION_HOLD_HOURS)
    params = [
        person_id,
        owner_lock_id(person_owner(person_id)),
        request_lock_id(person_id, key) if key is not None else None,
        key,
        reward_code,
        quantity,
        now,
        today or standard_today(),
        public_id,
        hold_expires_at,
        request_hash,
        REDEMPTION_REQUESTED,
        outbox_source(),
    ]
    try:
        (returned,) = execute_prepared(_HOLD_CALL, params).fetchone()
    except DatabaseError as exc:
        refused = ledger_refusal(exc)
        if isinstance(refused, InsufficientBalance):  # a lot swept since the hold read it (ledger_post)
            raise points_gone() from exc
        if refused is not None:
            raise refused from exc
        sqlstate = getattr(exc.__cause__, "sqlstate", None)
        if sqlstate == "CH002":
            raise stock_gone(reward_code) from exc
        if sqlstate == "CH003":
            raise AnsweredMeanwhile from exc
        raise
    # Django's connections load json as text (its JSONField parses it).
    answer = json.loads(returned) if isinstance(returned, str) else returned
    base = HoldOutcome(answer["outcome"], public_id, quantity, now, hold_expires_at)
    if base.kind == "stored":
        return replace(
            base,
            request_hash=answer["request_hash"],
            response=answer["response"],
            redemption_pk=answer["redemption_id"],
        )
    if base.kind == "refused":
        figures = {name: value for name, value in answer.items() if name not in ("outcome", "code")}
        return replace(base, refusal=refusal(answer["code"], reward_code, figures))
    if base.kind == "held":
        return replace(
            base,
            redemption_pk=answer["id"],
            reward=answer["reward"],
            provider_code=answer["provider_code"],
            points=answer["points"],
            milligrams=answer["milligrams"],
        )
    return base  # in-flight


def held_body(outcome: HoldOutcome) -> dict[str, Any]:
    """The answer of a hold the function made: the redemption as held."""
    return redemption_body(
        public_id=outcome.public_id,
        status=RedemptionStatus.PENDING,
        reward=outcome.reward,
        provider=outcome.provider_code,
        quantity=outcome.quantity,
        points=outcome.points,
        milligrams=outcome.milligrams or {},
        created_at=outcome.now,
        hold_expires_at=outcome.hold_expires_at,
    )
