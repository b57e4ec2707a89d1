"""Reads of the ledger that are more than a query: a transfer's legs, a person's lots and accounts,
the invariant check and block verification."""

from __future__ import annotations

import base64
import binascii
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.core.cache import cache
from django.db import connection, transaction
from django.db.models import F, Q, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from ledger import merkle
from ledger.models import NON_NEGATIVE_KINDS, NON_POSITIVE_KINDS, Account, AccountKind, Block, Posting, Transfer
from ledger.services import block_header_of, leaf_rows, leaves_root

logger = logging.getLogger(__name__)

# Each check reports at most this many offenders; the count says how many there were.
PROBLEMS_PER_CHECK = 20
PUBLIC_KEY_PREFIX = "whpk_"  # the hub's public keys are published as ``whpk_<base64 of 32 bytes>``


# (account id, kind, issuer id, expires_on, balance)
PersonLot = tuple[int, str, int, date | None, int]


def person_lots(*, person_id: int) -> list[PersonLot]:
    """A person's wallet lots that hold points and the debts they owe back (balance < 0), in no order,
    read through the ledger's person index. Lapsed lots are included: the caller tests the expiry.
    SQL twin, for other apps' SQL: ``ledger_person_lots`` (ledger/sql)."""
    return list(
        Account.objects.filter(
            Q(kind=AccountKind.WALLET_LOT, balance__gt=0) | Q(kind=AccountKind.DEBT, balance__lt=0), person_id=person_id
        ).values_list("id", "kind", "issuer_id", "expires_on", "balance")
    )


@dataclass(frozen=True, slots=True)
class Leg:
    """One posting of a transfer, with what the apps above may know of its account."""

    transfer_key: str
    kind: str  # the account's kind
    issuer_id: int
    expires_on: date | None  # the account's, for a lot
    amount: int  # signed mg


def transfer_legs(*, idempotency_keys: Iterable[str]) -> list[Leg]:
    """The legs of the transfers with these keys (none for a key never posted), in posting order."""
    keys = list(idempotency_keys)
    if not keys:
        return []
    rows = (
        Posting.objects.filter(transfer__idempotency_key__in=keys)
        .order_by("id")
        .values_list(
            "transfer__idempotency_key", "account__kind", "account__issuer_id", "account__expires_on", "amount"
        )
    )
    return [Leg(*row) for row in rows]


@dataclass(frozen=True, slots=True)
class Balance:
    """One account of a person, as a wallet reads it."""

    kind: str
    issuer_id: int
    expires_on: date | None
    balance: int  # mg


def person_balances(*, person_id: int, live_on: date) -> list[Balance]:
    """The person's wallet lots with points that have not lapsed by ``live_on`` (``expires_on >= live_on``;
    a lot past it that the daily sweep has not moved yet no longer counts) and their debts: one query
    through the ``ledger_account_person`` index, at most issuers x months rows."""
    rows = Account.objects.filter(
        Q(kind=AccountKind.WALLET_LOT, balance__gt=0, expires_on__gte=live_on)
        | Q(kind=AccountKind.DEBT, balance__lt=0),
        person_id=person_id,
    ).values_list("kind", "issuer_id", "expires_on", "balance")
    return [Balance(*row) for row in rows]


@dataclass(frozen=True, slots=True)
class AccountHistory:
    """One account of a person with every posting to it, oldest first: what a person's export shows."""

    kind: str
    issuer_id: int
    expires_on: date | None
    balance: int
    postings: list[tuple[str, str, int, datetime]]  # (transfer key, transfer kind, amount in mg, posted at)


def person_accounts(*, person_id: int) -> list[AccountHistory]:
    """Every account of the person (by kind, issuer, expiry) with its postings: two queries."""
    accounts = list(
        Account.objects.filter(person_id=person_id)
        .order_by("kind", "issuer_id", "expires_on", "id")
        .values_list("id", "kind", "issuer_id", "expires_on", "balance")
    )
    postings: dict[int, list[tuple[str, str, int, datetime]]] = defaultdict(list)
    for account_id, key, kind, amount, at in (
        Posting.objects.filter(account_id__in=[a[0] for a in accounts])
        .order_by("account_id", "id")
        .values_list("account_id", "transfer__idempotency_key", "transfer__kind", "amount", "created_at")
    ):
        postings[account_id].append((key, kind, amount, at))
    return [
        AccountHistory(kind, issuer_id, expires_on, balance, postings.get(account_id, []))
        for account_id, kind, issuer_id, expires_on, balance in accounts
    ]


@dataclass(frozen=True, slots=True)
class Problem:
    code: str
    message: str
    detail: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@contextmanager
def _snapshot() -> Iterator[None]:
    """One consistent read-only snapshot for a multi-query read on PostgreSQL, unless the caller is
    already in a transaction (then its snapshot rules)."""
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        yield
        return
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield


def ledger_check() -> list[Problem]:
    """Check the ledger's invariants on one snapshot; an empty list means all hold.

    1. the postings of every transfer sum to zero, and to zero per issuer (``transfer-unbalanced``,
       ``transfer-crosses-issuers``); all postings and all balances sum to zero (``ledger-unbalanced``);
    2. every stored balance equals the sum of its account's postings (``balance-mismatch``) and keeps
       its kind's sign: lots, holds, redeemed, expired, reversed >= 0; outstanding, debts <= 0
       (``balance-sign``);
    3. per issuer, -outstanding = lots + holds + redeemed + expired + reversed + debts, where an issuer's
       accounts are all accounts with that ``issuer_id`` (``issuer-unbalanced``).

    Reads every posting: run it from a command or a beat task, not a request.
    """
    problems: list[Problem] = []
    with _snapshot():
        unbalanced = Posting.objects.values("transfer_id").annotate(total=Sum("amount")).exclude(total=0)
        for row in unbalanced.order_by("transfer_id")[:PROBLEMS_PER_CHECK]:
            problems.append(
                Problem(
                    "transfer-unbalanced",
                    f"the postings of transfer {row['transfer_id']} sum to {row['total']}, not zero",
                    {"transfer_id": row["transfer_id"], "total": row["total"]},
                )
            )
        crossing = (
            Posting.objects.values("transfer_id", "account__issuer_id").annotate(total=Sum("amount")).exclude(total=0)
        )
        reported = {p.detail["transfer_id"] for p in problems}
        for transfer_id, issuer_id, total in crossing.order_by("transfer_id").values_list(
            "transfer_id", "account__issuer_id", "total"
        )[:PROBLEMS_PER_CHECK]:
            if transfer_id in reported:  # already named as unbalanced
                continue
            problems.append(
                Problem(
                    "transfer-crosses-issuers",
                    f"the postings of transfer {transfer_id} sum to {total} for issuer {issuer_id}",
                    {"transfer_id": transfer_id, "issuer_id": issuer_id, "total": total},
                )
            )
        postings_total = Posting.objects.aggregate(total=Coalesce(Sum("amount"), 0))["total"]
        balances_total = Account.objects.aggregate(total=Coalesce(Sum("balance"), 0))["total"]
        if postings_total or balances_total:
            problems.append(
                Problem(
                    "ledger-unbalanced",
                    f"all postings sum to {postings_total} and all balances to {balances_total}, not zero",
                    {"postings_total": postings_total, "balances_total": balances_total},
                )
            )
        mismatched = (
            Account.objects.annotate(posted=Coalesce(Sum("postings__amount"), 0))
            .exclude(balance=F("posted"))
            .order_by("id")
            .values_list("id", "key", "balance", "posted")
        )
        for account_id, key, balance, posted in mismatched[:PROBLEMS_PER_CHECK]:
            problems.append(
                Problem(
                    "balance-mismatch",
                    f"account {key} holds {balance} but its postings sum to {posted}",
                    {"account_id": account_id, "balance": balance, "posted": posted},
                )
            )
        wrong_sign = Account.objects.filter(
            Q(kind__in=NON_NEGATIVE_KINDS, balance__lt=0) | Q(kind__in=NON_POSITIVE_KINDS, balance__gt=0)
        ).order_by("id")
        for account_id, key, balance in wrong_sign.values_list("id", "key", "balance")[:PROBLEMS_PER_CHECK]:
            problems.append(
                Problem(
                    "balance-sign",
                    f"account {key} holds {balance}, the wrong sign for its kind",
                    {"account_id": account_id, "balance": balance},
                )
            )
        issuers = Account.objects.values("issuer_id").annotate(total=Sum("balance")).exclude(total=0)
        for issuer_id, total in issuers.order_by("issuer_id").values_list("issuer_id", "total")[:PROBLEMS_PER_CHECK]:
            problems.append(
                Problem(
                    "issuer-unbalanced",
                    f"issuer {issuer_id}: outstanding and the accounts holding its points differ by {total}",
                    {"issuer_id": issuer_id, "total": total},
                )
            )
    return problems


# --- Blocks -------------------------------------------------------------------------------------------


def _public_key(text: str) -> Ed25519PublicKey:
    if not text.startswith(PUBLIC_KEY_PREFIX):
        raise ValueError("not a whpk_ key")
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(text[len(PUBLIC_KEY_PREFIX) :], validate=True))


def block_verify(
    *, block: Block, prev_hash: str | None = None, trusted_keys: Mapping[str, str] | None = None
) -> tuple[list[Problem], int]:
    """Recompute one block from the postings as they are now; ``(problems, postings checked)``.

    Checks the entry and transfer counts, the first and last posting ids, the Merkle root, the header
    hash, the link to ``prev_hash`` (read from the block below when not given) and the Ed25519
    signature with the block's public key, which must be ``trusted_keys[key_id]`` when given.
    """
    problems: list[Problem] = []

    def fail(code: str, message: str, **detail: Any) -> None:
        problems.append(Problem(code, message, {"height": block.height, **detail}))

    rows = leaf_rows(block_id=block.pk)
    transfers = Transfer.objects.filter(block_id=block.pk).count()
    if len(rows) != block.entry_count:
        fail("block-entries", f"sealed {block.entry_count} postings, {len(rows)} found now", found=len(rows))
    if transfers != block.transfer_count:
        fail("block-transfers", f"sealed {block.transfer_count} transfers, {transfers} found now", found=transfers)
    first, last = (rows[0][0], rows[-1][0]) if rows else (None, None)
    if (first, last) != (block.first_posting_id, block.last_posting_id):
        fail("block-range", f"sealed postings {block.first_posting_id}..{block.last_posting_id}, found {first}..{last}")
    root = leaves_root(rows)
    if root != block.merkle_root:
        fail("merkle-root", "the postings do not match the sealed Merkle root (a posting was changed)", root=root)
    recomputed = merkle.block_hash(block_header_of(block))
    if recomputed != block.hash:
        fail("block-hash", "the header does not hash to the stored block hash", recomputed=recomputed)
    if prev_hash is None:
        below = Block.objects.filter(height=block.height - 1).values_list("hash", flat=True).first()
        prev_hash = below if below is not None else (merkle.GENESIS_PREV_HASH if block.height == 1 else "")
    if block.prev_hash != prev_hash:
        fail("chain", "prev_hash does not match the hash of the block below", expected=prev_hash)
    if trusted_keys is not None and trusted_keys.get(block.key_id) != block.public_key:
        fail("untrusted-key", f"signed by {block.key_id}, which is not one of the hub's published keys")
    try:
        signature = base64.b64decode(block.signature, validate=True)
        _public_key(block.public_key).verify(signature, bytes.fromhex(block.hash))
    except (InvalidSignature, ValueError, binascii.Error):
        fail("signature", f"the signature does not verify with key {block.key_id}")
    return problems, len(rows)


@dataclass(slots=True)
class VerifyReport:
    blocks: int = 0
    postings: int = 0
    problems: list[Problem] = field(default_factory=list)
    unsealed_transfers: int = 0

    @property
    def first_broken_height(self) -> int | None:
        heights = [p.detail["height"] for p in self.problems if "height" in p.detail]
        return min(heights) if heights else None


def blocks_verify(
    *, trusted_keys: Mapping[str, str] | None = None, on_block: Callable[[Block, list[Problem]], None] | None = None
) -> VerifyReport:
    """Verify every block from height 1 up: contiguous heights, the hash chain, each block's contents
    and signature (:func:`block_verify`). Remembers each block's result for the admin."""
    report = VerifyReport()
    prev_hash = merkle.GENESIS_PREV_HASH
    expected_height = 1
    for block in Block.objects.order_by("height").iterator(chunk_size=100):
        problems, postings = block_verify(block=block, prev_hash=prev_hash, trusted_keys=trusted_keys)
        if block.height != expected_height:
            problems.insert(
                0,
                Problem(
                    "chain",
                    f"expected height {expected_height} here (a block is missing)",
                    {"height": block.height},
                ),
            )
        block_status_remember(block=block, problems=problems)
        if on_block is not None:
            on_block(block, problems)
        report.blocks += 1
        report.postings += postings
        report.problems.extend(problems)
        prev_hash, expected_height = block.hash, block.height + 1
    report.unsealed_transfers = Transfer.objects.filter(block__isnull=True).count()
    return report


def _status_key(block: Block) -> str:
    # Keyed by the block's hash: a remembered verdict never applies to a different block.
    return f"ledger:block-status:{block.hash}"


def block_status_remember(*, block: Block, problems: list[Problem]) -> None:
    """Keep the verdict for the admin's block list (a cache: losing it only shows "not verified")."""
    try:
        cache.set(
            _status_key(block),
            {"ok": not problems, "detail": "; ".join(str(p) for p in problems), "at": timezone.now().isoformat()},
            timeout=30 * 24 * 3600,
        )
    except Exception:
        logger.warning("block_status_remember: cache unavailable", exc_info=True)


def block_status_recall(*, block: Block) -> dict[str, Any] | None:
    """The last verification verdict of ``block`` (``ok``, ``detail``, ``at``), or None if never verified."""
    try:
        return cache.get(_status_key(block))
    except Exception:  # the admin list must render with the cache down: "not verified"
        logger.warning("block_status_recall: cache unavailable", exc_info=True)
        return None
