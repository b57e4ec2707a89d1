"""Ledger accounts by natural identity: :class:`AccountKey` names one, :func:`accounts_ensure` gives
its id, creating it if need be. The key format is the ledger's own; on PostgreSQL
``ledger_account_key`` (ledger/sql) writes the same string, and only the ledger's SQL uses it."""

from __future__ import annotations

import calendar
import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime

from django.db import connection
from django.utils import timezone

from clearinghouse.db import array_literal, execute_prepared, text_array_literal
from ledger.exceptions import InvalidAccount
from ledger.models import Account, AccountKind


def _postgres() -> bool:
    return connection.vendor == "postgresql"


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
    "SELECT account_keys, account_ids FROM ledger_accounts_ensure(%s::text[], %s::bigint[], %s::bigint[], %s::text[],"
    " %s::date[], %s::bigint[], %s::bigint[], %s::bigint[], %s::timestamptz)"
)


def _accounts_create_in_database(keys: list[AccountKey], now: datetime) -> dict[str, int]:
    """``{key: id}`` of ``keys`` through ``ledger_accounts_ensure``, which writes each key itself: a key
    it writes otherwise than :class:`AccountKey` would be a second identity for one account, so that
    stops here, before anything is posted to it."""
    keys_made, ids_made = execute_prepared(
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
    ).fetchone()
    ids = dict(zip(keys_made, ids_made, strict=True))
    if any(k.key not in ids for k in keys):
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
