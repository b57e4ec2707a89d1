"""The signed front door: authenticate raw bytes, parse CloudEvents, store them durably.

Order of checks (CONTRACT.md section 2): size and media type, then the signature over the raw
bytes before any parsing, then the timestamp tolerance (only a correctly signed request learns its
clock is off, so the answer cannot be used to probe which institution codes exist), then the
per-institution rate limit, then JSON and the envelopes. Nothing is written for a request refused
at the request level; accepted events are committed before the caller may answer 202.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import DatabaseError, DataError, InterfaceError, OperationalError, connection, transaction
from django.utils import timezone

from clearinghouse import strict_json
from clearinghouse.errors import (
    InvalidEnvelope,
    InvalidSignature,
    PayloadTooLarge,
    RateLimited,
    StaleTimestamp,
    Unavailable,
    UnsupportedMediaType,
)
from clearinghouse.redis import redis_client
from institutions import crypto, kicks
from institutions.envelope import SEAL_SUBJECT, Error, EventVerdict, validate_event
from institutions.models import InboxEvent
from institutions.selectors import Verifier, institution_verifier

logger = logging.getLogger(__name__)

SINGLE = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
EITHER = "application/json"
CONTENT_TYPES = (SINGLE, BATCH, EITHER)
_TIMESTAMP = re.compile(r"^[0-9]{1,15}$")
# A 503 says when to come back: the database is down or restarting, which takes seconds, not hours.
UNAVAILABLE_RETRY_AFTER_SECONDS = 5


# --- Request-level checks ---------------------------------------------------------------------------


def check_size(content_length: str | None) -> None:
    try:
        declared = int(content_length or 0)
    except ValueError:
        declared = 0
    if declared > settings.HUB_INTAKE_MAX_BYTES:
        raise PayloadTooLarge(f"At most {settings.HUB_INTAKE_MAX_BYTES} bytes per request.")


def check_content_type(content_type: str) -> str:
    """The media type without parameters; :class:`UnsupportedMediaType` for another type or a charset
    other than UTF-8."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type not in CONTENT_TYPES:
        raise UnsupportedMediaType(f"Send one of {', '.join(CONTENT_TYPES)}; got {media_type or 'none'}.")
    strict_json.check_charset(content_type)
    return media_type


def authenticate(code: str, headers: Mapping[str, str], body: bytes) -> Verifier:
    """The verifier of the institution that signed ``body``, or :class:`InvalidSignature`.

    Unknown and suspended institutions, missing or malformed headers and non-matching signatures
    all get the same answer. Raises :class:`Unavailable` when the credentials cannot be read.
    """
    msg_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    signature = headers.get("webhook-signature", "")
    if not msg_id or not signature or not timestamp:
        raise InvalidSignature("The webhook-id, webhook-timestamp and webhook-signature headers are required.")
    if "." in msg_id or len(msg_id) > 256 or not _TIMESTAMP.match(timestamp):
        raise InvalidSignature("Malformed webhook headers.")
    try:
        verifier = institution_verifier(code)
    except DatabaseError as exc:
        # The credentials are in the database: out of reach, no request can be checked (nor stored).
        logger.warning("intake: cannot read the credentials of %r: %s", code, exc)
        raise Unavailable("The hub cannot check requests right now; retry later.") from exc
    if verifier is None or not verifier.active:
        raise InvalidSignature("No signature matches.")
    if not crypto.verify(
        msg_id,
        timestamp,
        body,
        signature,
        hmac_secrets=verifier.hmac_secrets,
        ed25519_public_keys=verifier.ed25519_public_keys,
    ):
        raise InvalidSignature("No signature matches.")
    skew = abs(time.time() - int(timestamp))
    if skew > settings.HUB_SIGNATURE_TOLERANCE_SECONDS:
        raise StaleTimestamp(
            f"webhook-timestamp is {int(skew)} s from the hub's clock; "
            f"at most {settings.HUB_SIGNATURE_TOLERANCE_SECONDS} s is accepted."
        )
    return verifier


def check_rate(verifier: Verifier) -> None:
    """Fixed one-second windows per institution, in Redis when there is one (shared by every web
    process), else in this process. A Redis failure lets the request through: rate limiting
    protects the hub, it must not take intake down with it.

    With Redis, a process reserves its requests in chunks of 1 % of the limit (one ``INCRBY`` per
    chunk instead of one round trip per request) and spends them locally. The window's total never
    exceeds the limit; it may fall short of it by the unspent part of the processes' last chunks.
    Limits under 200 per second reserve one request at a time, i.e. are counted exactly.
    """
    limit = verifier.rate_limit_per_second
    now = time.time()
    window = int(now)
    client = redis_client()
    if client is not None:
        if _take_reserved(verifier.institution_id, window, limit):
            return
        chunk = max(1, limit // 100)
        # The limit is part of the key: a changed limit counts afresh instead of against the old count.
        key = f"{settings.HUB_REDIS_KEY_PREFIX}ratelimit:intake:{verifier.institution_id}:{limit}:{window}"
        try:
            pipe = client.pipeline(transaction=False)
            pipe.incrby(key, chunk)
            pipe.expire(key, 2)
            total = pipe.execute()[0]
        except Exception:
            logger.warning("rate limiter: Redis unreachable, letting the request through", exc_info=True)
            return
        granted = min(chunk, limit - (total - chunk))  # the part of this chunk inside the limit
        if granted > 0:
            _keep_reserved(verifier.institution_id, window, limit, granted - 1)
            return
    elif _local_window_count(verifier.institution_id, window) <= limit:
        return
    retry_after = max(1, int(window + 1 - now + 0.999))
    raise RateLimited(
        f"At most {limit} requests per second for this institution.",
        headers={"Retry-After": str(retry_after)},
    )


# (institution id, window, limit) -> requests reserved in Redis and not yet spent by this process.
_reserved: dict[tuple[int, int, int], int] = {}
_reserved_lock = threading.Lock()


def _take_reserved(institution_id: int, window: int, limit: int) -> bool:
    key = (institution_id, window, limit)
    with _reserved_lock:
        left = _reserved.get(key, 0)
        if left <= 0:
            return False
        _reserved[key] = left - 1
        return True


def _keep_reserved(institution_id: int, window: int, limit: int, count: int) -> None:
    with _reserved_lock:
        for stale in [k for k in _reserved if k[1] != window]:
            del _reserved[stale]
        if count > 0:
            key = (institution_id, window, limit)
            _reserved[key] = _reserved.get(key, 0) + count


_local_windows: dict[int, tuple[int, int]] = {}


def _local_window_count(institution_id: int, window: int) -> int:
    current_window, count = _local_windows.get(institution_id, (window, 0))
    count = count + 1 if current_window == window else 1
    _local_windows[institution_id] = (window, count)
    return count


def parse_events(body: bytes, media_type: str) -> list[Any]:
    """The list of events the body carries; numbers with a fraction are read as Decimal, never float.

    The body must be strict JSON (:func:`clearinghouse.strict_json.loads`: UTF-8, each key once, no
    NaN), else :class:`MalformedJson`. Lone surrogates pass here: the envelope's checks reject them
    per event, naming the field.
    """
    document = strict_json.loads(body, parse_float=Decimal, allow_lone_surrogates=True)
    if isinstance(document, dict) and media_type in (SINGLE, EITHER):
        return [document]
    if isinstance(document, list) and media_type in (BATCH, EITHER):
        if not 1 <= len(document) <= settings.HUB_INTAKE_MAX_EVENTS:
            raise InvalidEnvelope(f"A batch holds 1 to {settings.HUB_INTAKE_MAX_EVENTS} events; got {len(document)}.")
        if not all(isinstance(item, dict) for item in document):
            raise InvalidEnvelope("Every item of a batch must be a CloudEvent object.")
        return document
    expected = {SINGLE: "one event object", BATCH: "an array of events"}.get(media_type, "an event or an array")
    raise InvalidEnvelope(f"The body must be {expected}.")


# --- Storing ----------------------------------------------------------------------------------------


@dataclass
class IntakeResult:
    results: list[dict[str, Any]] = field(default_factory=list)
    accepted: int = 0

    @property
    def all_rejected(self) -> bool:
        return all(r["status"] == "rejected" for r in self.results)

    def body(self) -> dict[str, Any]:
        return {"received": len(self.results), "results": self.results}


_COLUMNS = (
    "institution_id, event_id, type, source, subject_ref, subject_sealed, time, data, content_hash, "
    "webhook_id, received_at, status, attempts, available_at, last_error"
)
_ROW = "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'received', 0, %s, '')"
_JSON_FROM_ROWS = 4
# PostgreSQL, from _JSON_FROM_ROWS rows: they travel as one JSON array parameter ([event_id, type,
# source, subject_ref, subject_sealed, time, data, content_hash, webhook_id, institution_id] per
# row), so the statement text is the same for 4 or 1000 rows: no per-value placeholders to build,
# split and adapt, no giant VALUES list for the server to parse. Rows are inserted in request order
# (ORDER BY the ordinality), which keeps concurrent identical batches from interleaving: the first
# inserter wins every event.
_INSERT_JSON = (
    f"INSERT INTO {InboxEvent._meta.db_table} ({_COLUMNS}) "  # noqa: S608 (fixed names; values are bound)
    "SELECT (e.v->>9)::bigint, e.v->>0, e.v->>1, e.v->>2, e.v->>3, e.v->>4, (e.v->>5)::timestamptz, e.v->6, "
    "e.v->>7, e.v->>8, %s, 'received', 0, %s, '' "
    "FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS e(v, n) ORDER BY e.n "
    "ON CONFLICT (institution_id, event_id) DO NOTHING RETURNING institution_id, event_id"
)

# One row of the inbox as events_store prepares it: event_id, type, source, subject_ref,
# subject_sealed, time, data, content_hash.
Row = tuple[str, str, str, str, str, datetime | None, dict[str, Any], str]


def events_store(*, verifier: Verifier, webhook_id: str, events: list[dict[str, Any]]) -> IntakeResult:
    """Validate each event and insert the good ones with one statement; per-event results in order.

    Idempotent per (institution, event id): a resend with the same content is ``duplicate``, with
    other content ``conflict``; neither changes the stored row. Safe under concurrent identical
    requests: PostgreSQL's unique index makes the second inserter wait for the first and skip.
    Outside a transaction the INSERT runs in autocommit: it is its own transaction, committed (and
    flushed, with ``synchronous_commit`` on) when it returns, so the caller may answer 202 then, one
    round trip instead of BEGIN, INSERT, COMMIT. Inside a caller's transaction it runs in a savepoint.
    An event whose values the database refuses although they passed the checks is ``rejected`` alone
    (:func:`_insert_apart`). Raises :class:`Unavailable` (with ``Retry-After``) when the database
    cannot store (the caller must not answer 2xx).
    """
    verdicts: list[EventVerdict] = [validate_event(event) for event in events]
    first_hash: dict[str, str] = {}
    rows: list[Row] = []
    for verdict in verdicts:
        parsed = verdict.parsed
        if parsed is None or parsed.event_id in first_hash:
            continue
        first_hash[parsed.event_id] = parsed.content_hash
        ref = sealed = ""
        if parsed.subject is not None:
            ref = crypto.subject_ref(verifier.code, parsed.subject)
            if parsed.type in SEAL_SUBJECT:
                sealed = crypto.seal(parsed.subject)
        rows.append(
            (parsed.event_id, parsed.type, parsed.source, ref, sealed, parsed.time, parsed.data, parsed.content_hash)
        )

    inserted: set[str] = set()
    existing: dict[str, str] = {}
    refused: dict[str, Error] = {}
    if rows:
        try:
            if connection.in_atomic_block:
                with transaction.atomic():
                    inserted, existing, refused = _store_rows(verifier.institution_id, webhook_id, rows)
            else:
                inserted, existing, refused = _store_rows(verifier.institution_id, webhook_id, rows)
        except DatabaseError as exc:
            logger.exception("intake: could not store %d events", len(rows))
            raise Unavailable(
                "The hub cannot store events right now; retry later.",
                headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_SECONDS)},
            ) from exc
        if inserted:
            # Runs at once in autocommit (the rows are committed), else when the caller commits.
            transaction.on_commit(_kick_processing, robust=True)

    result = IntakeResult()
    seen: set[str] = set()
    for verdict in verdicts:
        parsed = verdict.parsed
        if parsed is None:
            result.results.append({"id": verdict.event_id, "status": "rejected", "errors": verdict.errors})
            continue
        event_id = parsed.event_id
        if event_id in refused:  # the database refused a value the checks let through (logged)
            result.results.append({"id": event_id, "status": "rejected", "errors": [refused[event_id]]})
            continue
        if event_id in inserted and event_id not in seen:
            status = "accepted"
            result.accepted += 1
        else:
            stored_hash = first_hash[event_id] if event_id in inserted else existing.get(event_id)
            status = "duplicate" if stored_hash == parsed.content_hash else "conflict"
        seen.add(event_id)
        entry: dict[str, Any] = {"id": event_id, "status": status}
        if status == "conflict":
            entry["errors"] = [{"field": "id", "code": "conflict"}]
        result.results.append(entry)
    return result


def _store_rows(
    institution_id: int, webhook_id: str, rows: list[Row]
) -> tuple[set[str], dict[str, str], dict[str, Error]]:
    """Insert ``rows``; return the ids inserted, the stored content hash of each id that was not, and
    the error of each id whose row the database refused (see :func:`_insert_apart`).

    The database (not a prior SELECT) decides which events are new. The hashes of the others are
    read afterwards: a stored row's hash never changes, so that read needs no shared transaction.
    In autocommit the insert goes through the process's group commit (:class:`_GroupCommit`).
    """
    entries = [(institution_id, webhook_id, row) for row in rows]
    if connection.in_atomic_block or not settings.HUB_INTAKE_GROUP_COMMIT:
        stored = _insert_apart(entries)
    else:
        stored = _group_commit.insert(entries)
    inserted = {event_id for _, event_id in stored.inserted}
    refused = {event_id: error for (_, event_id), error in stored.refused.items()}
    missing = [row[0] for row in rows if row[0] not in inserted and row[0] not in refused]
    existing: dict[str, str] = {}
    if missing:
        existing = dict(
            InboxEvent.objects.filter(institution_id=institution_id, event_id__in=missing).values_list(
                "event_id", "content_hash"
            )
        )
    return inserted, existing, refused


# (institution id, webhook id, row): one row to insert with the request it came from.
Entry = tuple[int, str, Row]


def _insert_rows(entries: list[Entry]) -> set[tuple[int, str]]:
    """INSERT ... ON CONFLICT DO NOTHING RETURNING, one statement (one round trip) for all ``entries``;
    returns the (institution id, event id) of the rows inserted. ``entries`` hold each
    (institution, event id) once.

    On PostgreSQL ``_JSON_FROM_ROWS`` rows or more go as one JSON parameter (about a third of the
    database and a tenth of the client CPU per event of a VALUES list at 100 events); below that a
    VALUES list is cheaper to plan (a single event: about 200 against 300 µs of PostgreSQL CPU,
    measured on the bench/intake.py machine).
    """
    now = timezone.now()
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql" and len(entries) >= _JSON_FROM_ROWS:
            document = json.dumps(
                [
                    [*row[:5], row[5].isoformat() if row[5] else None, *row[6:], webhook_id, institution_id]
                    for institution_id, webhook_id, row in entries
                ],
                separators=(",", ":"),
                ensure_ascii=False,
            )
            cursor.execute(_INSERT_JSON, [now, now, document])
        else:
            sqlite = connection.vendor == "sqlite"
            adapt = connection.ops.adapt_datetimefield_value if sqlite else (lambda value: value)
            stamp = adapt(now)
            params: list[Any] = []
            for institution_id, webhook_id, row in entries:
                event_id, type_, source, ref, sealed, moment, data, content_hash = row
                params += [institution_id, event_id, type_, source, ref, sealed, adapt(moment)]
                params += [json.dumps(data, separators=(",", ":")), content_hash, webhook_id, stamp, stamp]
            # Only the fixed table name, column list and placeholders are formatted in; values are bound.
            sql = (
                f"INSERT INTO {InboxEvent._meta.db_table} ({_COLUMNS}) "  # noqa: S608
                f"VALUES {', '.join([_ROW] * len(entries))} "
                "ON CONFLICT (institution_id, event_id) DO NOTHING RETURNING institution_id, event_id"
            )
            cursor.execute(sql, params)
        return {(r[0], r[1]) for r in cursor.fetchall()}


# --- When the database refuses a row ------------------------------------------------------------------
# The envelope checks keep out every value the database is known to refuse or be unable to read back
# (docs/decisions.md). Should one still reach a statement, it must cost its sender that event, not a
# 503 that never clears, and cost the other events and requests of the statement nothing.

Key = tuple[int, str]  # (institution id, event id)


@dataclass
class Stored:
    """What became of a statement's rows: inserted, or refused by the database with this error."""

    inserted: set[Key] = field(default_factory=set)
    refused: dict[Key, Error] = field(default_factory=dict)


VALUE, OUTAGE, OTHER = "value", "outage", "other"
# SQLSTATE classes: 22 data exception (out of range, bad format, untranslatable character), 54 program
# limit exceeded (a value too large for a row or an index).
_VALUE_CLASSES = ("22", "54")
_TIME_STATES = frozenset({"22007", "22008", "22009"})  # datetime format, field overflow, zone displacement


def _sqlstate(exc: BaseException) -> str:
    for error in (exc, exc.__cause__):  # Django's error wraps the driver's, which carries the state
        state = getattr(error, "sqlstate", None)
        if state:
            return str(state)
    return ""


def _failure_kind(exc: BaseException) -> str:
    """What a failed INSERT says about the rows in it.

    ``VALUE``: the database (or the driver, encoding a parameter) refused a value: SQLSTATE class 22 or
    54, or a string that cannot be encoded. Retrying cannot store that row, and a statement without
    it succeeds: the sender's error. ``OUTAGE``: the connection or the server failed (a lost
    connection, a server shutting down or out of resources, a deadlock): nothing can be stored now,
    later will do. ``OTHER``: anything else (a constraint, a bug): not the sender's values, but it may
    be one request's, so a group is split into its requests and each answers for itself (503).
    """
    state = _sqlstate(exc)
    if isinstance(exc, UnicodeEncodeError | DataError) or state[:2] in _VALUE_CLASSES:
        return VALUE
    if isinstance(exc, OperationalError | InterfaceError):
        return OUTAGE
    return OTHER


def _insert_apart(entries: list[Entry], failure: BaseException | None = None) -> Stored:
    """Insert ``entries`` as :func:`_insert_rows` does; when the database refuses a value, find the
    rows that hold one by halving, insert the others and report the refused ones.

    ``failure``: the error the statement holding all of ``entries`` already raised (skips trying them
    again). Every half stored is committed on its own (in autocommit) or in its own savepoint, so a
    refused row costs ``O(log n)`` statements and the good rows are stored all the same. Raises any
    failure that is not a refused value (:func:`_failure_kind`): the caller answers 503.
    """
    if failure is None:
        try:
            if connection.in_atomic_block:
                with transaction.atomic():  # a savepoint: the caller's transaction survives a refusal
                    return Stored(_insert_rows(entries))
            return Stored(_insert_rows(entries))
        except Exception as exc:
            if _failure_kind(exc) != VALUE:
                raise
            failure = exc
    if len(entries) == 1:
        institution_id, _, row = entries[0]
        # The checks should have refused it: an operator should learn which value got through.
        logger.error(
            "intake: the database refused event %r of institution %s, which passed the checks: %r",
            row[0],
            institution_id,
            failure,
        )
        field_name = "time" if _sqlstate(failure) in _TIME_STATES else "event"
        return Stored(refused={(institution_id, row[0]): {"field": field_name, "code": "unstorable"}})
    middle = len(entries) // 2
    first, second = _insert_apart(entries[:middle]), _insert_apart(entries[middle:])
    return Stored(first.inserted | second.inserted, {**first.refused, **second.refused})


# --- Group commit -----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    entries: list[Entry]
    woken: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    stored: Stored = field(default_factory=Stored)
    error: BaseException | None = None


class _GroupCommit:
    """Concurrent intake requests of one process share one INSERT, and so one commit.

    Committing is most of what a one-event request costs (the round trip, PostgreSQL's planning and
    commit, the client's work per statement; bench/intake.py's ``floor`` phase measures it), and it
    costs about the same for one row as for a few. So: a request that finds no statement running
    runs one for itself; requests arriving meanwhile queue; when the statement returns, the first
    of them is woken to run the next statement, on its own connection, for every request queued by
    then. Nothing waits for a timer: alone, a request runs its statement at once, as without this.

    Every request still learns of its rows only after the statement that inserted them committed
    (autocommit), so 202 still means stored. A (institution, event id) that two queued requests
    both carry goes into the statement once, for the first of them; the other then finds it stored
    and compares hashes as it would against any earlier request.

    One request's rows must not fail the others': when the shared statement fails for anything but an
    outage (:func:`_failure_kind`), each request's rows are inserted again on their own
    (:func:`_insert_apart`), so each request answers for its own rows only: stored, refused per event,
    or 503 for its own failure. An outage fails every request of the statement (each answers 503).
    """

    MAX_ROWS = 2000  # a statement stops taking queued requests here; the rest go in the next one

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[_Job] = []
        self._running = False

    def insert(self, entries: list[Entry]) -> Stored:
        job = _Job(entries)
        with self._lock:
            self._queue.append(job)
            job.lead = not self._running
            self._running = True
        if not job.lead:
            job.woken.wait()
        if job.lead:
            self._run(job)
        if job.error is not None:
            raise job.error
        return job.stored

    def _run(self, leader: _Job) -> None:
        with self._lock:
            taken, rows = 0, 0
            for queued in self._queue:
                if taken and rows + len(queued.entries) > self.MAX_ROWS:
                    break
                taken += 1
                rows += len(queued.entries)
            jobs, self._queue = self._queue[:taken], self._queue[taken:]
        try:
            owners: dict[tuple[int, str], _Job] = {}
            entries: list[Entry] = []
            for job in jobs:
                for entry in job.entries:
                    key = (entry[0], entry[2][0])
                    if key not in owners:
                        owners[key] = job
                        entries.append(entry)
            try:
                inserted = _insert_rows(entries)
            except Exception as exc:
                kind = _failure_kind(exc)
                if kind == OUTAGE or (kind == OTHER and len(jobs) == 1):
                    raise
                logger.warning("intake: a statement of %d requests failed (%r); storing each apart", len(jobs), exc)
                self._store_apart(jobs, leader, exc)
            else:
                for key in inserted:
                    owners[key].stored.inserted.add(key)
        except BaseException as exc:  # every request of the statement answers with its failure
            for job in jobs:
                job.error = exc if job is leader else _GroupFailed(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            with self._lock:
                if self._queue:
                    self._queue[0].lead = True  # it runs the next statement for everyone queued
                    self._queue[0].woken.set()
                else:
                    self._running = False
            for job in jobs:
                if job is not leader:
                    job.woken.set()

    @staticmethod
    def _store_apart(jobs: list[_Job], leader: _Job, failure: BaseException) -> None:
        """Each request's rows in statements of their own, in queue order; a request alone in the
        failed statement goes straight to finding its refused rows."""
        for job in jobs:
            try:
                job.stored = _insert_apart(job.entries, failure if len(jobs) == 1 else None)
            except Exception as exc:
                job.error = exc if job is leader else _GroupFailed(exc)


class _GroupFailed(DatabaseError):
    """The statement a request's rows were in failed (raised in each request but the one that ran it)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"the grouped INSERT failed: {cause!r}")
        self.__cause__ = cause


_group_commit = _GroupCommit()


def _kick_processing() -> None:
    kicks.inbox_kick_soon()
