"""The posting engine: :func:`transfers_post` posts batches of :class:`TransferSpec`, atomically and
idempotently, with the ledger's invariants checked under the accounts' locks.

Two engines do the work, behind :func:`transfers_post`: on PostgreSQL one call of ``ledger_post``
(ledger/sql, the same function other apps' SQL calls), elsewhere the same steps through the ORM.
They give the same results and refusals (``tests/ledger/test_posting_engines.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from django.db import DatabaseError, connection, transaction
from django.db.models import F
from django.utils import timezone

from clearinghouse.db import array_literal, copy_rows, execute_prepared, text_array_literal
from ledger.exceptions import (
    BalanceOutOfRange,
    CrossIssuerTransfer,
    InsufficientBalance,
    InvalidTransfer,
    LedgerError,
    UnbalancedTransfer,
    UnknownAccount,
)
from ledger.models import NON_NEGATIVE_KINDS, Account, Posting, Transfer, TransferKind

KEY_MAX_LENGTH = 200
# Per leg, in mg: a thousand tonnes CO2e, far above any act, far below what a bigint balance can hold.
MAX_AMOUNT = 10**12
_TRANSFER_KINDS = frozenset(TransferKind.values)  # ``.values`` builds a new list on every access
METADATA_MAX_BYTES = 4096
# Built once: json.dumps with options builds a new encoder per call, which shows at thousands of transfers.
_METADATA_JSON = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


def _postgres() -> bool:
    return connection.vendor == "postgresql"


@dataclass(frozen=True, slots=True)
class TransferSpec:
    """One transfer to post: legs are ``(account id, signed amount in mg)`` and must sum to zero."""

    idempotency_key: str
    kind: str
    legs: Sequence[tuple[int, int]]
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class PostResult:
    """Transfer ids by idempotency key, in the order given: ``created`` by this call, ``existing`` before it
    (including a key repeated within the batch: the first occurrence wins)."""

    created: dict[str, int]
    existing: dict[str, int]

    @property
    def transfer_ids(self) -> dict[str, int]:
        return {**self.existing, **self.created}


def transfers_post(*, transfers: Sequence[TransferSpec]) -> PostResult:
    """Post a batch of transfers atomically; idempotent per ``idempotency_key``.

    Guarantees, also with concurrent callers on PostgreSQL:

    - A key that already exists (committed before, or committed by a concurrent transaction while this
      one waited on it) is skipped and reported in ``existing``; its original transfer stands, whatever
      the repeat's legs. Running a batch twice posts it once.
    - All or nothing: either every new transfer, its postings and the balance changes are written (in
      the caller's transaction if there is one, else in one of our own), or a :class:`LedgerError` is
      raised and nothing of the batch is written.
    - Before anything is written: each transfer's legs are non-zero integers that sum to zero
      (:class:`UnbalancedTransfer`) and the transfer is well formed (:class:`InvalidTransfer`). After
      locking the accounts: each names an existing account (:class:`UnknownAccount`), sums to zero per
      issuer (:class:`CrossIssuerTransfer`), and applying the transfers in the order given keeps every
      account's sign: lots, holds, redeemed, expired and reversed never below zero
      (:class:`InsufficientBalance`), outstanding and debts never above (:class:`BalanceOutOfRange`).
    - Locks: the touched accounts ``FOR NO KEY UPDATE``, in ascending id order, after the transfer keys
      (inserted in key order). Batches therefore never deadlock on each other; the lock on a hot issuer
      account is held only from the lock to the commit, and each account takes one netted ``UPDATE`` per
      batch. A caller that posts several batches in one transaction gives up that ordering (PostgreSQL
      then detects a deadlock and aborts one transaction; retry it).
    """
    specs, repeated, metadata = _validated(transfers)
    if not specs:
        return PostResult(created={}, existing={})
    engine = _engine()
    # In autocommit the database engine's one statement is its own transaction; inside the caller's, a
    # savepoint, so a refusal leaves the caller's transaction usable (the portable engine takes one too).
    with transaction.atomic() if connection.in_atomic_block or engine is _post_portable else nullcontext():
        posted = engine(specs, metadata, timezone.now())
    created = {
        spec.idempotency_key: posted[spec.idempotency_key][0] for spec in specs if posted[spec.idempotency_key][1]
    }
    existing = {
        key: posted[key][0]
        for key in [spec.idempotency_key for spec in specs if not posted[spec.idempotency_key][1]] + repeated
    }
    return PostResult(created=created, existing=existing)


# What an engine makes of a batch: ``{key: (transfer id, created by this call)}`` for every key given.
Posted = dict[str, tuple[int, bool]]


def _engine() -> Callable[[list[TransferSpec], dict[str, str], datetime], Posted]:
    """The posting engine of this database: ``ledger_post`` on PostgreSQL, the portable one elsewhere."""
    return _post_in_database if _postgres() else _post_portable


def _validated(transfers: Sequence[TransferSpec]) -> tuple[list[TransferSpec], list[str], dict[str, str]]:
    """Well-formed, balanced specs with repeated keys removed (first wins), the repeated keys, and each
    kept spec's metadata as JSON text."""
    specs: list[TransferSpec] = []
    metadata: dict[str, str] = {}
    seen: set[str] = set()
    repeated: list[str] = []
    for spec in transfers:
        key = spec.idempotency_key
        if not isinstance(key, str) or not 0 < len(key) <= KEY_MAX_LENGTH or "\x00" in key:
            raise InvalidTransfer(
                f"An idempotency key is a string of 1 to {KEY_MAX_LENGTH} characters, without NUL.", key=key
            )
        if spec.kind not in _TRANSFER_KINDS:
            raise InvalidTransfer(f"Unknown transfer kind {spec.kind!r}.", key=key)
        if type(spec.kind) is not str:  # a TransferKind member: store its plain value
            spec = replace(spec, kind=TransferKind(spec.kind).value)
        if not spec.legs:
            raise UnbalancedTransfer("A transfer needs postings.", key=key)
        for account, amount in spec.legs:
            if type(account) is not int or type(amount) is not int or not 0 < abs(amount) <= MAX_AMOUNT:
                raise InvalidTransfer(f"Each leg is (account id, non-zero integer amount up to {MAX_AMOUNT}).", key=key)
        total = sum(amount for _, amount in spec.legs)
        if total != 0:
            raise UnbalancedTransfer(f"The postings of {key!r} sum to {total}, not zero.", key=key, total=total)
        try:
            encoded = _METADATA_JSON.encode(dict(spec.metadata)) if spec.metadata else "{}"
        except (TypeError, ValueError) as exc:
            raise InvalidTransfer(f"Transfer metadata must be JSON: {exc}", key=key) from exc
        if len(encoded) > METADATA_MAX_BYTES:
            raise InvalidTransfer(f"Transfer metadata is limited to {METADATA_MAX_BYTES} bytes.", key=key)
        if key in seen:
            repeated.append(key)
            continue
        seen.add(key)
        specs.append(spec)
        metadata[key] = encoded
    return specs, repeated, metadata


# --- The engine in the database (PostgreSQL) ---------------------------------------------------------

_POST_CALL = (
    "SELECT transfer_ids, created FROM ledger_post(%s::timestamptz, %s::text[], %s::text[], %s::jsonb,"
    " %s::integer[], %s::bigint[], %s::bigint[])"
)


def _post_in_database(specs: list[TransferSpec], metadata: dict[str, str], now: datetime) -> Posted:
    """One call of ``ledger_post`` (ledger migration 0004): transfers, postings, locks, checks and the
    netted balance update in one statement. The arrays travel as literals built here: every value is an
    integer (``_validated`` checked the legs' types) or a key, so nothing but the keys needs quoting,
    and binding Python lists costs a microsecond per element."""
    positions: list[int] = []
    accounts: list[int] = []
    amounts: list[int] = []
    for position, spec in enumerate(specs, start=1):
        for account, amount in spec.legs:
            positions.append(position)
            accounts.append(account)
            amounts.append(amount)
    keys = [spec.idempotency_key for spec in specs]
    params = [
        now,
        text_array_literal(keys),
        text_array_literal([spec.kind for spec in specs]),
        "[" + ",".join([metadata[key] for key in keys]) + "]",
        array_literal(positions),
        array_literal(accounts),
        array_literal(amounts),
    ]
    try:
        ids, created = execute_prepared(_POST_CALL, params).fetchone()
    except DatabaseError as exc:
        refused = ledger_refusal(exc)
        if refused is None:
            raise
        raise refused from exc
    return {key: (transfer_id, new) for key, transfer_id, new in zip(keys, ids, created, strict=True)}


# ``ledger_post``'s refusals: SQLSTATE -> what the portable engine raises for the same batch.
_UNKNOWN_ACCOUNT, _UNBALANCED, _CROSS_ISSUER, _INSUFFICIENT, _OUT_OF_RANGE = "LG001", "LG002", "LG003", "LG004", "LG005"


def ledger_refusal(exc: DatabaseError) -> LedgerError | None:
    """The ledger's error behind a database error raised by ``ledger_post`` (called by
    :func:`transfers_post` or by another app's SQL), worded as the portable engine words it; None when
    the error is not one of the ledger's refusals."""
    cause = exc.__cause__
    state = getattr(cause, "sqlstate", None)
    if state not in (_UNKNOWN_ACCOUNT, _UNBALANCED, _CROSS_ISSUER, _INSUFFICIENT, _OUT_OF_RANGE):
        return None
    return _refused(state, json.loads(cause.diag.message_detail))  # type: ignore[union-attr]


def _refused(state: str, detail: Mapping[str, Any]) -> LedgerError:
    """One refusal of a batch, as both engines raise it (``ledger_post`` documents the figures)."""
    if state == _UNKNOWN_ACCOUNT:
        ids = list(detail["account_ids"])
        return UnknownAccount(f"No account with id {ids[0]}.", account_ids=ids)
    key = detail["key"]
    if state == _UNBALANCED:
        total = detail["total"]
        return UnbalancedTransfer(f"The postings of {key!r} sum to {total}, not zero.", key=key, total=total)
    if state == _CROSS_ISSUER:
        return CrossIssuerTransfer(
            f"Transfer {key!r} moves points between issuers.", key=key, per_issuer=dict(detail["per_issuer"])
        )
    account, kind, balance = detail["account_id"], detail["kind"], detail["balance"]
    if state == _INSUFFICIENT:
        return InsufficientBalance(
            f"Transfer {key!r} would take {kind} account {account} to {balance} mg.",
            key=key,
            account_id=account,
            shortfall=-balance,
        )
    return BalanceOutOfRange(
        f"Transfer {key!r} would take {kind} account {account} above zero.", key=key, account_id=account, excess=balance
    )


# --- The portable engine (SQLite) ---------------------------------------------------------------------


@dataclass(slots=True)
class Locked:
    kind: str
    issuer_id: int
    balance: int


def _post_portable(specs: list[TransferSpec], metadata: dict[str, str], now: datetime) -> Posted:
    """The steps of ``ledger_post`` through the ORM, in the caller's transaction: what SQLite runs (one
    writer at a time: the settings open transactions IMMEDIATE, so reading keys before inserting is safe)."""
    created = _transfers_insert(specs, now)
    new = [spec for spec in specs if spec.idempotency_key in created]
    if new:
        # In the order given, so posting ids follow it.
        rows = [(created[s.idempotency_key], account, amount, now) for s in new for account, amount in s.legs]
        copy_rows(Posting, ("transfer_id", "account_id", "amount", "created_at"), rows)
        locked = accounts_lock(sorted({account for spec in new for account, _ in spec.legs}))
        _balances_apply(_balance_deltas(new, locked))
    existing_keys = [spec.idempotency_key for spec in specs if spec.idempotency_key not in created]
    existing = dict(
        Transfer.objects.filter(idempotency_key__in=existing_keys).values_list("idempotency_key", "id")
        if existing_keys
        else []
    )
    return {
        key: (created[key], True) if key in created else (existing[key], False)
        for key in [s.idempotency_key for s in specs]
    }


def _transfers_insert(specs: list[TransferSpec], now: datetime) -> dict[str, int]:
    """Insert the transfers whose keys are new, in key order; ``{key: id}`` of those inserted."""
    ordered = sorted(specs, key=lambda s: s.idempotency_key)
    taken = set(
        Transfer.objects.filter(idempotency_key__in=[s.idempotency_key for s in ordered]).values_list(
            "idempotency_key", flat=True
        )
    )
    rows = [
        Transfer(
            idempotency_key=s.idempotency_key,
            kind=s.kind,
            metadata=dict(s.metadata),
            created_at=now,
        )
        for s in ordered
        if s.idempotency_key not in taken
    ]
    Transfer.objects.bulk_create(rows)
    if rows and rows[0].pk is None:  # a backend that cannot return ids from a bulk insert
        return dict(
            Transfer.objects.filter(idempotency_key__in=[r.idempotency_key for r in rows]).values_list(
                "idempotency_key", "id"
            )
        )
    return {r.idempotency_key: r.pk for r in rows}


def accounts_lock(account_ids: list[int]) -> dict[int, Locked]:
    """Lock the accounts in ascending id order and read them; :class:`UnknownAccount` if one is missing.

    ``FOR NO KEY UPDATE`` (the lock the balance UPDATE takes anyway) rather than ``FOR UPDATE``: it leaves
    the ``KEY SHARE`` locks of foreign-key checks free, so rows that merely reference an account never
    wait on a batch holding it. (The expiry sweep locks its lots with this too, on PostgreSQL.)
    """
    if _postgres():
        with connection.cursor() as cursor:
            cursor.execute(
                f"""SELECT id, kind, issuer_id, balance FROM {Account._meta.db_table}
                     WHERE id = ANY(%s) ORDER BY id FOR NO KEY UPDATE""",  # noqa: S608
                [account_ids],
            )
            rows = cursor.fetchall()
    else:
        rows = list(Account.objects.filter(id__in=account_ids).values_list("id", "kind", "issuer_id", "balance"))
    locked = {row[0]: Locked(kind=row[1], issuer_id=row[2], balance=row[3]) for row in rows}
    if len(locked) != len(account_ids):
        raise _refused(_UNKNOWN_ACCOUNT, {"account_ids": sorted(set(account_ids) - set(locked))[:20]})
    return locked


def _balance_deltas(specs: list[TransferSpec], locked: dict[int, Locked]) -> dict[int, int]:
    """Apply the transfers in order to the locked balances; the net change per account, or the first
    refusal (as ``ledger_post`` finds it: per transfer, issuers' sums, then accounts below zero, then
    accounts above zero, each in id order)."""
    balances = {account_id: row.balance for account_id, row in locked.items()}
    for spec in specs:
        per_issuer: dict[int, int] = {}
        for account_id, amount in spec.legs:
            issuer_id = locked[account_id].issuer_id
            per_issuer[issuer_id] = per_issuer.get(issuer_id, 0) + amount
            balances[account_id] += amount
        if any(per_issuer.values()):
            moved = {str(k): v for k, v in per_issuer.items() if v}
            raise _refused(_CROSS_ISSUER, {"key": spec.idempotency_key, "per_issuer": moved})
        touched = sorted({account_id for account_id, _ in spec.legs})
        for state, wrong in ((_INSUFFICIENT, _below_zero), (_OUT_OF_RANGE, _above_zero)):
            for account_id in touched:
                balance, kind = balances[account_id], locked[account_id].kind
                if wrong(kind, balance):
                    detail = {"key": spec.idempotency_key, "account_id": account_id, "kind": kind, "balance": balance}
                    raise _refused(state, detail)
    return {a: balances[a] - row.balance for a, row in locked.items() if balances[a] != row.balance}


def _below_zero(kind: str, balance: int) -> bool:
    return balance < 0 and kind in NON_NEGATIVE_KINDS


def _above_zero(kind: str, balance: int) -> bool:
    return balance > 0 and kind not in NON_NEGATIVE_KINDS


def _balances_apply(deltas: dict[int, int]) -> None:
    """One UPDATE per touched account (SQLite; ``ledger_post`` nets them into one statement)."""
    for account_id in sorted(deltas):
        Account.objects.filter(pk=account_id).update(balance=F("balance") + deltas[account_id])
