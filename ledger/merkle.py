"""Canonical bytes and hashes of sealed blocks: pure functions, no database.

Leaf: one posting, as the UTF-8 bytes of its posting id, transfer idempotency key, account key, amount
and ``created_at`` (UTC, ``YYYY-MM-DDTHH:MM:SS.ffffffZ``), joined by NUL bytes (no field can hold one:
PostgreSQL text cannot, and the services refuse keys with NUL); its hash is ``SHA-256(0x00 || leaf)``.

Tree: binary, built level by level over the leaf hashes in posting-id order. A pair hashes to
``SHA-256(0x01 || left || right)``. A node left without a partner at the end of a level is *promoted*
unchanged to the next level (not duplicated: duplicating lets two different leaf lists share a root,
the flaw of Bitcoin's tree, CVE-2012-2459). The 0x00/0x01 prefixes keep a leaf from passing for an
inner node (as in RFC 6962). The root of no leaves is ``SHA-256("")``.

Block hash: ``SHA-256`` over the header ``ledger-block-v1|<height>|<prev_hash>|<merkle_root>|
<transfer_count>|<entry_count>|<first_posting_id>|<last_posting_id>|<created_at>`` (hex hashes lower
case, absent ids as ``-``). The first block's ``prev_hash`` is 64 zeros. The hub signs the 32 raw bytes
of the block hash with Ed25519.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime

GENESIS_PREV_HASH = "0" * 64
HEADER_VERSION = "ledger-block-v1"


def utc_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def leaf_bytes(*, posting_id: int, transfer_key: str, account_key: str, amount: int, created_at: str) -> bytes:
    """``created_at`` as :func:`utc_text` gives it (PostgreSQL formats it so itself when sealing)."""
    return f"{posting_id}\x00{transfer_key}\x00{account_key}\x00{amount}\x00{created_at}".encode()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def merkle_root(leaf_hashes: Sequence[bytes]) -> str:
    """Hex root over leaf hashes (already ``leaf_hash``-ed), promoting an odd node at each level."""
    if not leaf_hashes:
        return hashlib.sha256(b"").hexdigest()
    level = list(leaf_hashes)
    while len(level) > 1:
        paired = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0].hex()


def block_header(
    *,
    height: int,
    prev_hash: str,
    merkle_root: str,
    transfer_count: int,
    entry_count: int,
    first_posting_id: int | None,
    last_posting_id: int | None,
    created_at: datetime,
) -> bytes:
    fields = [
        HEADER_VERSION,
        str(height),
        prev_hash,
        merkle_root,
        str(transfer_count),
        str(entry_count),
        "-" if first_posting_id is None else str(first_posting_id),
        "-" if last_posting_id is None else str(last_posting_id),
        utc_text(created_at),
    ]
    return "|".join(fields).encode("ascii")


def block_hash(header: bytes) -> str:
    return hashlib.sha256(header).hexdigest()
