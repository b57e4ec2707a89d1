"""Every invariant attacked directly with SQL, bypassing the services: PostgreSQL itself refuses."""

from __future__ import annotations

import pytest
from django.db import DatabaseError, IntegrityError, connection, transaction

from clearinghouse.keys import hub_signer
from ledger.models import Account, Block, Posting, Transfer
from ledger.services import TransferSpec, blocks_seal, transfers_post
from tests.ledger.conftest import credit, outstanding, wallet_lot

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True, serialized_rollback=True)]


def sql(statement: str, params: list | None = None) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(statement, params or [])
        return cursor.fetchall() if cursor.description else []


def raw_transfer(key: str) -> int:
    return sql(
        "INSERT INTO ledger_transfer (idempotency_key, kind, metadata, created_at) "
        "VALUES (%s, 'adjust', '{}', now()) RETURNING id",
        [key],
    )[0][0]


def raw_posting(transfer_id: int, account_id: int, amount: int) -> None:
    sql(
        "INSERT INTO ledger_posting (transfer_id, account_id, amount, created_at) VALUES (%s, %s, %s, now())",
        [transfer_id, account_id, amount],
    )


def test_unbalanced_transfer_is_refused_at_commit():
    lot = wallet_lot(1, issuer=1)
    with pytest.raises(IntegrityError, match="sum to 500, not zero"), transaction.atomic():
        raw_posting(raw_transfer("raw:unbalanced"), lot, 500)
        # The statement itself went through: the check is deferred to the commit.
        assert Posting.objects.filter(transfer__idempotency_key="raw:unbalanced").count() == 1
    assert not Transfer.objects.filter(idempotency_key="raw:unbalanced").exists()
    assert not Posting.objects.exists()


def test_balanced_legs_in_separate_statements_commit():
    """Deferred, not immediate: legs may arrive one statement at a time as long as they balance at commit."""
    issuer, lot = outstanding(1), wallet_lot(1, issuer=1)
    with transaction.atomic():
        transfer_id = raw_transfer("raw:balanced")
        raw_posting(transfer_id, lot, 500)
        raw_posting(transfer_id, issuer, -500)
    assert Posting.objects.filter(transfer_id=transfer_id).count() == 2


def test_posting_into_an_old_transfer_is_refused_at_commit():
    lot = wallet_lot(1, issuer=1)
    result = transfers_post(transfers=[credit("c1", issuer=1, lot=lot, amount=700)])
    with pytest.raises(IntegrityError, match="not zero"), transaction.atomic():
        raw_posting(result.created["c1"], lot, 1)
    assert Posting.objects.count() == 2


def test_negative_lot_is_refused_by_check_constraint():
    lot = wallet_lot(1, issuer=1)
    transfers_post(transfers=[credit("c1", issuer=1, lot=lot, amount=700)])
    with pytest.raises(IntegrityError, match="ledger_account_balance_sign"), transaction.atomic():
        sql("UPDATE ledger_account SET balance = -1 WHERE id = %s", [lot])
    with pytest.raises(IntegrityError, match="ledger_account_balance_sign"), transaction.atomic():
        sql("UPDATE ledger_account SET balance = 1 WHERE id = %s", [outstanding(1)])
    assert Account.objects.get(pk=lot).balance == 700


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE ledger_posting SET amount = amount * 2 WHERE transfer_id = %s",
        "UPDATE ledger_posting SET account_id = account_id WHERE transfer_id = %s",
        "DELETE FROM ledger_posting WHERE transfer_id = %s",
    ],
)
def test_postings_are_append_only(statement):
    lot = wallet_lot(1, issuer=1)
    transfer_id = transfers_post(transfers=[credit("c1", issuer=1, lot=lot, amount=700)]).created["c1"]
    with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
        sql(statement, [transfer_id])
    assert sorted(Posting.objects.values_list("amount", flat=True)) == [-700, 700]


def test_posting_amount_zero_is_refused():
    lot = wallet_lot(1, issuer=1)
    with pytest.raises(IntegrityError, match="ledger_posting_amount_nonzero"), transaction.atomic():
        raw_posting(raw_transfer("raw:zero"), lot, 0)


def test_transfers_are_append_only_except_being_sealed_once():
    lot = wallet_lot(1, issuer=1)
    transfer_id = transfers_post(transfers=[credit("c1", issuer=1, lot=lot, amount=700)]).created["c1"]
    for statement in (
        "UPDATE ledger_transfer SET idempotency_key = 'other' WHERE id = %s",
        "UPDATE ledger_transfer SET metadata = '{\"x\": 1}' WHERE id = %s",
        "DELETE FROM ledger_transfer WHERE id = %s",
    ):
        with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
            sql(statement, [transfer_id])

    first = blocks_seal(signer=hub_signer())  # the one permitted write: block_id from NULL, once
    assert first is not None
    transfers_post(transfers=[credit("c2", issuer=1, lot=lot, amount=1)])
    second = blocks_seal(signer=hub_signer())
    assert second is not None
    with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
        sql("UPDATE ledger_transfer SET block_id = %s WHERE id = %s", [second.pk, transfer_id])
    with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
        sql("UPDATE ledger_transfer SET block_id = NULL WHERE id = %s", [transfer_id])
    assert Transfer.objects.get(pk=transfer_id).block_id == first.pk


def test_a_transfer_is_never_born_sealed():
    lot = wallet_lot(1, issuer=1)
    transfers_post(transfers=[credit("c1", issuer=1, lot=lot, amount=700)])
    block = blocks_seal(signer=hub_signer())
    assert block is not None
    with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
        sql(
            "INSERT INTO ledger_transfer (idempotency_key, kind, metadata, created_at, block_id) "
            "VALUES ('raw:sealed', 'adjust', '{}', now(), %s)",
            [block.pk],
        )


def test_blocks_are_append_only():
    lot = wallet_lot(1, issuer=1)
    transfers_post(transfers=[credit("c1", issuer=1, lot=lot, amount=700)])
    block = blocks_seal(signer=hub_signer())
    assert block is not None
    for statement in (
        "UPDATE ledger_block SET merkle_root = repeat('0', 64) WHERE id = %s",
        "DELETE FROM ledger_block WHERE id = %s",
    ):
        with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
            sql(statement, [block.pk])
    assert Block.objects.get(pk=block.pk).merkle_root == block.merkle_root


def test_accounts_keep_their_identity_and_are_never_deleted():
    lot = wallet_lot(1, issuer=1)
    for statement in (
        "UPDATE ledger_account SET key = 'wallet_lot:p=2:i=1:e=2028-11-30' WHERE id = %s",
        "UPDATE ledger_account SET issuer_id = 2 WHERE id = %s",
        "DELETE FROM ledger_account WHERE id = %s",
    ):
        with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
            sql(statement, [lot])
    with transaction.atomic():  # the balance is the one column that moves (and the service moves it)
        sql("UPDATE ledger_account SET balance = 5 WHERE id = %s", [lot])
    assert Account.objects.get(pk=lot).balance == 5


def test_idempotency_key_is_unique_in_the_database():
    raw_transfer("raw:once")
    with pytest.raises(IntegrityError, match="ledger_transfer_key_unique"), transaction.atomic():
        raw_transfer("raw:once")


def test_account_identity_constraint():
    with pytest.raises(IntegrityError, match="ledger_account_identity"), transaction.atomic():
        # A wallet lot with no person.
        sql(
            "INSERT INTO ledger_account (kind, key, issuer_id, subject_ref, balance, created_at, expires_on) "
            "VALUES ('wallet_lot', 'wallet_lot:x', 1, '', 0, now(), '2028-11-30')"
        )


def test_service_checks_hold_without_the_database():
    """The same rules, refused by the service before PostgreSQL sees them (as on SQLite)."""
    from ledger.exceptions import InsufficientBalance, UnbalancedTransfer

    issuer, lot = outstanding(1), wallet_lot(1, issuer=1)
    with pytest.raises(UnbalancedTransfer):
        transfers_post(transfers=[TransferSpec("bad", "adjust", [(issuer, -5), (lot, 4)])])
    with pytest.raises(InsufficientBalance):
        transfers_post(transfers=[TransferSpec("bad", "adjust", [(issuer, 5), (lot, -5)])])
    assert not Transfer.objects.exists()


def test_deferred_errors_surface_as_database_errors():
    """Whatever the failure, the caller's transaction is rolled back whole: no half-written transfer."""
    lot = wallet_lot(1, issuer=1)
    with pytest.raises(DatabaseError), transaction.atomic():
        transfers_post(transfers=[credit("c1", issuer=1, lot=lot, amount=700)])
        raw_posting(raw_transfer("raw:unbalanced"), lot, 1)
    assert not Transfer.objects.exists()
    assert Account.objects.get(pk=lot).balance == 0
