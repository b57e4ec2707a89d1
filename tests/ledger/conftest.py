"""Small builders for ledger tests: accounts by natural identity and credit transfers."""

from __future__ import annotations

from datetime import date

from ledger.services import AccountKey, TransferSpec, accounts_ensure

NOV = date(2028, 11, 30)
DEC = date(2028, 12, 31)


def ids(*keys: AccountKey) -> list[int]:
    """Account ids for ``keys``, in order, creating the accounts."""
    found = accounts_ensure(keys=keys)
    return [found[k] for k in keys]


def outstanding(issuer: int) -> int:
    return ids(AccountKey.issuer_outstanding(issuer_id=issuer))[0]


def wallet_lot(person: int, issuer: int, expires_on: date = NOV) -> int:
    return ids(AccountKey.wallet_lot(person_id=person, issuer_id=issuer, expires_on=expires_on))[0]


def credit(key: str, *, issuer: int, lot: int, amount: int) -> TransferSpec:
    """``amount`` mg from the issuer's outstanding to ``lot``."""
    return TransferSpec(idempotency_key=key, kind="credit", legs=[(outstanding(issuer), -amount), (lot, amount)])
