"""Expiry: lots that lapsed move to ``expired(issuer)``, one transfer each."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date

from django.db import transaction
from django.db.models import Max

from ledger.models import LOT_KINDS, Account, Posting, Transfer, TransferKind
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
    lots is one transaction that locks its lots and the issuers' ``expired`` accounts (ascending ids)
    before reading the balances it moves. The key is ``expire:<account id>:<expires_on>``; a lot that
    received points after it was swept (late consolidation) is swept again under
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
            lots = [(lot, issuer, expires_on) for lot, issuer, expires_on in rows if expires_on is not None]
            expired = accounts_ensure(keys={AccountKey.expired(issuer_id=issuer) for _, issuer, _ in lots})
            by_issuer = {key.issuer_id: account_id for key, account_id in expired.items()}
            locked = accounts_lock(sorted({lot for lot, _, _ in lots} | set(by_issuer.values())))
            keys = sweep_keys({lot: f"expire:{lot}:{expires_on.isoformat()}" for lot, _, expires_on in lots})
            specs = [
                TransferSpec(
                    idempotency_key=keys[lot],
                    kind=TransferKind.EXPIRE,
                    legs=[(lot, -locked[lot].balance), (by_issuer[issuer], locked[lot].balance)],
                    metadata={"expires_on": expires_on.isoformat(), "today": today.isoformat()},
                )
                for lot, issuer, expires_on in lots
                if locked[lot].balance > 0  # re-read under the lock: spent meanwhile, nothing to expire
            ]
            made += len(transfers_post(transfers=specs).created)
            done += len(rows)
        if progress is not None:
            progress(done, made)
    return made
