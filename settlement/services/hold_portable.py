"""The portable hold engine: the checks and writes of a redemption hold, from Python.

What SQLite runs, and PostgreSQL with ``HUB_REDEMPTION_HOLD_IN_DATABASE`` off. On PostgreSQL the same
decisions and writes are one call of the database function ``settlement_redemption_hold``
(:mod:`settlement.services.hold_database`); ``tests/settlement/test_hold_engines.py`` holds the two equal.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import F, Sum
from django.utils import timezone

from institutions.models import Institution
from institutions.outbox import outbox_enqueue
from institutions.selectors import institution_codes, provider_state
from ledger.exceptions import InsufficientBalance
from ledger.models import AccountKind, TransferKind
from ledger.selectors import person_lots
from ledger.services import AccountKey, TransferSpec, accounts_ensure, transfers_post
from ledger.units import MG_PER_POINT, standard_today
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
from wallets.selectors import subject_sealed_at


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

    The ledger's reader of a person's lots and debts (``ledger.selectors.person_lots``), then the
    issuers' codes from the edge. The expiry is tested here, after the read, as the database engine
    tests it. Lapsed lots with points are few (the expiry job sweeps them)."""
    lots: list[tuple[int, int, date]] = []
    balances: dict[int, int] = {}
    owed = 0
    for account_id, kind, issuer_id, expires_on, balance in person_lots(person_id=person_id):
        if kind == AccountKind.DEBT:
            owed -= balance
        elif expires_on is not None and expires_on >= today:
            lots.append((account_id, issuer_id, expires_on))
            balances[account_id] = balance
    codes = institution_codes(issuer_id for _, issuer_id, _ in lots)
    spendable = [Lot(a, i, codes[i], e, balances[a]) for a, i, e in lots]
    spendable.sort(key=lambda lot: (lot.expires_on, lot.issuer_id, lot.account_id))
    return spendable, owed


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
    providing: bool
    subject_sealed: str | None
    units_taken: int


def _offer(*, reward_code: str, person_id: int) -> Offer | None:
    """The reward; its provider and the person's link there, read through the edge's and wallets'
    selectors; and the person's units of it so far."""
    reward = Reward.objects.filter(code=reward_code).first()
    if reward is None:
        return None
    provider = provider_state(reward.provider_id)
    assert provider is not None, "a reward's provider exists (a protected foreign key)"
    units_taken = 0
    if reward.per_person_limit is not None:
        units_taken = (
            Redemption.objects.filter(
                person_id=person_id,
                reward_id=reward.pk,
                status__in=[RedemptionStatus.PENDING, RedemptionStatus.FULFILLED],
            ).aggregate(units=Sum("quantity"))["units"]
            or 0
        )
    return Offer(
        reward_id=reward.pk,
        code=reward.code,
        points=reward.points,
        stock=reward.stock,
        per_person_limit=reward.per_person_limit,
        active_from=reward.active_from,
        active_until=reward.active_until,
        provider_id=reward.provider_id,
        provider_code=provider[0],
        providing=provider[1],
        subject_sealed=subject_sealed_at(person_id=person_id, institution_id=reward.provider_id),
        units_taken=units_taken,
    )


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
    if not (window_open(offer.active_from, offer.active_until, now) and offer.providing):
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
    which a replay rebuilds from the redemption; see :func:`answer_replayed`). The redemption, its
    allocations and the answer first; then the hold accounts and the ledger transfer, the webhook, and
    the stock. Raises :class:`InsufficientPoints` or :class:`OutOfStock` only when a
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
    hold_keys = {i: AccountKey.redemption_hold(redemption_id=redemption_id, issuer_id=i) for i in per_issuer}
    holds = accounts_ensure(keys=hold_keys.values())
    legs = [(lot.account_id, -take) for lot, take in plan.taken]
    legs += [(holds[hold_keys[issuer_id]], mg) for issuer_id, mg in sorted(per_issuer.items())]
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
        taken = Reward.objects.filter(pk=offer.reward_id, stock__gte=plan.quantity).update(
            stock=F("stock") - plan.quantity
        )
        if taken != 1:
            raise stock_gone(offer.code)
    return redemption_id, body


def _redemption_insert(
    plan: HoldPlan, public_id: str, hold_expires_at: datetime, *, answer: tuple[str, str] | None
) -> int:
    """Insert the redemption, its allocations and, given ``answer`` (key, request hash), the key's
    stored answer. Returns the redemption's pk."""
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
