"""Writes of the ledger: accounts by natural identity, the batch posting engine, expiry and sealing.

The ledger imports no other app. Callers name accounts with :class:`AccountKey`, turn them into ids
with :func:`accounts_ensure`, and post :class:`TransferSpec` batches with :func:`transfers_post`.
Sealing takes a ``signer`` from the caller (the hub key lives in ``institutions``).

On PostgreSQL the hot path is four statements per batch whatever its size: transfers by ``unnest``
(``ON CONFLICT DO NOTHING``), postings by ``COPY``, one ``SELECT ... FOR NO KEY UPDATE`` of the touched
accounts in id order, one netted ``UPDATE ... FROM unnest``. SQLite (the embedded default, one writer
at a time) takes the same steps through the ORM.
"""

from __future__ import annotations

import base64
import calendar
import functools
import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from typing import Any

from django.db import DatabaseError, connection, transaction
from django.db.models import F, Max
from django.utils import timezone

from clearinghouse.db import array_literal, copy_rows, execute_prepared, text_array_literal
from ledger import merkle
from ledger.exceptions import (
    BalanceOutOfRange,
    CrossIssuerTransfer,
    InsufficientBalance,
    InvalidAccount,
    InvalidTransfer,
    LedgerError,
    UnbalancedTransfer,
    UnknownAccount,
)
from ledger.models import (
    LOT_KINDS,
    NON_NEGATIVE_KINDS,
    Account,
    AccountKind,
    Block,
    Posting,
    Transfer,
    TransferKind,
)

# ``signer(message) -> (key_id, public_key, signature)``: Ed25519 over ``message`` by the hub's active key,
# with the key's id and its public half as ``whpk_<base64>``.
Signer = Callable[[bytes], tuple[str, str, bytes]]

KEY_MAX_LENGTH = 200
# Per leg, in mg: a thousand tonnes CO2e, far above any act, far below what a bigint balance can hold.
MAX_AMOUNT = 10**12
_TRANSFER_KINDS = frozenset(TransferKind.values)  # ``.values`` builds a new list on every access
METADATA_MAX_BYTES = 4096
# Built once: json.dumps with options builds a new encoder per call, which shows at thousands of transfers.
_METADATA_JSON = json.JSONEncoder(separators=(",", ":"), sort_keys=True)
# An arbitrary, fixed advisory lock id: one sealer at a time across every process.
SEAL_LOCK_ID = 0x4C45_4447_5345_414C  # "LEDGSEAL"


def _postgres() -> bool:
    return connection.vendor == "postgresql"


# --- Accounts -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)  # called for every lot key built; a handful of distinct days
def lot_expiry(day: date) -> date:
    """The bucket of points that lapse after ``day``: the last day of its month."""
    return day.replace(day=calendar.monthrange(day.year, day.month)[1])


@dataclass(frozen=True, slots=True)
class AccountKey:
    """The natural identity of an account; ``key`` is its unique string form.

    Build one with the constructors (``AccountKey.wallet_lot(...)`` and so on); the constructor
    refuses fields a kind does not have and requires those it does, so one identity has one key.
    """

    kind: str
    issuer_id: int
    person_id: int | None = None
    subject_ref: str = ""
    expires_on: date | None = None
    redemption_id: int | None = None
    holder_institution_id: int | None = None
    provider_id: int | None = None
    # The string form, built once: batches of credits ask for it several times per account.
    _key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kind = _KIND_VALUES.get(self.kind)
        if kind is None:
            raise InvalidAccount(f"Unknown account kind {self.kind!r}.")
        if type(self.kind) is not str:
            # A plain str: an enum member hashes by its name, so it would not find its equal plain-str twin in a dict.
            object.__setattr__(self, "kind", kind)
        required = _IDENTITY[kind]
        if kind == AccountKind.DEBT:
            # A debt is a person's or, before linking, a subject's (holder institution + subject ref).
            required = ("person_id",) if self.person_id is not None else ("holder_institution_id", "subject_ref")
        # Which optional fields are set, in _OPTIONAL_FIELDS order (spelled out: this runs per credit).
        present = (
            self.person_id not in _ABSENT,
            self.subject_ref not in _ABSENT,
            self.expires_on not in _ABSENT,
            self.redemption_id not in _ABSENT,
            self.holder_institution_id not in _ABSENT,
            self.provider_id not in _ABSENT,
        )
        if present != _presence(required):
            for name, here in zip(_OPTIONAL_FIELDS, present, strict=True):
                if here != (name in required):
                    state = "needs" if name in required else "has no"
                    raise InvalidAccount(f"A {kind} account {state} {name}.")
        if not isinstance(self.issuer_id, int) or self.issuer_id <= 0:
            raise InvalidAccount("issuer_id must be a positive integer.")
        if self.subject_ref and (":" in self.subject_ref or "\x00" in self.subject_ref or len(self.subject_ref) > 64):
            raise InvalidAccount("subject_ref is a keyed hash of at most 64 characters without ':'.")
        if self.expires_on is not None and not _month_end(self.expires_on):
            raise InvalidAccount("Lots are bucketed by month: expires_on must be the last day of a month.")
        object.__setattr__(self, "_key", self._text())

    @property
    def key(self) -> str:
        return self._key

    def _text(self) -> str:
        parts = [self.kind]
        if self.holder_institution_id is not None:
            parts.append(f"h={self.holder_institution_id}")
        if self.subject_ref:
            parts.append(f"s={self.subject_ref}")
        if self.person_id is not None:
            parts.append(f"p={self.person_id}")
        if self.redemption_id is not None:
            parts.append(f"r={self.redemption_id}")
        if self.provider_id is not None:
            parts.append(f"pv={self.provider_id}")
        parts.append(f"i={self.issuer_id}")
        if self.expires_on is not None:
            parts.append(f"e={self.expires_on.isoformat()}")
        return ":".join(parts)

    # Constructors, one per kind.
    @classmethod
    def issuer_outstanding(cls, *, issuer_id: int) -> AccountKey:
        return cls(AccountKind.ISSUER_OUTSTANDING, issuer_id)

    @classmethod
    def holding_lot(
        cls, *, issuer_id: int, holder_institution_id: int, subject_ref: str, expires_on: date
    ) -> AccountKey:
        return cls(
            AccountKind.HOLDING_LOT,
            issuer_id,
            subject_ref=subject_ref,
            expires_on=expires_on,
            holder_institution_id=holder_institution_id,
        )

    @classmethod
    def wallet_lot(cls, *, person_id: int, issuer_id: int, expires_on: date) -> AccountKey:
        return cls(AccountKind.WALLET_LOT, issuer_id, person_id=person_id, expires_on=expires_on)

    @classmethod
    def redemption_hold(cls, *, redemption_id: int, issuer_id: int) -> AccountKey:
        return cls(AccountKind.REDEMPTION_HOLD, issuer_id, redemption_id=redemption_id)

    @classmethod
    def redeemed(cls, *, provider_id: int, issuer_id: int) -> AccountKey:
        return cls(AccountKind.REDEEMED, issuer_id, provider_id=provider_id)

    @classmethod
    def expired(cls, *, issuer_id: int) -> AccountKey:
        return cls(AccountKind.EXPIRED, issuer_id)

    @classmethod
    def reversed(cls, *, issuer_id: int) -> AccountKey:
        return cls(AccountKind.REVERSED, issuer_id)

    @classmethod
    def person_debt(cls, *, person_id: int, issuer_id: int) -> AccountKey:
        return cls(AccountKind.DEBT, issuer_id, person_id=person_id)

    @classmethod
    def subject_debt(cls, *, issuer_id: int, holder_institution_id: int, subject_ref: str) -> AccountKey:
        return cls(AccountKind.DEBT, issuer_id, subject_ref=subject_ref, holder_institution_id=holder_institution_id)


_OPTIONAL_FIELDS = ("person_id", "subject_ref", "expires_on", "redemption_id", "holder_institution_id", "provider_id")
_ABSENT = (None, "")
# Kind (a plain str or an AccountKind member, which compares equal to its value) -> the plain str.
_KIND_VALUES: dict[str, str] = {str(kind.value): str(kind.value) for kind in AccountKind}
_IDENTITY: dict[str, tuple[str, ...]] = {
    AccountKind.ISSUER_OUTSTANDING: (),
    AccountKind.HOLDING_LOT: ("holder_institution_id", "subject_ref", "expires_on"),
    AccountKind.WALLET_LOT: ("person_id", "expires_on"),
    AccountKind.REDEMPTION_HOLD: ("redemption_id",),
    AccountKind.REDEEMED: ("provider_id",),
    AccountKind.EXPIRED: (),
    AccountKind.REVERSED: (),
    AccountKind.DEBT: (),  # decided per key in __post_init__
}


@functools.cache
def _presence(required: tuple[str, ...]) -> tuple[bool, ...]:
    """Which of _OPTIONAL_FIELDS an account with ``required`` fields has set."""
    return tuple(name in required for name in _OPTIONAL_FIELDS)


@functools.lru_cache(maxsize=4096)
def _month_end(day: date) -> bool:
    return day == lot_expiry(day)


def accounts_ensure(*, keys: Iterable[AccountKey]) -> dict[AccountKey, int]:
    """Account ids for ``keys``, creating the missing accounts (balance 0).

    One ``SELECT`` when all exist. Else, on PostgreSQL, one call of ``ledger_accounts_ensure`` (ledger
    migration 0004) for the missing ones: it builds their keys itself (``ledger_account_key``, the SQL
    twin of :class:`AccountKey`), inserts them ``ON CONFLICT DO NOTHING`` in key order, so concurrent
    callers cannot deadlock on each other, and reads those a concurrent transaction created first;
    elsewhere a bulk insert ignoring conflicts and a second read. Safe to call concurrently and
    repeatedly; never changes an existing account. An account created in a transaction that is then
    rolled back is gone with it, so call this in the transaction that posts to the accounts (or before).
    """
    wanted = {k.key: k for k in keys}
    if not wanted:
        return {}
    found = _account_ids(list(wanted))
    missing = sorted(k for k in wanted if k not in found)
    if missing:
        now = timezone.now()
        if _postgres():
            found.update(_accounts_create_in_database([wanted[k] for k in missing], now))
        else:
            Account.objects.bulk_create(
                [
                    Account(
                        key=k,
                        kind=wanted[k].kind,
                        issuer_id=wanted[k].issuer_id,
                        created_at=now,
                        **{name: getattr(wanted[k], name) for name in _OPTIONAL_FIELDS},
                    )
                    for k in missing
                ],
                ignore_conflicts=True,
            )
            found.update(_account_ids(missing))
    return {account_key: found[key] for key, account_key in wanted.items()}


_ENSURE_CALL = (
    "SELECT account_key, account_id FROM ledger_accounts_ensure(%s::text[], %s::bigint[], %s::bigint[], %s::text[],"
    " %s::date[], %s::bigint[], %s::bigint[], %s::bigint[], %s::timestamptz)"
)


def _accounts_create_in_database(keys: list[AccountKey], now: datetime) -> dict[str, int]:
    """``{key: id}`` of ``keys`` through ``ledger_accounts_ensure``, which writes each key itself: a key
    it writes otherwise than :class:`AccountKey` would be a second identity for one account, so that
    stops here, before anything is posted to it."""
    rows = execute_prepared(
        _ENSURE_CALL,
        [
            text_array_literal([k.kind for k in keys]),
            array_literal([k.issuer_id for k in keys]),
            array_literal([k.person_id for k in keys]),
            text_array_literal([k.subject_ref for k in keys]),
            array_literal([k.expires_on for k in keys]),
            array_literal([k.redemption_id for k in keys]),
            array_literal([k.holder_institution_id for k in keys]),
            array_literal([k.provider_id for k in keys]),
            now,
        ],
    ).fetchall()
    ids = dict(rows)
    if len(ids) != len(keys) or any(k.key not in ids for k in keys):
        raise AssertionError(f"ledger_account_key disagrees with AccountKey: {sorted(ids)[:3]} for {keys[0].key!r}")
    return ids


def _account_ids(keys: list[str]) -> dict[str, int]:
    if _postgres():
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT key, id FROM {Account._meta.db_table} WHERE key = ANY(%s::text[])",  # noqa: S608
                [text_array_literal(keys)],
            )
            return dict(cursor.fetchall())
    return dict(Account.objects.filter(key__in=keys).values_list("key", "id"))


# --- Transfers ----------------------------------------------------------------------------------------


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
    "SELECT transfer_key, transfer_id, created FROM ledger_post(%s::timestamptz, %s::text[], %s::text[], %s::jsonb,"
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
        rows = execute_prepared(_POST_CALL, params).fetchall()
    except DatabaseError as exc:
        refused = ledger_refusal(exc)
        if refused is None:
            raise
        raise refused from exc
    return {key: (transfer_id, created) for key, transfer_id, created in rows}


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
class _Locked:
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
        locked = _accounts_lock(sorted({account for spec in new for account, _ in spec.legs}))
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


def _accounts_lock(account_ids: list[int]) -> dict[int, _Locked]:
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
    locked = {row[0]: _Locked(kind=row[1], issuer_id=row[2], balance=row[3]) for row in rows}
    if len(locked) != len(account_ids):
        raise _refused(_UNKNOWN_ACCOUNT, {"account_ids": sorted(set(account_ids) - set(locked))[:20]})
    return locked


def _balance_deltas(specs: list[TransferSpec], locked: dict[int, _Locked]) -> dict[int, int]:
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


# --- Expiry -------------------------------------------------------------------------------------------


def sweep_keys(keys: dict[int, str]) -> dict[int, str]:
    """Idempotency keys for sweeping lots (``{account id: key}``) that stay unique when a lot is swept
    again: a key already used gets ``:after-<last posting id of the lot>``, so a lot that received
    points after an earlier sweep is swept once more, and a repeat of the same sweep stays a no-op."""
    used = set(Transfer.objects.filter(idempotency_key__in=keys.values()).values_list("idempotency_key", flat=True))
    if not used:
        return keys
    last = dict(
        Posting.objects.filter(account_id__in=[lot for lot, key in keys.items() if key in used])
        .values("account_id")
        .annotate(last=Max("id"))
        .values_list("account_id", "last")
    )
    return {**keys, **{lot: f"{keys[lot]}:after-{last[lot]}" for lot in last}}


def lots_expire(*, today: date, batch_size: int = 1000, progress: Callable[[int, int], None] | None = None) -> int:
    """Move every lot that lapsed before ``today`` (``expires_on < today``) with points left to
    ``expired(issuer)``: one ``expire`` transfer per lot. Returns how many transfers were made.

    Idempotent and safe beside concurrent posting and a concurrent run: each chunk of ``batch_size``
    lots is one transaction that locks its lots and the issuers' ``expired`` accounts (ascending ids)
    before reading the balances it moves. The key is ``expire:<account id>:<expires_on>``; a lot that
    received points after it was swept (late consolidation) is swept again under
    ``expire:<account id>:<expires_on>:after-<last posting id>``. ``progress(done, transfers)`` is called
    after each chunk.
    """
    made = done = 0
    after_id = 0
    while True:
        with transaction.atomic():
            rows = list(
                Account.objects.filter(kind__in=LOT_KINDS, expires_on__lt=today, balance__gt=0, id__gt=after_id)
                .order_by("id")
                .values_list("id", "issuer_id", "expires_on")[:batch_size]
            )
            if not rows:
                break
            after_id = rows[-1][0]
            lots = [(lot, issuer, expires_on) for lot, issuer, expires_on in rows if expires_on is not None]
            expired = accounts_ensure(keys={AccountKey.expired(issuer_id=issuer) for _, issuer, _ in lots})
            by_issuer = {key.issuer_id: account_id for key, account_id in expired.items()}
            locked = _accounts_lock(sorted({lot for lot, _, _ in lots} | set(by_issuer.values())))
            keys = sweep_keys({lot: f"expire:{lot}:{expires_on.isoformat()}" for lot, _, expires_on in lots})
            specs = [
                TransferSpec(
                    idempotency_key=keys[lot],
                    kind=TransferKind.EXPIRE,
                    legs=[(lot, -locked[lot].balance), (by_issuer[issuer], locked[lot].balance)],
                    metadata={"expires_on": expires_on.isoformat(), "today": today.isoformat()},
                )
                for lot, issuer, expires_on in lots
                if locked[lot].balance > 0  # re-read under the lock: spent meanwhile, nothing to expire
            ]
            made += len(transfers_post(transfers=specs).created)
            done += len(rows)
        if progress is not None:
            progress(done, made)
    return made


# --- Sealing ------------------------------------------------------------------------------------------


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
