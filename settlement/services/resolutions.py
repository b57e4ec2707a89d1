"""How a held redemption ends: fulfilled (captured) or rejected by its provider, voided by an operator,
or expired at its deadline. Each change takes the locks of :func:`redemption_locked`, in one order."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from ledger.books import owners_lock, person_owner
from ledger.models import TransferKind
from ledger.services import AccountKey, TransferSpec, accounts_ensure, transfers_post
from settlement.exceptions import RedemptionNotPending
from settlement.models import Redemption, RedemptionAllocation, RedemptionStatus, Reward
from settlement.services.obligations import obligations_for_redemption
from wallets.models import Person
from wallets.services import person_erase


@dataclass(frozen=True, slots=True)
class Resolution:
    """What a provider's answer (or the clock, or an operator) did to a redemption: the event's outcome.

    ``result``: ``fulfilled``, ``already_fulfilled``, ``rejected``, ``already_rejected``, ``expired``,
    ``voided`` or ``refused`` (nothing changed; ``reason`` says why).
    """

    redemption_id: str
    result: str
    status: str | None = None
    reason: str | None = None

    @property
    def detail(self) -> dict[str, Any]:
        return {
            "redemption_id": self.redemption_id,
            "result": self.result,
            "status": self.status,
            "reason": self.reason,
        }


def redemption_locked(redemption_pk: int, person_id: int) -> Redemption:
    """Lock for a change of state, in the one order every path takes: the person row (``FOR NO KEY
    UPDATE``, as erasure takes it first), the person's owner lock, then the redemption row."""
    Person.objects.select_for_update(no_key=True).filter(pk=person_id).values_list("pk").first()
    owners_lock([person_owner(person_id)])
    # The redemption row alone: a FOR UPDATE over a join would lock the reward row too, and every new
    # hold of that reward (its foreign-key check) would queue behind this capture or void.
    return Redemption.objects.select_for_update().get(pk=redemption_pk)


def _find(*, provider_id: int, redemption_id: str) -> tuple[int, int] | None:
    """(pk, person id) of the provider's redemption ``redemption_id``; None also for another provider's,
    so an institution cannot tell another's redemption ids from unknown ones."""
    return (
        Redemption.objects.filter(public_id=redemption_id, provider_id=provider_id)
        .values_list("pk", "person_id")
        .first()
    )


def _mg_by_issuer(redemption: Redemption) -> dict[int, int]:
    totals: dict[int, int] = defaultdict(int)
    for issuer_id, milligrams in RedemptionAllocation.objects.filter(redemption=redemption).values_list(
        "issuer_id", "milligrams"
    ):
        totals[issuer_id] += milligrams
    return dict(totals)


@transaction.atomic
def redemption_fulfil(
    *,
    provider_id: int,
    redemption_id: str,
    voucher: str = "",
    event_id: str = "",
    received_at: datetime | None = None,
    now: datetime | None = None,
) -> Resolution:
    """The provider fulfilled the redemption (``carbon.redemption.fulfilled``): capture it.

    Moves the held points to ``redeemed(provider, issuer)`` in one transfer ``redemption:<id>:capture``
    and records the gross obligations "issuer owes provider" at the price in force ``now``
    (:func:`obligations_for_redemption`). Never raises for a wrong answer, it reports it:
    ``refused``/``unknown_redemption`` for an id that is not this provider's (the same for another
    provider's, so ids cannot be probed), ``already_fulfilled`` for a repeat (idempotent),
    ``refused``/``redemption_<status>`` after a void. An answer received after the hold's deadline
    (``received_at``, when the hub stored the event, not when a worker got to it) voids the hold as
    ``expired`` instead. Raises :class:`NoPrice` if no settlement price is in force (the event retries).
    """
    now = now or timezone.now()
    received_at = received_at or now
    found = _find(provider_id=provider_id, redemption_id=redemption_id)
    if found is None:
        return Resolution(redemption_id, "refused", reason="unknown_redemption")
    redemption = redemption_locked(*found)
    if redemption.status == RedemptionStatus.FULFILLED:
        return Resolution(redemption_id, "already_fulfilled", redemption.status)
    if redemption.status != RedemptionStatus.PENDING:
        return Resolution(redemption_id, "refused", redemption.status, f"redemption_{redemption.status}")
    if received_at > redemption.hold_expires_at:
        _void(redemption, status=RedemptionStatus.EXPIRED, reason="hold expired", resolved_by="expiry", now=now)
        return Resolution(redemption_id, "refused", redemption.status, "hold_expired")

    mg_by_issuer = _mg_by_issuer(redemption)
    hold_keys = {i: AccountKey.redemption_hold(redemption_id=redemption.pk, issuer_id=i) for i in mg_by_issuer}
    redeemed_keys = {i: AccountKey.redeemed(provider_id=provider_id, issuer_id=i) for i in mg_by_issuer}
    ids = accounts_ensure(keys=[*hold_keys.values(), *redeemed_keys.values()])  # one read for both kinds
    legs: list[tuple[int, int]] = []
    for issuer_id in sorted(mg_by_issuer):
        mg = mg_by_issuer[issuer_id]
        legs += [(ids[hold_keys[issuer_id]], -mg), (ids[redeemed_keys[issuer_id]], mg)]
    transfers_post(
        transfers=[
            TransferSpec(
                idempotency_key=f"redemption:{redemption.pk}:capture",
                kind=TransferKind.CAPTURE,
                legs=legs,
                metadata={"redemption": redemption.public_id},
            )
        ]
    )
    redemption.status = RedemptionStatus.FULFILLED
    redemption.voucher = voucher
    redemption.resolved_at = now
    redemption.resolved_by = event_id
    redemption.save(update_fields=["status", "voucher", "resolved_at", "resolved_by"])
    obligations_for_redemption(redemption_id=redemption.pk, provider_id=provider_id, mg_by_issuer=mg_by_issuer, at=now)
    return Resolution(redemption_id, "fulfilled", redemption.status)


@transaction.atomic
def redemption_reject(
    *, provider_id: int, redemption_id: str, reason: str, event_id: str = "", now: datetime | None = None
) -> Resolution:
    """The provider rejected the redemption (``carbon.redemption.rejected``): void it, points back to
    the lots they came from. Reports like :func:`redemption_fulfil`: ``rejected``, ``already_rejected``
    for a repeat, ``refused`` for another provider's or an unknown id, or one no longer pending."""
    now = now or timezone.now()
    found = _find(provider_id=provider_id, redemption_id=redemption_id)
    if found is None:
        return Resolution(redemption_id, "refused", reason="unknown_redemption")
    redemption = redemption_locked(*found)
    if redemption.status == RedemptionStatus.REJECTED:
        return Resolution(redemption_id, "already_rejected", redemption.status)
    if redemption.status != RedemptionStatus.PENDING:
        return Resolution(redemption_id, "refused", redemption.status, f"redemption_{redemption.status}")
    _void(redemption, status=RedemptionStatus.REJECTED, reason=reason, resolved_by=event_id, now=now)
    return Resolution(redemption_id, "rejected", redemption.status)


@transaction.atomic
def redemption_void(*, redemption: Redemption, reason: str, by: str, now: datetime | None = None) -> Redemption:
    """An operator voids a pending hold (a provider that never answers, a mistake): points back to their
    lots, stock back. Raises :class:`RedemptionNotPending` if it was fulfilled or voided meanwhile."""
    locked = redemption_locked(redemption.pk, redemption.person_id)
    if locked.status != RedemptionStatus.PENDING:
        raise RedemptionNotPending(f"Redemption {locked.public_id} is {locked.status}; only a pending one is voided.")
    _void(
        locked, status=RedemptionStatus.VOIDED, reason=reason, resolved_by=f"operator:{by}", now=now or timezone.now()
    )
    return locked


def redemptions_expire(*, now: datetime | None = None, batch_size: int = 200) -> int:
    """Void every pending hold whose deadline (``hold_expires_at``) has passed, as ``expired``.

    One short transaction per redemption (the locks of :func:`redemption_locked`, the state re-checked under
    them), so it runs safely beside providers' answers, operators and another run; a hold answered
    meanwhile is left as answered. Returns how many it voided. Idempotent.
    """
    now = now or timezone.now()
    voided = 0
    after = 0
    while True:
        due = list(
            Redemption.objects.filter(status=RedemptionStatus.PENDING, hold_expires_at__lte=now, pk__gt=after)
            .order_by("pk")
            .values_list("pk", "person_id")[:batch_size]
        )
        if not due:
            return voided
        for pk, person_id in due:
            with transaction.atomic():
                redemption = redemption_locked(pk, person_id)
                if redemption.status == RedemptionStatus.PENDING and redemption.hold_expires_at <= now:
                    _void(
                        redemption,
                        status=RedemptionStatus.EXPIRED,
                        reason="hold expired",
                        resolved_by="expiry",
                        now=now,
                    )
                    voided += 1
        after = due[-1][0]


def _void(redemption: Redemption, *, status: str, reason: str, resolved_by: str, now: datetime) -> None:
    """Return a pending redemption's points to exactly the lots they came from, in one transfer
    ``redemption:<id>:void``, and its units to the reward's stock. The caller holds :func:`redemption_locked`'s
    locks and checked the state. Lots keep their expiry: points back in a lapsed lot are swept by the
    next expiry run. If the person erased their account meanwhile, the returned points are forfeited
    with the rest of their wallet (``person_erase`` again, which is idempotent)."""
    allocations = list(
        RedemptionAllocation.objects.filter(redemption=redemption)
        .order_by("lot_id")
        .values_list("lot_id", "issuer_id", "milligrams")
    )
    per_issuer: dict[int, int] = defaultdict(int)
    for _, issuer_id, milligrams in allocations:
        per_issuer[issuer_id] += milligrams
    hold_keys = {i: AccountKey.redemption_hold(redemption_id=redemption.pk, issuer_id=i) for i in per_issuer}
    holds = accounts_ensure(keys=hold_keys.values())
    legs = [(holds[hold_keys[issuer_id]], -mg) for issuer_id, mg in sorted(per_issuer.items())]
    legs += [(lot_id, milligrams) for lot_id, _, milligrams in allocations]
    transfers_post(
        transfers=[
            TransferSpec(
                idempotency_key=f"redemption:{redemption.pk}:void",
                kind=TransferKind.VOID,
                legs=legs,
                metadata={"redemption": redemption.public_id, "status": status},
            )
        ]
    )
    Reward.objects.filter(pk=redemption.reward_id, stock__isnull=False).update(stock=F("stock") + redemption.quantity)
    redemption.status = status
    redemption.reason = reason[:256]
    redemption.resolved_at = now
    redemption.resolved_by = resolved_by[:160]
    redemption.save(update_fields=["status", "reason", "resolved_at", "resolved_by"])
    erased = Person.objects.filter(pk=redemption.person_id, erased_at__isnull=False).first()
    if erased is not None:
        person_erase(person=erased)
