"""Sealing: committed transfers go into signed Merkle blocks, chained by hash (``ledger.merkle``
documents the bytes). The caller passes the ``signer``: the hub's key is not the ledger's."""

from __future__ import annotations

import base64
from collections.abc import Collection, Sequence

from django.db import connection, transaction
from django.utils import timezone

from clearinghouse.keys import Signer
from ledger import merkle
from ledger.models import Account, Block, Posting, Transfer

# An arbitrary, fixed advisory lock id: one sealer at a time across every process.
SEAL_LOCK_ID = 0x4C45_4447_5345_414C  # "LEDGSEAL"


def _postgres() -> bool:
    return connection.vendor == "postgresql"


def blocks_seal(*, signer: Signer, max_entries: int = 10_000) -> Block | None:
    """Seal committed transfers not yet in a block into the next block; ``None`` when there are none.

    Takes whole transfers in id order until adding the next would pass ``max_entries`` postings (at
    least one transfer). The leaves are their postings in id order (``ledger.merkle`` documents the
    bytes, the tree and the header). Safe with several sealers at once: a transaction-scoped advisory
    lock makes them take turns on PostgreSQL (SQLite has one writer anyway), and ``height`` is unique.
    A transfer committed late with a lower id than sealed ones simply lands in a later block.
    """
    with transaction.atomic():
        if _postgres():
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [SEAL_LOCK_ID])
        last = Block.objects.order_by("-height").first()
        # The id of the max_entries-th unsealed transfer: every transfer needs at least one posting.
        nth = list(
            Transfer.objects.filter(block__isnull=True)
            .order_by("id")
            .values_list("id", flat=True)[max_entries - 1 : max_entries]
        )
        horizon = nth[0] if nth else None
        rows = leaf_rows(unsealed_through=horizon)
        if not rows:
            return None
        chosen: list[int] = []
        taken = 0
        index = 0
        while index < len(rows):
            transfer_id = rows[index][1]
            end = index
            while end < len(rows) and rows[end][1] == transfer_id:
                end += 1
            if chosen and taken + (end - index) > max_entries:
                break
            chosen.append(transfer_id)
            taken += end - index
            index = end
        leaves = sorted(rows[:taken], key=lambda r: r[0])
        root = leaves_root(leaves)
        block = Block(
            height=(last.height + 1) if last else 1,
            prev_hash=last.hash if last else merkle.GENESIS_PREV_HASH,
            merkle_root=root,
            transfer_count=len(chosen),
            entry_count=len(leaves),
            first_posting_id=leaves[0][0],
            last_posting_id=leaves[-1][0],
            created_at=timezone.now(),
        )
        block.hash = merkle.block_hash(block_header_of(block))
        block.key_id, block.public_key, signature = signer(bytes.fromhex(block.hash))
        block.signature = base64.b64encode(signature).decode()
        block.save(force_insert=True)
        sealed = _transfers_mark_sealed(block.pk, chosen)
        if sealed != len(chosen):  # another sealer got them: cannot happen under the lock
            raise RuntimeError(f"blocks_seal: sealed {sealed} of {len(chosen)} transfers; rolled back.")
        return block


# (posting id, transfer id, transfer idempotency key, account key, amount, created_at as merkle.utc_text)
LeafRow = tuple[int, int, str, str, int, str]


def leaf_rows(*, block_id: int | None = None, unsealed_through: int | None = None) -> list[LeafRow]:
    """The postings of block ``block_id`` in posting-id order or, without it, of the transfers not yet
    sealed (up to transfer id ``unsealed_through`` when given) in (transfer id, posting id) order."""
    if _postgres():
        if block_id is not None:
            condition, params, order = "t.block_id = %s", [block_id], "p.id"
        elif unsealed_through is not None:
            condition, params, order = "t.block_id IS NULL AND t.id <= %s", [unsealed_through], "p.transfer_id, p.id"
        else:
            condition, params, order = "t.block_id IS NULL", [], "p.transfer_id, p.id"
        with connection.cursor() as cursor:
            # The database writes created_at as merkle.utc_text does: no datetime parsing per posting.
            cursor.execute(
                f"""SELECT p.id, p.transfer_id, t.idempotency_key, a.key, p.amount,
                           to_char(p.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
                      FROM {Posting._meta.db_table} p
                      JOIN {Transfer._meta.db_table} t ON t.id = p.transfer_id
                      JOIN {Account._meta.db_table} a ON a.id = p.account_id
                     WHERE {condition} ORDER BY {order}""",  # noqa: S608
                params,
            )
            return cursor.fetchall()
    postings = Posting.objects.all()
    if block_id is not None:
        postings = postings.filter(transfer__block_id=block_id).order_by("id")
    else:
        postings = postings.filter(transfer__block__isnull=True).order_by("transfer_id", "id")
        if unsealed_through is not None:
            postings = postings.filter(transfer_id__lte=unsealed_through)
    return [
        (p, t, t_key, a_key, amount, merkle.utc_text(created_at))
        for p, t, t_key, a_key, amount, created_at in postings.values_list(
            "id", "transfer_id", "transfer__idempotency_key", "account__key", "amount", "created_at"
        )
    ]


def leaves_root(rows: Sequence[LeafRow]) -> str:
    """The Merkle root over ``rows``, which must be in posting-id order."""
    return merkle.merkle_root(
        [
            merkle.leaf_hash(
                merkle.leaf_bytes(posting_id=p, transfer_key=t_key, account_key=a_key, amount=amount, created_at=at)
            )
            for p, _, t_key, a_key, amount, at in rows
        ]
    )


def block_header_of(block: Block) -> bytes:
    return merkle.block_header(
        height=block.height,
        prev_hash=block.prev_hash,
        merkle_root=block.merkle_root,
        transfer_count=block.transfer_count,
        entry_count=block.entry_count,
        first_posting_id=block.first_posting_id,
        last_posting_id=block.last_posting_id,
        created_at=block.created_at,
    )


def _transfers_mark_sealed(block_id: int, transfer_ids: Collection[int]) -> int:
    if _postgres():
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {Transfer._meta.db_table} SET block_id = %s WHERE id = ANY(%s) AND block_id IS NULL",  # noqa: S608
                [block_id, list(transfer_ids)],
            )
            return cursor.rowcount
    ids = list(transfer_ids)
    return sum(
        Transfer.objects.filter(id__in=ids[i : i + 500], block__isnull=True).update(block_id=block_id)
        for i in range(0, len(ids), 500)
    )
