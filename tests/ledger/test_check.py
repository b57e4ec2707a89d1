"""``ledger_check`` finds what the database cannot refuse: balances drifting from their postings."""

from __future__ import annotations

import pytest
from django.db import connection

from ledger.selectors import ledger_check
from ledger.services import AccountKey, TransferSpec, transfers_post
from tests.ledger.conftest import credit, ids, wallet_lot

pytestmark = pytest.mark.django_db


def test_a_healthy_ledger_has_no_problems():
    lot = wallet_lot(1, issuer=1)
    redeemed = ids(AccountKey.redeemed(provider_id=5, issuer_id=1))[0]
    transfers_post(
        transfers=[
            credit("a", issuer=1, lot=lot, amount=900),
            TransferSpec("spend", "capture", [(lot, -400), (redeemed, 400)]),
        ]
    )
    assert ledger_check() == []


def test_a_balance_changed_behind_the_services_back_is_found():
    lot, other = wallet_lot(1, issuer=1), wallet_lot(2, issuer=2)
    transfers_post(transfers=[credit("a", issuer=1, lot=lot, amount=900), credit("b", issuer=2, lot=other, amount=5)])
    with connection.cursor() as cursor:  # the balance is the one column the database lets change
        cursor.execute("UPDATE ledger_account SET balance = balance + 100 WHERE id = %s", [lot])
    problems = {p.code: p for p in ledger_check()}
    assert set(problems) == {"balance-mismatch", "issuer-unbalanced", "ledger-unbalanced"}
    assert problems["balance-mismatch"].detail == {"account_id": lot, "balance": 1000, "posted": 900}
    assert problems["issuer-unbalanced"].detail == {"issuer_id": 1, "total": 100}
