"""The posting engine: idempotency, netting, refusals that write nothing, and concurrent batches."""

from __future__ import annotations

import random
import threading
import time
from datetime import date

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from ledger.exceptions import (
    BalanceOutOfRange,
    CrossIssuerTransfer,
    InsufficientBalance,
    InvalidAccount,
    InvalidTransfer,
    UnbalancedTransfer,
    UnknownAccount,
)
from ledger.models import Account, Posting, Transfer
from ledger.selectors import ledger_check
from ledger.services import AccountKey, PostResult, TransferSpec, accounts_ensure, lot_expiry, transfers_post
from tests.conftest import run_together
from tests.ledger.conftest import DEC, NOV, credit, ids, outstanding, wallet_lot


def balance(account_id: int) -> int:
    return Account.objects.get(pk=account_id).balance


def snapshot() -> tuple[int, int, list[tuple[int, int]]]:
    return (
        Transfer.objects.count(),
        Posting.objects.count(),
        list(Account.objects.order_by("id").values_list("id", "balance")),
    )


# --- Accounts -----------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_accounts_ensure_creates_once_and_returns_the_same_ids():
    keys = [
        AccountKey.issuer_outstanding(issuer_id=3),
        AccountKey.wallet_lot(person_id=12, issuer_id=3, expires_on=NOV),
        AccountKey.holding_lot(issuer_id=3, holder_institution_id=3, subject_ref="ab" * 32, expires_on=NOV),
        AccountKey.redemption_hold(redemption_id=9, issuer_id=3),
        AccountKey.redeemed(provider_id=4, issuer_id=3),
        AccountKey.expired(issuer_id=3),
        AccountKey.reversed(issuer_id=3),
        AccountKey.person_debt(person_id=12, issuer_id=3),
        AccountKey.subject_debt(issuer_id=3, holder_institution_id=3, subject_ref="ab" * 32),
    ]
    first = accounts_ensure(keys=keys)
    again = accounts_ensure(keys=reversed(keys))
    assert first == again
    assert Account.objects.count() == len(keys)
    assert AccountKey.wallet_lot(person_id=12, issuer_id=3, expires_on=NOV).key == "wallet_lot:p=12:i=3:e=2028-11-30"
    stored = dict(Account.objects.values_list("id", "key"))
    assert {stored[account_id] for account_id in first.values()} == {k.key for k in keys}
    # A plain-string kind is the same key as the enum member (dict lookups must agree).
    assert first[AccountKey("wallet_lot", 3, person_id=12, expires_on=NOV)] == first[keys[1]]


def test_account_keys_refuse_incomplete_or_foreign_identities():
    with pytest.raises(InvalidAccount, match="expires_on"):
        AccountKey("wallet_lot", 3, person_id=12)
    with pytest.raises(InvalidAccount, match="last day"):
        AccountKey.wallet_lot(person_id=12, issuer_id=3, expires_on=date(2028, 11, 29))
    with pytest.raises(InvalidAccount, match="has no person_id"):
        AccountKey("issuer_outstanding", 3, person_id=12)
    with pytest.raises(InvalidAccount, match="Unknown account kind"):
        AccountKey("savings", 3)
    with pytest.raises(InvalidAccount, match="subject_ref"):
        AccountKey.holding_lot(issuer_id=3, holder_institution_id=3, subject_ref="a:b", expires_on=NOV)
    assert lot_expiry(date(2028, 2, 3)) == date(2028, 2, 29)


# --- Idempotency --------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_same_key_twice_posts_once():
    lot = wallet_lot(1, issuer=1)
    first = transfers_post(transfers=[credit("activity:1", issuer=1, lot=lot, amount=1500)])
    again = transfers_post(transfers=[credit("activity:1", issuer=1, lot=lot, amount=1500)])
    assert first.created == {"activity:1": first.transfer_ids["activity:1"]}
    assert again == PostResult(created={}, existing=first.created)
    assert balance(lot) == 1500
    assert balance(outstanding(1)) == -1500
    assert Posting.objects.count() == 2


@pytest.mark.django_db
def test_a_repeat_returns_the_original_whatever_its_legs():
    lot = wallet_lot(1, issuer=1)
    original = transfers_post(transfers=[credit("activity:1", issuer=1, lot=lot, amount=1500)])
    repeat = transfers_post(transfers=[credit("activity:1", issuer=1, lot=lot, amount=9999)])
    assert repeat.existing == original.created
    assert balance(lot) == 1500


@pytest.mark.django_db
def test_a_key_repeated_in_one_batch_posts_once():
    lot = wallet_lot(1, issuer=1)
    result = transfers_post(
        transfers=[
            credit("activity:1", issuer=1, lot=lot, amount=100),
            credit("activity:2", issuer=1, lot=lot, amount=200),
            credit("activity:1", issuer=1, lot=lot, amount=100),
        ]
    )
    assert list(result.created) == ["activity:1", "activity:2"]
    assert result.existing == {"activity:1": result.created["activity:1"]}
    assert balance(lot) == 300


@pytest.mark.django_db
def test_mixed_batch_posts_only_the_new_keys():
    lot = wallet_lot(1, issuer=1)
    transfers_post(transfers=[credit("activity:1", issuer=1, lot=lot, amount=100)])
    result = transfers_post(transfers=[credit(f"activity:{n}", issuer=1, lot=lot, amount=100) for n in range(1, 4)])
    assert list(result.created) == ["activity:2", "activity:3"]
    assert list(result.existing) == ["activity:1"]
    assert balance(lot) == 300
    assert Transfer.objects.count() == 3


# --- Netting ------------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_batch_nets_a_hot_issuer_account_into_one_update():
    issuer = outstanding(1)
    lots = [wallet_lot(person, issuer=1) for person in range(200)]
    transfers = [credit(f"activity:{n}", issuer=1, lot=lots[n % 200], amount=1000 + n) for n in range(500)]
    updated_before = account_rows_updated()
    with CaptureQueriesContext(connection) as queries:
        result = transfers_post(transfers=transfers)
    assert len(result.created) == 500
    assert balance(issuer) == -sum(1000 + n for n in range(500))
    assert sum(Account.objects.filter(pk__in=lots).values_list("balance", flat=True)) == -balance(issuer)
    if connection.vendor == "postgresql":
        # Inside ledger_post: each of the 201 accounts' rows written once for the batch (the statistics
        # of this transaction count row versions written), not once per transfer.
        assert account_rows_updated() - updated_before == 201
    else:
        hot_updates = [
            q["sql"] for q in queries.captured_queries if q["sql"].startswith("UPDATE") and "ledger_account" in q["sql"]
        ]
        assert len(hot_updates) == 201  # SQLite: one per touched account, still one per account per batch
    assert ledger_check() == []


def account_rows_updated() -> int:
    """Rows of ``ledger_account`` updated so far in this transaction (PostgreSQL's per-transaction statistics)."""
    if connection.vendor != "postgresql":
        return 0
    with connection.cursor() as cursor:
        cursor.execute("SELECT n_tup_upd FROM pg_stat_xact_user_tables WHERE relname = 'ledger_account'")
        return int(cursor.fetchone()[0])


# --- Refusals write nothing ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_insufficient_balance_is_refused_and_nothing_is_written():
    issuer, lot, other = outstanding(1), wallet_lot(1, issuer=1), wallet_lot(2, issuer=1)
    transfers_post(transfers=[credit("activity:1", issuer=1, lot=lot, amount=1000)])
    before = snapshot()
    with pytest.raises(InsufficientBalance) as refused:
        transfers_post(
            transfers=[
                credit("activity:2", issuer=1, lot=other, amount=50),  # fine on its own
                TransferSpec("move:1", "consolidate", [(lot, -600), (other, 600)]),
                TransferSpec("move:2", "consolidate", [(lot, -600), (other, 600)]),  # 1000 - 1200 < 0
            ]
        )
    assert refused.value.code == "insufficient-balance"
    assert refused.value.extra == {"key": "move:2", "account_id": lot, "shortfall": 200}
    assert snapshot() == before
    assert balance(issuer) == -1000


@pytest.mark.django_db
def test_transfers_apply_in_the_order_given():
    lot, other = wallet_lot(1, issuer=1), wallet_lot(2, issuer=1)
    # Credit then spend in one batch is fine ...
    transfers_post(
        transfers=[
            credit("activity:1", issuer=1, lot=lot, amount=500),
            TransferSpec("move:1", "consolidate", [(lot, -500), (other, 500)]),
        ]
    )
    # ... spend before the credit that would cover it is not, even though the batch nets out.
    with pytest.raises(InsufficientBalance):
        transfers_post(
            transfers=[
                TransferSpec("move:2", "consolidate", [(other, -800), (lot, 800)]),
                credit("activity:2", issuer=1, lot=other, amount=300),
            ]
        )
    assert (balance(lot), balance(other)) == (0, 500)


@pytest.mark.django_db
def test_malformed_transfers_are_refused_before_the_database():
    issuer, lot = outstanding(1), wallet_lot(1, issuer=1)
    cases = [
        (UnbalancedTransfer, TransferSpec("k", "credit", [(issuer, -5), (lot, 4)])),
        (UnbalancedTransfer, TransferSpec("k", "credit", [])),
        (InvalidTransfer, TransferSpec("k", "credit", [(issuer, 0), (lot, 0)])),
        (InvalidTransfer, TransferSpec("k", "credit", [(issuer, -1.5), (lot, 1.5)])),  # type: ignore[list-item]
        (InvalidTransfer, TransferSpec("k", "gift", [(issuer, -5), (lot, 5)])),
        (InvalidTransfer, TransferSpec("", "credit", [(issuer, -5), (lot, 5)])),
        (InvalidTransfer, TransferSpec("k" * 201, "credit", [(issuer, -5), (lot, 5)])),
        (InvalidTransfer, TransferSpec("k", "credit", [(issuer, -5), (lot, 5)], {"blob": "x" * 5000})),
    ]
    for error, spec in cases:
        with pytest.raises(error), CaptureQueriesContext(connection) as queries:
            transfers_post(transfers=[spec])
        assert queries.captured_queries == [], spec
    assert not Transfer.objects.exists()


@pytest.mark.django_db
def test_refusals_under_lock():
    issuer_a, lot_a, lot_b = outstanding(1), wallet_lot(1, issuer=1), wallet_lot(1, issuer=2)
    debt = ids(AccountKey.person_debt(person_id=1, issuer_id=1))[0]
    transfers_post(transfers=[credit("activity:1", issuer=1, lot=lot_a, amount=100)])
    before = snapshot()
    with pytest.raises(CrossIssuerTransfer):  # points never change issuer
        transfers_post(transfers=[TransferSpec("x", "consolidate", [(lot_a, -100), (lot_b, 100)])])
    with pytest.raises(UnknownAccount):
        transfers_post(transfers=[TransferSpec("x", "credit", [(issuer_a, -100), (999_999, 100)])])
    with pytest.raises(BalanceOutOfRange):  # outstanding may only go down
        transfers_post(transfers=[TransferSpec("x", "adjust", [(issuer_a, 150), (debt, -150)])])  # -100 + 150 > 0
    assert snapshot() == before


@pytest.mark.django_db
def test_a_caught_refusal_leaves_the_callers_transaction_usable():
    lot = wallet_lot(1, issuer=1)
    with transaction.atomic():
        transfers_post(transfers=[credit("activity:1", issuer=1, lot=lot, amount=100)])
        with pytest.raises(InsufficientBalance):
            transfers_post(
                transfers=[
                    credit("activity:2", issuer=1, lot=lot, amount=100),
                    TransferSpec("move", "consolidate", [(lot, -500), (wallet_lot(2, issuer=1), 500)]),
                ]
            )
        transfers_post(transfers=[credit("activity:3", issuer=1, lot=lot, amount=1)])
    assert sorted(Transfer.objects.values_list("idempotency_key", flat=True)) == ["activity:1", "activity:3"]
    assert balance(lot) == 101


@pytest.mark.django_db
def test_debt_after_reversing_spent_points():
    """A reversal takes what is left in the lot and books the rest as the holder's debt."""
    issuer, lot = outstanding(1), wallet_lot(7, issuer=1)
    redeemed, reversed_, debt = ids(
        AccountKey.redeemed(provider_id=2, issuer_id=1),
        AccountKey.reversed(issuer_id=1),
        AccountKey.person_debt(person_id=7, issuer_id=1),
    )
    transfers_post(
        transfers=[
            credit("activity:1", issuer=1, lot=lot, amount=1000),
            TransferSpec("capture:1", "capture", [(lot, -700), (redeemed, 700)]),
            TransferSpec("reverse:1", "reverse", [(lot, -300), (debt, -700), (reversed_, 1000)]),
        ]
    )
    assert (balance(issuer), balance(lot), balance(redeemed), balance(debt), balance(reversed_)) == (
        -1000,
        0,
        700,
        -700,
        1000,
    )
    assert ledger_check() == []


# --- Concurrency (PostgreSQL, real threads) -------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_concurrent_batches_with_overlapping_accounts_do_not_deadlock():
    issuers = [1, 2, 3]
    lots = {
        (issuer, person, month): wallet_lot(person, issuer, month)
        for issuer in issuers
        for person in range(8)
        for month in (NOV, DEC)
    }
    transfers_post(transfers=[credit(f"seed:{k}", issuer=k[0], lot=lot, amount=1_000_000) for k, lot in lots.items()])
    issuer_accounts = {issuer: outstanding(issuer) for issuer in issuers}

    def batch(worker: int, number: int) -> list[TransferSpec]:
        rng = random.Random(worker * 1000 + number)
        specs = []
        for n in range(150):
            issuer = rng.choice(issuers)
            a, b = rng.sample([lot for (i, _, _), lot in lots.items() if i == issuer], 2)
            amount = rng.randint(1, 50)
            if rng.random() < 0.4:
                legs = [(issuer_accounts[issuer], -amount), (a, amount)]
                kind = "credit"
            else:
                legs = [(a, -amount), (b, amount)]
                kind = "consolidate"
            rng.shuffle(legs)  # the lock order must come from the service, not from the caller
            specs.append(TransferSpec(f"w{worker}:b{number}:{n}", kind, legs))
        return specs

    def worker(index: int) -> None:
        for number in range(10):
            transfers_post(transfers=batch(index, number))

    _, errors = run_together(4, worker)
    assert errors == []
    assert Transfer.objects.count() == len(lots) + 4 * 10 * 150
    assert ledger_check() == []  # stored balances equal posting sums, every transfer balanced


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_a_key_a_concurrent_transaction_is_inserting_ends_as_existing():
    """B posts the keys A has inserted but not committed: B waits on A's keys, then reports them existing."""
    lot = wallet_lot(1, issuer=1)
    transfers = [credit(f"activity:{n}", issuer=1, lot=lot, amount=100) for n in range(5)]
    a_posted, a_may_commit = threading.Event(), threading.Event()
    results: dict[str, PostResult] = {}

    def body(index: int) -> None:
        if index == 0:
            with transaction.atomic():
                results["a"] = transfers_post(transfers=transfers)
                a_posted.set()
                assert a_may_commit.wait(60)
        else:
            assert a_posted.wait(60)
            results["b"] = transfers_post(transfers=list(reversed(transfers)))

    errors: list[BaseException] = []

    def release_when_b_waits() -> None:
        # B is blocked once PostgreSQL shows a backend waiting on a lock in its posting call: with no
        # transfer of its own to write, all ledger_post could wait on is the keys A is inserting.
        try:
            assert a_posted.wait(60)
            for _ in range(600):
                with connection.cursor() as cursor:
                    cursor.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock' AND query LIKE %s",
                        ["%FROM ledger_post(%"],
                    )
                    if cursor.fetchone()[0]:
                        break
                time.sleep(0.05)
            else:
                raise AssertionError("B never waited on A's keys")
        finally:
            a_may_commit.set()
            connection.close()

    releaser = threading.Thread(target=lambda: errors.extend(_catch(release_when_b_waits)))
    releaser.start()
    errors += run_together(2, body)[1]
    releaser.join(60)
    assert errors == []
    assert list(results["a"].created) == [t.idempotency_key for t in transfers]
    assert results["b"].created == {}
    assert results["b"].existing == {k: results["a"].created[k] for k in reversed(list(results["a"].created))}
    assert balance(lot) == 500
    assert Posting.objects.count() == 10


def _catch(function) -> list[BaseException]:
    try:
        function()
    except BaseException as exc:
        return [exc]
    return []
