"""Expiry: lots that lapsed move to ``expired(issuer)``, one transfer each."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from django.db import transaction
from django.db.models import Max

from ledger.models import LOT_KINDS, Account, AccountKind, Posting, Transfer, TransferKind
from ledger.services.accounts import AccountKey, accounts_ensure
from ledger.services.transfers import TransferSpec, accounts_lock, transfers_post


def sweep_keys(keys: dict[int, str]) -> dict[int, str]:
    """Idempotency keys for sweeping lots (``{account id: key}``) that stay unique when a lot is swept
    again: a key already used gets ``:after-<last posting id of the lot>``, so a lot that received
    points after an earlier sweep is swept once more, and a repeat of the same sweep stays a no-op."""
    used = set(Transfer.objects.filter(idempotency_key__in=keys.values()).values_list("idempotency_key", flat=True))
    if not used:
        return keys
    last = dict(
        Posting.objects.filter(account_id__in=[lot for lot, key in keys.items() if key in used])
        .values("account_id")
        .annotate(last=Max("id"))
        .values_list("account_id", "last")
    )
    return {**keys, **{lot: f"{keys[lot]}:after-{last[lot]}" for lot in last}}


def lots_expire(*, today: date, batch_size: int = 1000, progress: Callable[[int, int], None] | None = None) -> int:
    """Move every lot that lapsed before ``today`` (``expires_on < today``) with points left to
    ``expired(issuer)``: one ``expire`` transfer per lot. Returns how many transfers were made.

    Idempotent and safe beside concurrent posting and a concurrent run: each chunk of ``batch_size``
    lots is one transaction, swept by :func:`lots_sweep`. The key is ``expire:<account id>:<expires_on>``;
    a lot that received points after it was swept (late consolidation) is swept again under
    ``expire:<account id>:<expires_on>:after-<last posting id>``. ``progress(done, transfers)`` is called
    after each chunk.
    """
    made = done = 0
    after_id = 0
    while True:
        with transaction.atomic():
            rows = list(
                Account.objects.filter(kind__in=LOT_KINDS, expires_on__lt=today, balance__gt=0, id__gt=after_id)
                .order_by("id")
                .values_list("id", "issuer_id", "expires_on")[:batch_size]
            )
            if not rows:
                break
            after_id = rows[-1][0]
            swept = lots_sweep(
                sweeps=[
                    LotSweep(
                        lot_id=lot,
                        issuer_id=issuer,
                        key=f"expire:{lot}:{expires_on.isoformat()}",
                        metadata={"expires_on": expires_on.isoformat(), "today": today.isoformat()},
                    )
                    for lot, issuer, expires_on in rows
                    if expires_on is not None
                ],
                kind=TransferKind.EXPIRE,
            )
            made += swept.transfers
            done += len(rows)
        if progress is not None:
            progress(done, made)
    return made


def person_lots_forfeit(*, person_id: int) -> Swept:
    """Forfeit every wallet lot of the person with points left to ``expired(issuer)`` (erasure): one
    ``forfeit`` transfer per lot, key ``forfeit:<person id>:<account id>`` (``...:after-<last posting id>``
    when an earlier erasure used it and the lot received points since). Issuer totals still balance
    (invariant 4). Run it in the erasure's transaction, under the person's owner lock, so no credit of the
    person lands between the read and the sweep; :func:`lots_sweep` locks the lots."""
    lots = Account.objects.filter(person_id=person_id, kind=AccountKind.WALLET_LOT, balance__gt=0).values_list(
        "id", "issuer_id"
    )
    return lots_sweep(
        sweeps=[
            LotSweep(lot_id=lot, issuer_id=issuer_id, key=f"forfeit:{person_id}:{lot}", metadata={"reason": "erasure"})
            for lot, issuer_id in lots
        ],
        kind=TransferKind.FORFEIT,
    )


@dataclass(frozen=True, slots=True)
class LotSweep:
    """A lot to empty into its issuer's ``expired`` account, with the sweep's idempotency key and metadata."""

    lot_id: int
    issuer_id: int
    key: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Swept:
    """What a sweep did: transfers made, and the milligrams they moved."""

    transfers: int
    milligrams: int


def lots_sweep(*, sweeps: Sequence[LotSweep], kind: str) -> Swept:
    """Move what is left in each lot to ``expired(issuer)``: one ``kind`` transfer per lot that still has
    points. The one sweep of the ledger, for expiry and for erasure alike.

    Locks the lots and the issuers' ``expired`` accounts (``FOR NO KEY UPDATE``, ascending ids, as the
    posting engine takes them) before reading the balances it moves, so a lot spent or credited meanwhile
    is swept as it is now, and one empty under the lock is left alone. A key already used gets
    ``:after-<last posting id of the lot>`` (:func:`sweep_keys`): a lot that received points since an
    earlier sweep is swept again, and a repeat of the same sweep changes nothing. Runs in the caller's
    transaction (or one of its own, the posting's).
    """
    if not sweeps:
        return Swept(transfers=0, milligrams=0)
    expired = accounts_ensure(keys={AccountKey.expired(issuer_id=sweep.issuer_id) for sweep in sweeps})
    by_issuer = {key.issuer_id: account_id for key, account_id in expired.items()}
    locked = accounts_lock(sorted({sweep.lot_id for sweep in sweeps} | set(by_issuer.values())))
    keys = sweep_keys({sweep.lot_id: sweep.key for sweep in sweeps})
    specs = [
        TransferSpec(
            idempotency_key=keys[sweep.lot_id],
            kind=kind,
            legs=[
                (sweep.lot_id, -locked[sweep.lot_id].balance),
                (by_issuer[sweep.issuer_id], locked[sweep.lot_id].balance),
            ],
            metadata=sweep.metadata,
        )
        for sweep in sweeps
        if locked[sweep.lot_id].balance > 0  # re-read under the lock: spent meanwhile, nothing to sweep
    ]
    created = transfers_post(transfers=specs).created
    return Swept(
        transfers=len(created), milligrams=sum(spec.legs[1][1] for spec in specs if spec.idempotency_key in created)
    )
