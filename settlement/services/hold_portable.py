"""The portable hold engine: the checks and writes of a redemption hold, from Python.

What SQLite runs, and PostgreSQL with ``HUB_REDEMPTION_HOLD_IN_DATABASE`` off. On PostgreSQL the same
decisions and writes are one call of the database function ``settlement_redemption_hold``
(:mod:`settlement.services.hold_database`); ``tests/settlement/test_hold_engines.py`` holds the two equal.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.utils import timezone

from clearinghouse.db import execute_prepared
from institutions.models import Institution
from institutions.outbox import outbox_enqueue
from ledger.exceptions import InsufficientBalance
from ledger.models import Account, AccountKind, TransferKind
from ledger.services import AccountKey, TransferSpec, accounts_ensure, transfers_post
from settlement.exceptions import (
    InsufficientPoints,
    OutOfStock,
    RedemptionLimitReached,
    RewardNotFound,
    RewardUnavailable,
)
from settlement.models import (
    Redemption,
    RedemptionAllocation,
    RedemptionRequest,
    RedemptionStatus,
    Reward,
    new_redemption_id,
    window_open,
)
from settlement.selectors import redemption_body
from settlement.services.hold_refusals import points_gone, refusal, stock_gone
from settlement.webhooks import REDEMPTION_REQUESTED, redemption_requested_data
from wallets.models import Membership
from wallets.selectors import MG_PER_POINT, standard_today


@dataclass(frozen=True, slots=True)
class Lot:
    account_id: int
    issuer_id: int
    issuer_code: str
    expires_on: date
    balance: int


def spendable_lots(*, person_id: int, today: date) -> tuple[list[Lot], int]:
    """The person's live wallet lots with points, soonest-expiring first (then issuer, then account id),
    and the milligrams they owe back (debts, >= 0). Read under the person's owner lock to be current.

    One query through the ledger's ``ledger_account_person`` index, with the issuers' codes joined in. The
    expiry is tested here, not in the query: there the prepared statement's generic plan ANDed the
    person's index with the lots' expiry index, a scan of every live lot in the hub. Lapsed lots with
    points are few (the expiry job sweeps them)."""
    rows, _ = _run(
        f"""SELECT a.id, a.kind, a.issuer_id, i.code, a.expires_on, a.balance
              FROM {Account._meta.db_table} a JOIN {Institution._meta.db_table} i ON i.id = a.issuer_id
             WHERE a.person_id = %s AND (a.kind = %s AND a.balance > 0 OR a.kind = %s AND a.balance < 0)""",  # noqa: S608
        [person_id, str(AccountKind.WALLET_LOT), str(AccountKind.DEBT)],
    )
    lots: list[Lot] = []
    owed = 0
    for account_id, kind, issuer_id, code, expires_on, balance in rows:
        if kind == AccountKind.DEBT:
            owed -= balance
        elif expires_on >= today:
            lots.append(Lot(account_id, issuer_id, code, expires_on, balance))
    lots.sort(key=lambda lot: (lot.expires_on, lot.issuer_id, lot.account_id))
    return lots, owed


@dataclass(frozen=True, slots=True)
class Offer:
    """A reward as a hold reads it: with its provider, the person's sealed account id at the provider
    (None unless linked) and the units of it the person has pending or fulfilled."""

    reward_id: int
    code: str
    points: int
    stock: int | None
    per_person_limit: int | None
    active_from: datetime | None
    active_until: datetime | None
    provider_id: int
    provider_code: str
    provider_active: bool
    provider_is_provider: bool
    subject_sealed: str | None
    units_taken: int


def _offer(*, reward_code: str, person_id: int) -> Offer | None:
    """One query: the reward, its provider, the person's link there and their units of it so far."""
    rows, _ = _run(
        f"""SELECT r.id, r.code, r.points, r.stock, r.per_person_limit, r.active_from, r.active_until,
                   p.id, p.code, p.status = %s, p.is_provider,
                   (SELECT m.subject_sealed FROM {Membership._meta.db_table} m
                     WHERE m.institution_id = p.id AND m.person_id = %s AND m.unlinked_at IS NULL LIMIT 1),
                   CASE WHEN r.per_person_limit IS NULL THEN 0 ELSE
                       (SELECT COALESCE(SUM(x.quantity), 0) FROM {Redemption._meta.db_table} x
                         WHERE x.person_id = %s AND x.reward_id = r.id AND x.status IN (%s, %s)) END
              FROM {Reward._meta.db_table} r JOIN {Institution._meta.db_table} p ON p.id = r.provider_id
             WHERE r.code = %s""",  # noqa: S608
        [
            str(Institution.Status.ACTIVE),
            person_id,
            person_id,
            str(RedemptionStatus.PENDING),
            str(RedemptionStatus.FULFILLED),
            reward_code,
        ],
    )
    if not rows:
        return None
    row = list(rows[0])
    for index in (5, 6):  # SQLite hands raw timestamps back naive (in UTC); PostgreSQL aware
        if row[index] is not None and timezone.is_naive(row[index]):
            row[index] = timezone.make_aware(row[index], UTC)
    return Offer(*row)


@dataclass(frozen=True, slots=True)
class HoldPlan:
    """What a hold will write, decided under the person's owner lock before anything is written."""

    person_id: int
    offer: Offer
    quantity: int
    points: int
    taken: list[tuple[Lot, int]]  # (lot, milligrams), soonest-expiring first
    now: datetime


def hold_plan(
    *, person_id: int, reward_code: str, quantity: int, now: datetime | None = None, today: date | None = None
) -> HoldPlan:
    """The checks of :func:`redemption_hold`, reading only; the caller holds the person's owner lock and has
    checked the quantity."""
    now = now or timezone.now()
    today = today or standard_today()
    offer = _offer(reward_code=reward_code, person_id=person_id)
    if offer is None:
        raise refusal(RewardNotFound.code, reward_code, {})
    if not (
        window_open(offer.active_from, offer.active_until, now) and offer.provider_active and offer.provider_is_provider
    ):
        raise refusal(RewardUnavailable.code, offer.code, {})
    if offer.stock is not None and offer.stock < quantity:
        raise refusal(OutOfStock.code, offer.code, {"stock": offer.stock})
    if offer.per_person_limit is not None and offer.units_taken + quantity > offer.per_person_limit:
        figures = {"limit": offer.per_person_limit, "taken": offer.units_taken}
        raise refusal(RedemptionLimitReached.code, offer.code, figures)
    points = offer.points * quantity
    lots, owed = spendable_lots(person_id=person_id, today=today)
    available = sum(lot.balance for lot in lots) - owed
    left = points * MG_PER_POINT
    if left > available:
        raise refusal(InsufficientPoints.code, offer.code, {"points": points, "available_mg": available})
    taken_from: list[tuple[Lot, int]] = []
    for lot in lots:
        if not left:
            break
        take = min(lot.balance, left)
        taken_from.append((lot, take))
        left -= take
    return HoldPlan(person_id, offer, quantity, points, taken_from, now)


def hold_write(plan: HoldPlan, *, answer_key: tuple[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """The writes of :func:`redemption_hold`, in the caller's transaction; ``(redemption pk, its JSON)``.

    With ``answer_key`` (key, request hash) the key's answer is stored too (the redemption, without a body,
    which a replay rebuilds from the redemption; see :func:`answer_replayed`). The redemption,
    its allocations and the answer go in one statement; then the hold accounts and the ledger transfer,
    the webhook, and the stock. Raises :class:`InsufficientPoints` or :class:`OutOfStock` only when a
    concurrent change beat it after the checks (a lot swept by the expiry job, the last unit taken);
    the caller must then roll back what was written.
    """
    offer = plan.offer
    public_id = new_redemption_id()
    hold_expires_at = plan.now + timedelta(hours=settings.HUB_REDEMPTION_HOLD_HOURS)
    milligrams: dict[str, int] = defaultdict(int)
    per_issuer: dict[int, int] = defaultdict(int)
    for lot, take in plan.taken:
        milligrams[lot.issuer_code] += take
        per_issuer[lot.issuer_id] += take
    body = redemption_body(
        public_id=public_id,
        status=RedemptionStatus.PENDING,
        reward=offer.code,
        provider=offer.provider_code,
        quantity=plan.quantity,
        points=plan.points,
        milligrams=milligrams,
        created_at=plan.now,
        hold_expires_at=hold_expires_at,
    )
    redemption_id = _redemption_insert(plan, public_id, hold_expires_at, answer=answer_key)
    holds = _hold_accounts(redemption_id, per_issuer)
    legs = [(lot.account_id, -take) for lot, take in plan.taken]
    legs += [(holds[issuer_id], mg) for issuer_id, mg in sorted(per_issuer.items())]
    try:
        transfers_post(
            transfers=[
                TransferSpec(
                    idempotency_key=f"redemption:{redemption_id}:hold",
                    kind=TransferKind.HOLD,
                    legs=legs,
                    metadata={"redemption": public_id},
                )
            ]
        )
    except InsufficientBalance as exc:  # a lot was swept by the expiry job since it was read
        raise points_gone() from exc
    outbox_enqueue(
        # The provider's columns read with the offer: all the outbox row needs of it is its id.
        institution=Institution(id=offer.provider_id, code=offer.provider_code, is_provider=True),
        type=REDEMPTION_REQUESTED,
        data=redemption_requested_data(
            public_id=public_id, reward=offer.code, points=plan.points, quantity=plan.quantity
        ),
        subject_sealed=offer.subject_sealed or "",
    )
    # The stock last, so the reward row is locked only until the commit; the UPDATE re-checks it.
    if offer.stock is not None:
        _, updated = _run(
            f"UPDATE {Reward._meta.db_table} SET stock = stock - %s WHERE id = %s AND stock >= %s",  # noqa: S608
            [plan.quantity, offer.reward_id, plan.quantity],
        )
        if updated != 1:
            raise stock_gone(offer.code)
    return redemption_id, body


def _redemption_insert(
    plan: HoldPlan, public_id: str, hold_expires_at: datetime, *, answer: tuple[str, str] | None
) -> int:
    """Insert the redemption, its allocations and, given ``answer`` (key, request hash), the key's
    stored answer. Returns the redemption's pk. On PostgreSQL one statement."""
    if connection.vendor != "postgresql":
        redemption = Redemption.objects.create(
            public_id=public_id,
            person_id=plan.person_id,
            reward_id=plan.offer.reward_id,
            provider_id=plan.offer.provider_id,
            quantity=plan.quantity,
            points=plan.points,
            created_at=plan.now,
            hold_expires_at=hold_expires_at,
        )
        RedemptionAllocation.objects.bulk_create(
            RedemptionAllocation(
                redemption=redemption,
                lot_id=lot.account_id,
                issuer_id=lot.issuer_id,
                expires_on=lot.expires_on,
                milligrams=take,
            )
            for lot, take in plan.taken
        )
        if answer is not None:
            key, request_hash = answer
            RedemptionRequest.objects.create(
                person_id=plan.person_id,
                key=key,
                request_hash=request_hash,
                response=None,
                redemption=redemption,
                created_at=plan.now,
            )
        return redemption.pk
    lots = [lot for lot, _ in plan.taken]
    params: list[Any] = [
        public_id,
        plan.person_id,
        plan.offer.reward_id,
        plan.offer.provider_id,
        plan.quantity,
        plan.points,
        str(RedemptionStatus.PENDING),
        plan.now,
        hold_expires_at,
        [lot.account_id for lot in lots],
        [lot.issuer_id for lot in lots],
        [lot.expires_on for lot in lots],
        [take for _, take in plan.taken],
    ]
    answered = ""
    if answer is not None:
        key, request_hash = answer
        answered = f""", answered AS (
            INSERT INTO {RedemptionRequest._meta.db_table}
                   (person_id, key, request_hash, response, redemption_id, created_at)
            SELECT %s, %s, %s, NULL, redemption.id, %s FROM redemption)"""  # noqa: S608
        params += [plan.person_id, key, request_hash, plan.now]
    ((redemption_id,),), _ = _run(
        f"""WITH redemption AS (
                INSERT INTO {Redemption._meta.db_table}
                       (public_id, person_id, reward_id, provider_id, quantity, points, status, created_at,
                        hold_expires_at, resolved_by, voucher, reason)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, '', '', '') RETURNING id
            ), allocations AS (
                INSERT INTO {RedemptionAllocation._meta.db_table}
                       (redemption_id, lot_id, issuer_id, expires_on, milligrams)
                SELECT redemption.id, u.lot, u.issuer, u.expires_on, u.mg
                  FROM redemption, unnest(%s::bigint[], %s::bigint[], %s::date[], %s::bigint[])
                       AS u(lot, issuer, expires_on, mg)
            ){answered}
            SELECT id FROM redemption""",  # noqa: S608
        params,
    )
    return int(redemption_id)


def _run(sql: str, params: Sequence[Any]) -> tuple[list[tuple[Any, ...]], int]:
    """Rows and row count of one statement of the hold's hot path: on PostgreSQL with a prepared plan
    (``clearinghouse.db.execute_prepared``: planning these costs more than running them)."""
    if connection.vendor == "postgresql":
        prepared = execute_prepared(sql, params)
        return (prepared.fetchall() if prepared.description else []), prepared.rowcount
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return (cursor.fetchall() if cursor.description else []), cursor.rowcount


def _hold_accounts(redemption_id: int, issuer_ids: Iterable[int]) -> dict[int, int]:
    """``{issuer id: account id}`` of the redemption's ``redemption_hold`` accounts."""
    keys = accounts_ensure(
        keys=[AccountKey.redemption_hold(redemption_id=redemption_id, issuer_id=issuer_id) for issuer_id in issuer_ids]
    )
    return {key.issuer_id: account_id for key, account_id in keys.items()}
