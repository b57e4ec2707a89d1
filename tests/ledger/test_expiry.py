"""Expiry: lapsed lots move to expired(issuer), once, and nothing else moves."""

from __future__ import annotations

from datetime import date
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from ledger.models import Account, Transfer
from ledger.selectors import ledger_check
from ledger.services import AccountKey, TransferSpec, lots_expire, transfers_post
from ledger.tasks import lots_expire_daily
from tests.ledger.conftest import DEC, NOV, credit, ids, wallet_lot

SUBJECT = "5e" * 32


def balance(account_id: int) -> int:
    return Account.objects.get(pk=account_id).balance


def expired(issuer: int) -> int:
    return ids(AccountKey.expired(issuer_id=issuer))[0]


@pytest.mark.django_db
def test_lapsed_lots_move_to_expired_of_their_issuer():
    nov_a, dec_a, nov_b = (
        wallet_lot(1, issuer=1, expires_on=NOV),
        wallet_lot(1, issuer=1, expires_on=DEC),
        wallet_lot(2, issuer=2, expires_on=NOV),
    )
    holding = ids(AccountKey.holding_lot(issuer_id=2, holder_institution_id=2, subject_ref=SUBJECT, expires_on=NOV))[0]
    empty = wallet_lot(3, issuer=1, expires_on=NOV)
    transfers_post(
        transfers=[
            credit("a", issuer=1, lot=nov_a, amount=1000),
            credit("b", issuer=1, lot=dec_a, amount=2000),
            credit("c", issuer=2, lot=nov_b, amount=300),
            credit("d", issuer=2, lot=holding, amount=40),
        ]
    )

    assert lots_expire(today=NOV) == 0  # points are good through the last day of the month
    assert lots_expire(today=date(2028, 12, 1)) == 3
    assert (balance(nov_a), balance(dec_a), balance(nov_b), balance(holding), balance(empty)) == (0, 2000, 0, 0, 0)
    assert (balance(expired(1)), balance(expired(2))) == (1000, 340)
    assert set(Transfer.objects.filter(kind="expire").values_list("idempotency_key", flat=True)) == {
        f"expire:{nov_a}:2028-11-30",
        f"expire:{nov_b}:2028-11-30",
        f"expire:{holding}:2028-11-30",
    }
    assert lots_expire(today=date(2028, 12, 1)) == 0  # running twice expires once
    assert lots_expire(today=date(2029, 1, 1)) == 1
    assert balance(expired(1)) == 3000
    assert ledger_check() == []


@pytest.mark.django_db
def test_points_put_back_into_a_swept_lot_are_swept_again():
    """A late consolidation into an already swept bucket must not stay spendable forever."""
    lot, other = wallet_lot(1, issuer=1), wallet_lot(2, issuer=1)
    transfers_post(transfers=[credit("a", issuer=1, lot=lot, amount=1000), credit("b", issuer=1, lot=other, amount=5)])
    assert lots_expire(today=date(2028, 12, 1)) == 2
    # Not something services should do with a lapsed bucket, but the sweep must cope: move points in again.
    transfers_post(transfers=[credit("late", issuer=1, lot=lot, amount=70)])
    assert lots_expire(today=date(2028, 12, 2)) == 1
    assert balance(lot) == 0
    latest = Transfer.objects.filter(kind="expire").latest("id")
    assert latest.idempotency_key.startswith(f"expire:{lot}:2028-11-30:after-")
    assert lots_expire(today=date(2028, 12, 2)) == 0


@pytest.mark.django_db
def test_expiry_in_chunks_reports_progress():
    lots = [wallet_lot(person, issuer=1 + person % 3) for person in range(25)]
    transfers_post(transfers=[credit(f"c{n}", issuer=1 + n % 3, lot=lot, amount=10) for n, lot in enumerate(lots)])
    seen: list[tuple[int, int]] = []
    assert lots_expire(today=date(2029, 1, 1), batch_size=10, progress=lambda d, m: seen.append((d, m))) == 25
    assert seen == [(10, 10), (20, 20), (25, 25)]
    assert sum(balance(expired(i)) for i in (1, 2, 3)) == 250


@pytest.mark.django_db
def test_spent_points_do_not_expire():
    lot, redeemed = wallet_lot(1, issuer=1), ids(AccountKey.redeemed(provider_id=9, issuer_id=1))[0]
    transfers_post(
        transfers=[
            credit("a", issuer=1, lot=lot, amount=1000),
            TransferSpec("spend", "capture", [(lot, -1000), (redeemed, 1000)]),
        ]
    )
    assert lots_expire(today=date(2029, 1, 1)) == 0
    assert balance(redeemed) == 1000


@pytest.mark.django_db
def test_command_and_task():
    lot = wallet_lot(1, issuer=1)
    old = wallet_lot(2, issuer=1, expires_on=date(2020, 1, 31))
    transfers_post(transfers=[credit("a", issuer=1, lot=lot, amount=10), credit("b", issuer=1, lot=old, amount=20)])
    out = StringIO()
    call_command("lots_expire", "--today", "2028-11-30", stdout=out)
    assert "Expired 1 lots as of 2028-11-30." in out.getvalue()
    assert balance(old) == 0 and balance(lot) == 10
    assert lots_expire_daily() == 0  # today (real time) is long before the lot's expiry; the 2020 lot is done
    with pytest.raises(CommandError, match="--today"):
        call_command("lots_expire", "--today", "30/11/2028", stdout=StringIO())
