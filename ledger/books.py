"""The policy of the hub's books: owner locks, lots and their expiry, crediting, consolidation on
linking and reversal. The apps above call these with plain ids and amounts: methodology measures and
credits, wallets links persons; neither spells an account key or a posting.

Every function here runs inside the caller's transaction and under the owners' locks (see
:func:`owners_lock`): the subject's first, then the person's, in that order everywhere, so a link and
a batch of the same subject's activities are applied one after the other, never interleaved.

Like the rest of the ledger this module knows no other app: what it needs to know of an institution
(how long its points stay valid) the caller passes in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date

from django.db import connection

from clearinghouse.db import advisory_lock_id, array_literal, text_array_literal
from ledger.models import LOT_KINDS, Account, AccountKind
from ledger.selectors import Leg, transfer_legs
from ledger.services import AccountKey, TransferSpec, accounts_ensure, lot_expiry, transfers_post


def owners_lock(keys: Iterable[str]) -> None:
    """Serialize work per owner for the rest of the transaction (PostgreSQL advisory locks).

    Caps, fingerprints and lots are read-then-written per owner; two workers holding events of the
    same person must not both see the cap unused. Locks within one call are taken in ascending order;
    callers lock subjects in one call and persons in a later one, so no two transactions can wait on
    each other in a cycle. SQLite has one writer at a time and needs nothing.
    """
    if connection.vendor != "postgresql":
        return
    lock_ids = sorted({owner_lock_id(k) for k in keys})
    if lock_ids:
        with connection.cursor() as cursor:
            # unnest yields the array in order and the projection runs row by row: locks follow the sort.
            cursor.execute("SELECT pg_advisory_xact_lock(x) FROM unnest(%s::bigint[]) AS x", [array_literal(lock_ids)])


def owner_lock_id(key: str) -> int:
    """The advisory lock id of an owner key, for a caller that takes the lock in its own SQL."""
    ids = _lock_ids
    found = ids.get(key)
    if found is None:
        if len(ids) > _LOCK_IDS_KEPT:
            ids.clear()
        found = ids[key] = advisory_lock_id(key)
    return found


# Owner key -> advisory lock id, remembered per process (the same owners come back batch after batch).
_lock_ids: dict[str, int] = {}
_LOCK_IDS_KEPT = 200_000


def subject_owner(institution_id: int, subject_ref: str) -> str:
    return f"s:{institution_id}:{subject_ref}"


def person_owner(person_id: int) -> str:
    return f"p:{person_id}"


def add_months(day: date, months: int) -> date:
    month = day.month - 1 + months
    year, month = day.year + month // 12, month % 12 + 1
    return date(year, month, 1)  # only the month matters: lots are bucketed by month


def lot_expiries(
    days_by_issuer: Mapping[int, Iterable[date]], validity_months: Mapping[int, int]
) -> dict[tuple[int, date], date]:
    """The expiry bucket of points each issuer credits for an act on each local day, its points staying
    valid ``validity_months[issuer]`` months (``institutions.selectors.points_validity_months``)."""
    return {
        (issuer, day): lot_expiry(add_months(day, validity_months[issuer]))
        for issuer, days in days_by_issuer.items()
        for day in days
    }


def credit_key(inbox_event_id: int) -> str:
    """The idempotency key of the credit of the activity of inbox row ``inbox_event_id``."""
    return f"activity:{inbox_event_id}"


def credit_legs(*, inbox_event_ids: Iterable[int]) -> list[Leg]:
    """The legs of the credits of these activities (none for an activity not credited), in posting order."""
    return transfer_legs(idempotency_keys=[credit_key(i) for i in inbox_event_ids])


@dataclass(frozen=True, slots=True)
class Credit:
    """Points a measured activity earns: who holds them and from which issuer."""

    inbox_event_id: int
    issuer_id: int
    person_id: int | None
    subject_ref: str
    local_day: date
    milligrams: int


def credits_post(credits: Sequence[Credit], *, validity_months: Mapping[int, int]) -> None:
    """Credit each activity to its owner's lot, paying the owner's debt to that issuer first.

    One transfer per activity, keyed ``activity:<inbox row id>`` (:func:`credit_key`): posting a batch
    again credits once. A linked person's points go to ``wallet_lot(person, issuer, expiry)``, an
    unlinked subject's to ``holding_lot(institution, subject, expiry)``; the expiry is the end of the
    month the issuer's validity runs out (``validity_months[issuer]``: needed for every issuer with a
    credit above zero).
    """
    credits = [c for c in credits if c.milligrams > 0]
    if not credits:
        return
    days: dict[int, set[date]] = {}
    for credit in credits:
        days.setdefault(credit.issuer_id, set()).add(credit.local_day)
    expiries = lot_expiries(days, validity_months)
    outstanding = {issuer_id: AccountKey.issuer_outstanding(issuer_id=issuer_id) for issuer_id in days}

    lots: list[AccountKey] = []
    debts: list[AccountKey] = []
    for credit in credits:
        expires_on = expiries[(credit.issuer_id, credit.local_day)]
        if credit.person_id is not None:
            lots.append(
                AccountKey.wallet_lot(person_id=credit.person_id, issuer_id=credit.issuer_id, expires_on=expires_on)
            )
            debts.append(AccountKey.person_debt(person_id=credit.person_id, issuer_id=credit.issuer_id))
        else:
            lots.append(
                AccountKey.holding_lot(
                    issuer_id=credit.issuer_id,
                    holder_institution_id=credit.issuer_id,
                    subject_ref=credit.subject_ref,
                    expires_on=expires_on,
                )
            )
            debts.append(
                AccountKey.subject_debt(
                    issuer_id=credit.issuer_id, holder_institution_id=credit.issuer_id, subject_ref=credit.subject_ref
                )
            )
    # Debts are rare: look them up instead of creating an account per owner; the owners are locked.
    owed = _debts_owed({d.key for d in debts})
    ids = accounts_ensure(keys=[*outstanding.values(), *lots, *(d for d in debts if d.key in owed)])

    transfers = []
    for credit, lot, debt in zip(credits, lots, debts, strict=True):
        legs = [(ids[outstanding[credit.issuer_id]], -credit.milligrams)]
        repay = min(credit.milligrams, -owed[debt.key]) if debt.key in owed else 0
        if repay:
            owed[debt.key] += repay
            legs.append((ids[debt], repay))
        if credit.milligrams - repay:
            legs.append((ids[lot], credit.milligrams - repay))
        transfers.append(
            TransferSpec(
                idempotency_key=credit_key(credit.inbox_event_id),
                kind="credit",
                legs=legs,
                metadata={"inbox_event": credit.inbox_event_id},
            )
        )
    transfers_post(transfers=transfers)


def _debts_owed(keys: set[str]) -> dict[str, int]:
    """The negative balances among these debt accounts."""
    if connection.vendor != "postgresql":
        return dict(Account.objects.filter(key__in=keys, balance__lt=0).values_list("key", "balance"))
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT key, balance FROM {Account._meta.db_table} WHERE key = ANY(%s::text[]) AND balance < 0",  # noqa: S608
            [text_array_literal(keys)],
        )
        return dict(cursor.fetchall())


def holdings_consolidate(
    *, person_id: int, institution_id: int, subject_ref: str, duplicates: dict[tuple[int, date], int], link_key: str
) -> dict[str, int]:
    """Pool a newly linked subject's holding lots into the person's wallet lots, in one transfer.

    Issuer and expiry are kept (``holding_lot(i, s, e)`` to ``wallet_lot(p, i, e)``); ``duplicates``
    gives, per (issuer, expiry), the milligrams of acts the person already had credited, which go
    to ``reversed(issuer)`` instead of being pooled. The subject's debts become the person's.
    Idempotent by ``link_key``. Returns the milligrams pooled, reversed and debts moved.
    """
    holding = list(
        Account.objects.filter(
            kind=AccountKind.HOLDING_LOT, holder_institution_id=institution_id, subject_ref=subject_ref, balance__gt=0
        ).values_list("issuer_id", "expires_on", "balance", "key")
    )
    subject_debts = list(
        Account.objects.filter(
            kind=AccountKind.DEBT, holder_institution_id=institution_id, subject_ref=subject_ref, balance__lt=0
        ).values_list("issuer_id", "balance", "key")
    )
    if not holding and not subject_debts:
        return {"pooled_mg": 0, "reversed_mg": 0, "debt_mg": 0}
    wanted: list[AccountKey] = []
    plan: list[tuple[str, AccountKey, int, int]] = []  # holding key, wallet lot, pooled, reversed
    for issuer_id, expires_on, balance, key in holding:
        assert expires_on is not None  # every lot has an expiry
        reversed_mg = min(balance, duplicates.get((issuer_id, expires_on), 0))
        lot = AccountKey.wallet_lot(person_id=person_id, issuer_id=issuer_id, expires_on=expires_on)
        wanted.append(lot)
        if reversed_mg:
            wanted.append(AccountKey.reversed(issuer_id=issuer_id))
        plan.append((key, lot, balance - reversed_mg, reversed_mg))
    for issuer_id, _, _ in subject_debts:
        wanted.append(AccountKey.person_debt(person_id=person_id, issuer_id=issuer_id))
    ids = accounts_ensure(keys=wanted)
    by_key = dict(
        Account.objects.filter(key__in=[h[3] for h in holding] + [d[2] for d in subject_debts]).values_list("key", "id")
    )

    legs: list[tuple[int, int]] = []
    totals = {"pooled_mg": 0, "reversed_mg": 0, "debt_mg": 0}
    for (holding_key, lot, pooled, reversed_mg), (issuer_id, *_rest) in zip(plan, holding, strict=True):
        legs.append((by_key[holding_key], -(pooled + reversed_mg)))
        if pooled:
            legs.append((ids[lot], pooled))
        if reversed_mg:
            legs.append((ids[AccountKey.reversed(issuer_id=issuer_id)], reversed_mg))
        totals["pooled_mg"] += pooled
        totals["reversed_mg"] += reversed_mg
    for issuer_id, balance, key in subject_debts:
        legs.append((by_key[key], -balance))
        legs.append((ids[AccountKey.person_debt(person_id=person_id, issuer_id=issuer_id)], balance))
        totals["debt_mg"] += -balance
    transfers_post(transfers=[TransferSpec(idempotency_key=link_key, kind="consolidate", legs=legs, metadata=totals)])
    return totals


@dataclass(frozen=True, slots=True)
class Reversal:
    milligrams: int
    from_lots_mg: int
    debt_mg: int


def credit_reverse(*, original_inbox_id: int, issuer_id: int, person_id: int | None, subject_ref: str) -> Reversal:
    """Take back what the activity of ``original_inbox_id`` credited, from the lot it went to.

    ``person_id`` is the subject's person now (None while unlinked). If the points were pooled
    since, the lot is now that person's wallet lot of the same issuer and expiry; whatever is no
    longer there (spent) becomes the current owner's debt to that issuer, which their next credits
    from it pay first. Keyed ``reverse:<inbox row id>``: a second reversal changes nothing.
    """
    key = f"reverse:{original_inbox_id}"
    done = transfer_legs(idempotency_keys=[key])
    if done:
        return Reversal(
            milligrams=sum(leg.amount for leg in done if leg.kind == AccountKind.REVERSED),
            from_lots_mg=-sum(leg.amount for leg in done if leg.kind in LOT_KINDS),
            debt_mg=-sum(leg.amount for leg in done if leg.kind == AccountKind.DEBT),
        )
    credited_legs = credit_legs(inbox_event_ids=[original_inbox_id])
    credited = -sum(leg.amount for leg in credited_legs if leg.kind == AccountKind.ISSUER_OUTSTANDING)
    if credited <= 0:
        return Reversal(0, 0, 0)
    lots = [leg.expires_on for leg in credited_legs if leg.kind in LOT_KINDS and leg.expires_on is not None]
    if person_id is not None:
        debt = AccountKey.person_debt(person_id=person_id, issuer_id=issuer_id)
        lot = AccountKey.wallet_lot(person_id=person_id, issuer_id=issuer_id, expires_on=lots[0]) if lots else None
    else:
        debt = AccountKey.subject_debt(issuer_id=issuer_id, holder_institution_id=issuer_id, subject_ref=subject_ref)
        lot = (
            AccountKey.holding_lot(
                issuer_id=issuer_id, holder_institution_id=issuer_id, subject_ref=subject_ref, expires_on=lots[0]
            )
            if lots
            else None
        )
    # A credit that went wholly to repay a debt left no lot: taking it back restores the debt.
    available = Account.objects.filter(key=lot.key).values_list("balance", flat=True).first() or 0 if lot else 0
    from_lots = min(credited, available)
    owed = credited - from_lots
    reversed_account = AccountKey.reversed(issuer_id=issuer_id)
    wanted = [reversed_account] + ([lot] if lot and from_lots else []) + ([debt] if owed else [])
    ids = accounts_ensure(keys=wanted)
    legs = [(ids[reversed_account], credited)]
    if lot and from_lots:
        legs.append((ids[lot], -from_lots))
    if owed:
        legs.append((ids[debt], -owed))
    transfers_post(
        transfers=[
            TransferSpec(
                idempotency_key=key,
                kind="reverse",
                legs=legs,
                metadata={"inbox_event": original_inbox_id, "debt_mg": owed},
            )
        ]
    )
    return Reversal(credited, from_lots, owed)
