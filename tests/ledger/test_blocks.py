"""Sealed blocks: seal and verify, and every kind of tampering caught by ``ledger_verify``."""

from __future__ import annotations

import base64
import threading
from io import StringIO

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from django.core.management import CommandError, call_command
from django.db import connection

from clearinghouse.keys import hub_signer
from ledger import merkle
from ledger.models import Block, Posting, Transfer
from ledger.selectors import block_verify, blocks_verify
from ledger.services import blocks_seal, transfers_post
from ledger.tasks import blocks_seal_recent
from tests.ledger.conftest import credit, wallet_lot


def post_credits(count: int, *, prefix: str = "activity") -> None:
    lots = [wallet_lot(person, issuer=1 + person % 2) for person in range(4)]
    transfers_post(
        transfers=[
            credit(f"{prefix}:{n}", issuer=1 + (n % 4) % 2, lot=lots[n % 4], amount=1000 + n) for n in range(count)
        ]
    )


def verify() -> tuple[int, str]:
    """Run ``ledger_verify``; (exit code, output)."""
    out = StringIO()
    try:
        call_command("ledger_verify", stdout=out, verbosity=2)
    except CommandError as exc:
        return exc.returncode, out.getvalue() + str(exc)
    return 0, out.getvalue()


def sql(statement: str, params: list | None = None) -> None:
    with connection.cursor() as cursor:
        cursor.execute(statement, params or [])


def tamper(table: str, trigger: str, statement: str, params: list | None = None) -> None:
    """What an attacker with database access does: switch the guard off, write, switch it back on."""
    if connection.vendor == "postgresql":
        # The test's own transaction still has deferred checks pending (ALTER TABLE refuses to run then):
        # run them now, as a commit would.
        sql("SET CONSTRAINTS ALL IMMEDIATE")
        sql(f"ALTER TABLE {table} DISABLE TRIGGER {trigger}")
    sql(statement, params)
    if connection.vendor == "postgresql":
        sql(f"ALTER TABLE {table} ENABLE TRIGGER {trigger}")


@pytest.mark.django_db
def test_seal_then_verify():
    assert blocks_seal(signer=hub_signer()) is None  # nothing to seal
    post_credits(10)
    block = blocks_seal(signer=hub_signer())
    assert block is not None
    assert (block.height, block.prev_hash, block.entry_count, block.transfer_count) == (1, "0" * 64, 20, 10)
    assert not Transfer.objects.filter(block__isnull=True).exists()
    assert blocks_seal(signer=hub_signer()) is None

    post_credits(3, prefix="later")
    second = blocks_seal(signer=hub_signer())
    assert second is not None and second.prev_hash == block.hash and second.height == 2

    code, output = verify()
    assert code == 0, output
    assert "Blocks checked: 2; postings checked: 26" in output
    assert "Ledger verified" in output


@pytest.mark.django_db
def test_blocks_take_whole_transfers_up_to_max_entries():
    post_credits(7)
    heights = []
    while block := blocks_seal(signer=hub_signer(), max_entries=5):
        heights.append((block.height, block.transfer_count, block.entry_count))
    assert heights == [(1, 2, 4), (2, 2, 4), (3, 2, 4), (4, 1, 2)]
    report = blocks_verify()
    assert report.problems == [] and report.blocks == 4 and report.postings == 14


def test_merkle_tree_promotes_an_odd_node():
    leaves = [merkle.leaf_hash(bytes([n])) for n in range(3)]
    pair = merkle.hashlib.sha256(b"\x01" + leaves[0] + leaves[1]).digest()
    assert merkle.merkle_root(leaves) == merkle.hashlib.sha256(b"\x01" + pair + leaves[2]).hexdigest()
    # Duplicating the last leaf would give [a, b, c, c] the same root as [a, b, c]; promotion does not.
    assert merkle.merkle_root(leaves + leaves[2:]) != merkle.merkle_root(leaves)
    assert merkle.merkle_root(leaves[:1]) == leaves[0].hex()


@pytest.mark.django_db
def test_a_changed_posting_is_caught_and_names_its_block():
    post_credits(4)
    blocks_seal(signer=hub_signer())
    post_credits(4, prefix="second")
    blocks_seal(signer=hub_signer())
    victim = Posting.objects.filter(transfer__block__height=2).order_by("id").first()
    assert victim is not None
    tamper(
        "ledger_posting",
        "ledger_posting_append_only",
        "UPDATE ledger_posting SET amount = amount * 2 WHERE id = %s",
        [victim.pk],
    )
    code, output = verify()
    assert code == 1
    assert "FAILED at block 2" in output
    assert "merkle-root" in output
    assert "block 1: ok" in output
    assert "balance-mismatch" in output  # the invariant check sees it too


@pytest.mark.django_db
def test_a_deleted_posting_is_caught():
    post_credits(4)
    blocks_seal(signer=hub_signer())
    victim = Posting.objects.order_by("id").last()
    assert victim is not None
    tamper("ledger_posting", "ledger_posting_append_only", "DELETE FROM ledger_posting WHERE id = %s", [victim.pk])
    code, output = verify()
    assert code == 1
    assert "FAILED at block 1: block-entries" in output


@pytest.mark.django_db
def test_a_broken_chain_is_caught():
    for n in range(3):
        post_credits(2, prefix=f"batch{n}")
        blocks_seal(signer=hub_signer())
    tamper(
        "ledger_block",
        "ledger_block_append_only",
        "UPDATE ledger_block SET prev_hash = %s WHERE height = 2",
        ["f" * 64],
    )
    code, output = verify()
    assert code == 1
    assert "FAILED at block 2" in output
    problems, _ = block_verify(block=Block.objects.get(height=2))
    assert {p.code for p in problems} >= {"chain", "block-hash"}
    assert block_verify(block=Block.objects.get(height=3))[0] == []  # its own link still holds


@pytest.mark.django_db
def test_a_rewritten_block_signed_by_another_key_is_caught():
    """Recomputing root and hash after a change does not help: the hub's key is not the forger's."""
    post_credits(2)
    block = blocks_seal(signer=hub_signer())
    assert block is not None
    forger = Ed25519PrivateKey.generate()
    public = "whpk_" + base64.b64encode(forger.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
    tamper(
        "ledger_block",
        "ledger_block_append_only",
        "UPDATE ledger_block SET signature = %s, public_key = %s WHERE id = %s",
        [base64.b64encode(forger.sign(bytes.fromhex(block.hash))).decode(), public, block.pk],
    )
    code, output = verify()
    assert code == 1
    assert "untrusted-key" in output


@pytest.mark.django_db
def test_a_bad_signature_is_caught():
    post_credits(2)
    block = blocks_seal(signer=hub_signer())
    assert block is not None
    tamper(
        "ledger_block",
        "ledger_block_append_only",
        "UPDATE ledger_block SET signature = %s WHERE id = %s",
        [base64.b64encode(b"\x00" * 64).decode(), block.pk],
    )
    code, output = verify()
    assert code == 1 and "signature" in output


@pytest.mark.django_db
def test_verify_survives_a_key_rotation():
    from institutions.services import hub_key_rotate

    post_credits(2)
    blocks_seal(signer=hub_signer())
    hub_key_rotate()
    post_credits(2, prefix="after")
    second = blocks_seal(signer=hub_signer())
    assert second is not None
    first = Block.objects.get(height=1)
    assert first.key_id != second.key_id
    assert verify()[0] == 0


@pytest.mark.django_db
def test_beat_task_seals_everything():
    post_credits(5)
    assert blocks_seal_recent() == 1
    assert blocks_seal_recent() == 0
    assert not Transfer.objects.filter(block__isnull=True).exists()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_two_sealers_at_once_take_turns():
    post_credits(30)
    signer = hub_signer()
    results: list[Block | None] = []
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def seal() -> None:
        try:
            start.wait()
            results.append(blocks_seal(signer=signer, max_entries=40))
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=seal) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    sealed = sorted(b.height for b in results if b is not None)
    assert sealed == [1, 2]  # 60 postings, at most 40 a block: each sealer got one block
    assert not Transfer.objects.filter(block__isnull=True).exists()
    assert blocks_verify().problems == []


@pytest.mark.django_db
def test_database_and_python_write_created_at_alike():
    """Sealing on PostgreSQL formats created_at in SQL; it must be byte for byte what Python writes."""
    from datetime import UTC, datetime

    from ledger.services import leaf_rows

    post_credits(2)
    moments = [datetime(2028, 1, 2, 3, 4, 5, tzinfo=UTC), datetime(2031, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)]
    for posting, moment in zip(Posting.objects.order_by("id")[:2], moments, strict=True):
        # Rewrite created_at (trigger off) to instants whose text is easy to get wrong: no fraction, the last one.
        tamper(
            "ledger_posting",
            "ledger_posting_append_only",
            "UPDATE ledger_posting SET created_at = %s WHERE id = %s",
            [moment, posting.pk],
        )
    for posting_id, *_, created_text in leaf_rows():
        posting = Posting.objects.get(pk=posting_id)
        assert created_text == merkle.utc_text(posting.created_at)
    assert merkle.utc_text(datetime(2028, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2028-01-02T03:04:05.000000Z"


def verify_with_head(head: str) -> tuple[int, str]:
    out = StringIO()
    try:
        call_command("ledger_verify", "--expect-head", head, stdout=out)
    except CommandError as exc:
        return exc.returncode, out.getvalue() + str(exc)
    return 0, out.getvalue()


def recorded_head() -> str:
    code, output = verify()
    assert code == 0, output
    (line,) = [line for line in output.splitlines() if line.startswith("Chain head: ")]
    return line.removeprefix("Chain head: ")


@pytest.mark.django_db
def test_the_recorded_head_verifies_while_the_chain_grows():
    for n in range(2):
        post_credits(2, prefix=f"batch{n}")
        blocks_seal(signer=hub_signer())
    head = recorded_head()
    assert head == f"2:{Block.objects.get(height=2).hash}"
    post_credits(2, prefix="later")
    blocks_seal(signer=hub_signer())
    code, output = verify_with_head(head)
    assert code == 0, output
    assert "Chain head: 3:" in output


@pytest.mark.postgres
@pytest.mark.django_db
def test_deleting_the_newest_blocks_is_caught_against_the_recorded_head():
    """The chain alone cannot tell the newest blocks were removed; the head recorded outside the hub can."""
    for n in range(3):
        post_credits(2, prefix=f"batch{n}")
        blocks_seal(signer=hub_signer())
    head = recorded_head()
    sql("SET CONSTRAINTS ALL IMMEDIATE")
    sql("SET session_replication_role = replica")  # every trigger and key check off: an attacker with the database
    sql("UPDATE ledger_transfer SET block_id = NULL WHERE block_id = (SELECT id FROM ledger_block WHERE height = 3)")
    sql("DELETE FROM ledger_block WHERE height = 3")
    sql("SET session_replication_role = origin")

    assert verify()[0] == 0  # the two blocks left still chain and verify
    code, output = verify_with_head(head)
    assert code == 1
    assert f"the recorded head {head} is missing" in output


@pytest.mark.django_db
def test_a_malformed_head_is_refused():
    with pytest.raises(CommandError, match="HEIGHT:HASH"):
        call_command("ledger_verify", "--expect-head", "3:nothex", stdout=StringIO())
