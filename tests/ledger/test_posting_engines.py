"""The ledger's two engines give the same results, and its SQL writes account keys as AccountKey does.

On PostgreSQL ``transfers_post`` is one call of the database function ``ledger_post`` (ledger migration
0004), which other apps' SQL calls too; SQLite runs the same steps through the ORM (the portable
engine). Here one story of batches runs through each, on the same accounts, and what they answered
(created and existing keys, or the refusal with its wording and figures) and wrote (transfers,
postings in order, balances) must match. Transfer ids the database hands out are replaced by keys.
"""

from __future__ import annotations

import json
from datetime import date
from typing import Any

import pytest
from django.db import DatabaseError, connection, transaction

from ledger.exceptions import LedgerError, UnbalancedTransfer
from ledger.models import Account, AccountKind, Posting, Transfer
from ledger.selectors import ledger_check, person_lots
from ledger.services import AccountKey, TransferSpec, accounts_ensure, ledger_refusal, transfers_post
from ledger.services import accounts as accounts_module
from ledger.services import transfers as engines
from tests.ledger.conftest import DEC, NOV, ids

pytestmark = [pytest.mark.postgres, pytest.mark.django_db]


class _Undo(Exception):
    """Rolls one engine's run back, so the other starts from the same rows."""


def every_kind_of_key() -> list[AccountKey]:
    return [
        AccountKey.issuer_outstanding(issuer_id=1),
        AccountKey.holding_lot(issuer_id=1, holder_institution_id=2, subject_ref="f00d" * 16, expires_on=NOV),
        AccountKey.wallet_lot(person_id=12, issuer_id=3, expires_on=date(2029, 2, 28)),
        AccountKey.redemption_hold(redemption_id=77, issuer_id=3),
        AccountKey.redeemed(provider_id=9, issuer_id=3),
        AccountKey.expired(issuer_id=4),
        AccountKey.reversed(issuer_id=4),
        AccountKey.person_debt(person_id=12, issuer_id=5),
        AccountKey.subject_debt(issuer_id=5, holder_institution_id=2, subject_ref="abc-123"),
    ]


def test_the_database_writes_every_kind_of_account_key_as_account_key_does():
    keys = every_kind_of_key()
    assert {k.kind for k in keys} == set(AccountKind.values)
    with connection.cursor() as cursor:
        for key in keys:
            cursor.execute(
                "SELECT ledger_account_key(%s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    key.kind,
                    key.issuer_id,
                    key.person_id,
                    key.subject_ref,
                    key.expires_on,
                    key.redemption_id,
                    key.holder_institution_id,
                    key.provider_id,
                ],
            )
            assert cursor.fetchone()[0] == key.key


def test_accounts_made_by_the_database_and_by_the_portable_path_are_the_same_rows(monkeypatch):
    keys = every_kind_of_key()

    def rows() -> list[tuple[Any, ...]]:
        fields = ("key", "kind", "issuer_id", "person_id", "subject_ref", "holder_institution_id", "provider_id")
        return list(Account.objects.order_by("key").values_list(*fields, "redemption_id", "expires_on", "balance"))

    made = []
    for in_database in (True, False):
        monkeypatch.setattr(accounts_module, "_postgres", lambda in_database=in_database: in_database)
        try:
            with transaction.atomic():
                found = accounts_ensure(keys=keys)
                assert accounts_ensure(keys=reversed(keys)) == found  # and found again, not made twice
                made.append(rows())
                raise _Undo
        except _Undo:
            pass
    assert made[0] == made[1]
    assert len(made[0]) == len(keys)


def test_the_database_finds_an_account_that_exists_and_makes_the_one_that_does_not():
    existing = ids(AccountKey.expired(issuer_id=4))[0]
    wanted = [AccountKey.expired(issuer_id=4), AccountKey.reversed(issuer_id=4)]
    found = accounts_ensure(keys=wanted)
    assert found[wanted[0]] == existing
    assert Account.objects.get(pk=found[wanted[1]]).key == wanted[1].key


# --- The two posting engines -------------------------------------------------------------------------


def story(a: dict[str, int]) -> list[Any]:
    """Batches of every outcome over the accounts ``a``; what each answered and the books after it."""
    outcomes: list[Any] = []

    def post(*transfers: TransferSpec) -> None:
        try:
            result = transfers_post(transfers=list(transfers))
            outcomes.append(("posted", list(result.created), list(result.existing)))
        except LedgerError as error:
            outcomes.append((type(error).__name__, error.message, error.extra))
        outcomes.append(books())

    def move(key: str, *legs: tuple[str, int], kind: str = "credit", **metadata: Any) -> TransferSpec:
        return TransferSpec(
            idempotency_key=key, kind=kind, legs=[(a[name], mg) for name, mg in legs], metadata=metadata
        )

    credit_1 = move("credit:1", ("out 1", -5_000), ("lot 1 nov", 5_000), inbox_id=1)
    credit_2 = move("credit:2", ("out 2", -7_000), ("lot 2 dec", 7_000), inbox_id=2, note="ü ✓")
    credit_3 = move("credit:3", ("out 1", -3_000), ("lot 1 dec", 1_000), ("lot 1 nov", 2_000))
    post(credit_2, credit_1, credit_3)  # a batch, its keys not in key order
    post(credit_1, move("credit:4", ("out 1", -1), ("lot 1 nov", 1)), credit_1)  # a repeat, a new one, a repeat in it
    # Spending before the credit that covers it, in one batch: refused, though it nets out.
    post(
        move("spend:1", ("lot 2 nov", -100), ("expired 2", 100), kind="expire"),
        move("credit:5", ("out 2", -100), ("lot 2 nov", 100)),
    )
    # The first transfer that breaks a rule is refused, with the first rule it breaks.
    post(
        move("credit:6", ("out 1", -10), ("lot 1 nov", 10)),
        move("cross:1", ("lot 1 nov", -20_000), ("lot 2 nov", 20_000), kind="adjust"),  # issuers, and short
        move("short:1", ("lot 2 dec", -8_000), ("expired 2", 8_000), kind="expire"),
    )
    post(move("short:2", ("lot 1 nov", -9_000), ("lot 1 dec", -9_000), ("expired 1", 18_000), kind="expire"))
    post(move("short:3", ("expired 1", -9_000), ("out 1", 9_000), kind="adjust"))  # short and above zero: short first
    post(move("above:1", ("debt 1", -10_000), ("out 1", 10_000), kind="adjust"))  # outstanding above zero
    post(move("above:2", ("lot 2 dec", -10), ("debt 2", 10), kind="reverse"))  # a debt above zero
    post(move("unknown:1", ("out 1", -10), ("nowhere", 10)))
    post(move("credit:8", ("out 1", -10), ("lot 1 nov", 10)), move("unknown:2", ("out 1", -10), ("nowhere", 10)))
    post(move("netted:1", ("lot 2 dec", -500), ("lot 2 dec", 200), ("expired 2", 300), kind="expire"))
    # Spending after the credit that covers it, in one batch: posted (the lot is empty before the batch).
    post(
        move("credit:7", ("out 2", -100), ("lot 2 nov", 100)),
        move("spend:2", ("lot 2 nov", -100), ("expired 2", 100), kind="expire"),
    )
    return outcomes


def books() -> dict[str, Any]:
    keys = dict(Transfer.objects.values_list("id", "idempotency_key"))
    return {
        "transfers": list(Transfer.objects.order_by("id").values_list("idempotency_key", "kind", "metadata")),
        "postings": [
            (keys[t], account, amount)
            for t, account, amount in Posting.objects.order_by("id").values_list("transfer_id", "account_id", "amount")
        ],
        "balances": list(Account.objects.order_by("id").values_list("id", "balance")),
        "check": ledger_check(),
    }


@pytest.fixture
def accounts() -> dict[str, int]:
    named = {
        "out 1": AccountKey.issuer_outstanding(issuer_id=1),
        "out 2": AccountKey.issuer_outstanding(issuer_id=2),
        "lot 1 nov": AccountKey.wallet_lot(person_id=7, issuer_id=1, expires_on=NOV),
        "lot 1 dec": AccountKey.wallet_lot(person_id=7, issuer_id=1, expires_on=DEC),
        "lot 2 nov": AccountKey.wallet_lot(person_id=7, issuer_id=2, expires_on=NOV),
        "lot 2 dec": AccountKey.wallet_lot(person_id=7, issuer_id=2, expires_on=DEC),
        "expired 1": AccountKey.expired(issuer_id=1),
        "expired 2": AccountKey.expired(issuer_id=2),
        "debt 1": AccountKey.person_debt(person_id=7, issuer_id=1),
        "debt 2": AccountKey.person_debt(person_id=7, issuer_id=2),
    }
    found = accounts_ensure(keys=named.values())
    return {**{name: found[key] for name, key in named.items()}, "nowhere": 10**12}


def test_the_database_engine_and_the_portable_engine_answer_and_write_the_same(monkeypatch, accounts):
    runs = []
    for engine in (engines._post_in_database, engines._post_portable):
        monkeypatch.setattr(engines, "_engine", lambda engine=engine: engine)
        try:
            with transaction.atomic():
                runs.append(story(accounts))
                raise _Undo
        except _Undo:
            pass
    in_database, portable = runs
    assert in_database == portable
    # And the story did what it says: each outcome, and nothing of a refused batch written.
    answers = in_database[::2]
    assert [answer[0] for answer in answers] == [
        *("posted", "posted", "InsufficientBalance", "CrossIssuerTransfer", "InsufficientBalance"),
        *("InsufficientBalance", "BalanceOutOfRange", "BalanceOutOfRange", "UnknownAccount", "UnknownAccount"),
        *("posted", "posted"),
    ]
    assert answers[0][1:] == (["credit:2", "credit:1", "credit:3"], [])
    assert answers[1][1:] == (["credit:4"], ["credit:1"])
    assert answers[2][2] == {"key": "spend:1", "account_id": accounts["lot 2 nov"], "shortfall": 100}
    assert answers[3][2] == {"key": "cross:1", "per_issuer": {"1": -20_000, "2": 20_000}}
    assert answers[4][2]["account_id"] == min(accounts["lot 1 nov"], accounts["lot 1 dec"])
    assert answers[5][2]["account_id"] == accounts["expired 1"]
    assert answers[6][2] == {"key": "above:1", "account_id": accounts["out 1"], "excess": 1_999}
    assert answers[8][2] == answers[9][2] == {"account_ids": [10**12]}
    books_after = in_database[1::2]
    assert all(books_after[n] == books_after[1] for n in range(2, 10))  # refusals wrote nothing
    assert [p[0] for p in books_after[0]["postings"]] == ["credit:2"] * 2 + ["credit:1"] * 2 + ["credit:3"] * 3
    assert books_after[-1]["check"] == []


def test_an_unbalanced_transfer_from_sql_is_refused_as_transfers_post_refuses_it():
    """Python callers never reach ``ledger_post`` with an unbalanced transfer; SQL callers may."""
    lot, out = ids(
        AccountKey.wallet_lot(person_id=7, issuer_id=1, expires_on=NOV), AccountKey.issuer_outstanding(issuer_id=1)
    )
    spec = TransferSpec(idempotency_key="lopsided", kind="credit", legs=[(out, -100), (lot, 90)])
    with pytest.raises(UnbalancedTransfer) as from_python:
        transfers_post(transfers=[spec])
    with pytest.raises(DatabaseError) as from_sql, transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT * FROM ledger_post(now(), %s::text[], %s::text[], %s::jsonb, %s::integer[], %s::bigint[],"
            " %s::bigint[])",
            [["lopsided"], ["credit"], json.dumps([{}]), [1, 1], [out, lot], [-100, 90]],
        )
    refused = ledger_refusal(from_sql.value)
    assert isinstance(refused, UnbalancedTransfer)
    assert (refused.message, refused.extra) == (from_python.value.message, from_python.value.extra)
    assert not Transfer.objects.exists()


def test_a_database_error_that_is_no_refusal_stays_what_it_is():
    with pytest.raises(DatabaseError) as raised, transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT 1 / 0")
    assert ledger_refusal(raised.value) is None


def test_a_persons_lots_are_read_in_sql_as_in_python():
    """``ledger_person_lots`` (for other apps' SQL) and ``person_lots``: lots with points, debts, nothing else."""
    named = {
        "full": AccountKey.wallet_lot(person_id=7, issuer_id=1, expires_on=NOV),
        "empty": AccountKey.wallet_lot(person_id=7, issuer_id=1, expires_on=DEC),
        "lapsed": AccountKey.wallet_lot(person_id=7, issuer_id=2, expires_on=date(2020, 1, 31)),
        "debt": AccountKey.person_debt(person_id=7, issuer_id=2),
        "settled debt": AccountKey.person_debt(person_id=7, issuer_id=1),
        "someone else's": AccountKey.wallet_lot(person_id=8, issuer_id=1, expires_on=NOV),
    }
    a = accounts_ensure(keys=named.values())
    out_1, out_2, back_2 = ids(
        AccountKey.issuer_outstanding(issuer_id=1),
        AccountKey.issuer_outstanding(issuer_id=2),
        AccountKey.reversed(issuer_id=2),
    )
    transfers_post(
        transfers=[
            TransferSpec("c1", "credit", [(out_1, -500), (a[named["full"]], 500)]),
            TransferSpec("c2", "credit", [(out_2, -300), (a[named["lapsed"]], 300)]),
            TransferSpec("c3", "credit", [(out_1, -100), (a[named["someone else's"]], 100)]),
            TransferSpec("r1", "reverse", [(a[named["debt"]], -40), (back_2, 40)]),
        ]
    )
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, kind, issuer_id, expires_on, balance FROM ledger_person_lots(7)")
        in_sql = sorted(cursor.fetchall())
    assert in_sql == sorted(person_lots(person_id=7))
    assert [row[0] for row in in_sql] == sorted(a[named[n]] for n in ("full", "lapsed", "debt"))


def test_the_database_makes_new_accounts_and_finds_existing_ones_in_the_order_given():
    """``ledger_accounts_ensure`` as other apps' SQL calls it: new, existing and repeated identities."""
    (existing,) = ids(AccountKey.expired(issuer_id=4))
    wanted = [
        AccountKey.redemption_hold(redemption_id=9, issuer_id=3),
        AccountKey.expired(issuer_id=4),
        AccountKey.redemption_hold(redemption_id=9, issuer_id=1),
        AccountKey.redemption_hold(redemption_id=9, issuer_id=3),
    ]
    columns = [
        [getattr(k, name) for k in wanted]
        for name in ("kind", "issuer_id", "person_id", "subject_ref", "expires_on", "redemption_id")
    ]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT account_keys, account_ids FROM ledger_accounts_ensure(%s::text[], %s::bigint[], %s::bigint[],"
            " %s::text[], %s::date[], %s::bigint[], %s::bigint[], %s::bigint[], now())",
            [*columns, [None] * 4, [None] * 4],
        )
        keys, made = cursor.fetchone()
    assert keys == [k.key for k in wanted]
    assert made[1] == existing and made[0] == made[3] and len(set(made)) == 3
    assert dict(Account.objects.filter(pk__in=made).values_list("pk", "key")) == dict(zip(made, keys, strict=True))
