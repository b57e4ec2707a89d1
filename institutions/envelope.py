"""CloudEvents 1.0 envelopes and the per-type allow-list of ``data`` fields (CONTRACT.md section 2).

Validation is hand-written rather than a serializer because it runs for every event on the intake
hot path (a batch is up to 1000 events). Each check names the field it rejects, so an institution
can fix its sender from the response alone.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

ACTIVITY_RECORDED = "carbon.activity.recorded"
ACTIVITY_REVERSED = "carbon.activity.reversed"
ACCOUNT_LINKED = "carbon.account.linked"
ACCOUNT_UNLINKED = "carbon.account.unlinked"
REDEMPTION_FULFILLED = "carbon.redemption.fulfilled"
REDEMPTION_REJECTED = "carbon.redemption.rejected"
SETTLEMENT_CONFIRMED = "carbon.settlement.confirmed"

ATTRIBUTES = frozenset({"specversion", "id", "source", "type", "subject", "time", "data", "datacontenttype"})
SUBJECT_REQUIRED = frozenset({ACTIVITY_RECORDED, ACTIVITY_REVERSED, ACCOUNT_LINKED, ACCOUNT_UNLINKED})
TIME_REQUIRED = frozenset({ACTIVITY_RECORDED})
# Events whose subject must be recoverable later: linking names the subject back to its institution, so
# a link event keeps an encrypted copy until it is handled (the membership keeps its own from then on).
SEAL_SUBJECT = frozenset({ACCOUNT_LINKED})

MAX_ID = 128
MAX_SUBJECT = 256
MAX_SOURCE = 512
MAX_TEXT = 256
# Quantities beyond this are not a person's daily act; they are a sender bug or an attack.
MAX_QUANTITY = Decimal("1e12")
# What the columns behind the data fields hold (docs/decisions.md, "Only what can be stored and read
# back"): ``issuer_points`` ends in a bigint column.
MAX_BIGINT = 2**63 - 1
# ``time``'s UTC instant: PostgreSQL stores 4713 BC to 294276 AD, Python (and so psycopg, reading it
# back) only years 1 to 9999. A day less at either end keeps the act's local date, in any time zone
# (the standard's days, pages in the reader's zone), inside years 1 to 9999 as well.
EARLIEST_TIME = datetime(1, 1, 2, tzinfo=UTC)
LATEST_TIME = datetime(9999, 12, 31, tzinfo=UTC) - timedelta(microseconds=1)
# PostgreSQL refuses a UTC offset of 16 hours or more ("time zone displacement out of range"); Python
# takes anything under 24. Every real zone lies within -12:00 and +14:00.
MAX_UTC_OFFSET = timedelta(hours=16)

Error = dict[str, str]


@dataclass(slots=True)
class ParsedEvent:
    event_id: str
    type: str
    source: str
    subject: str | None
    time: datetime | None
    data: dict[str, Any]
    content_hash: str


@dataclass(slots=True)
class EventVerdict:
    """What validation says of one event of a request: parsed, or the errors that reject it."""

    event_id: str | None
    parsed: ParsedEvent | None = None
    errors: list[Error] = field(default_factory=list)


# --- Field checks -----------------------------------------------------------------------------------
# Each takes the raw value and returns (normalized value, error code or None).

Check = Callable[[Any], tuple[Any, str | None]]


# Characters no stored text may hold: PostgreSQL text and jsonb refuse NUL, and a lone surrogate
# (JSON allows "\ud800") cannot be encoded as UTF-8. Unchecked they fail the INSERT (a 503 for an
# event that can never be stored) or the encoding (a 500); they are the sender's error.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _storable(value: str) -> bool:
    if value.isascii():  # the common case, without a regex
        return "\x00" not in value
    return _UNSTORABLE.search(value) is None


def _text(max_length: int) -> Check:
    def check(value: Any) -> tuple[Any, str | None]:
        if not isinstance(value, str) or not value.strip() or not _storable(value):
            return value, "invalid_string"
        if len(value) > max_length:
            return value, "too_long"
        return value, None

    return check


def _positive_decimal(value: Any) -> tuple[Any, str | None]:
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        return value, "invalid_decimal"
    try:
        number = Decimal(value.strip() if isinstance(value, str) else value)
    except (InvalidOperation, ValueError):
        return value, "invalid_decimal"
    if not number.is_finite():
        return value, "invalid_decimal"
    if number <= 0:
        return value, "not_positive"
    if number > MAX_QUANTITY or number.as_tuple().exponent < -12:  # type: ignore[operator]
        return value, "out_of_range"
    # Stored as a string: JSON numbers would go through float in most readers.
    return format(number, "f"), None


def _non_negative_int(value: Any) -> tuple[Any, str | None]:
    if isinstance(value, bool) or not isinstance(value, int):
        return value, "invalid_integer"
    if value < 0:
        return value, "negative"
    if value > MAX_BIGINT:
        return value, "out_of_range"
    return value, None


def _choice(*allowed: str) -> Check:
    def check(value: Any) -> tuple[Any, str | None]:
        return value, (None if value in allowed else "invalid_choice")

    return check


# type -> field -> (check, required)
DATA_SCHEMAS: dict[str, dict[str, tuple[Check, bool]]] = {
    ACTIVITY_RECORDED: {
        "action": (_text(64), True),
        "quantity": (_positive_decimal, True),
        "unit": (_text(32), True),
        "issuer_points": (_non_negative_int, False),
        "fingerprint": (_text(128), False),
        "evidence": (_choice("automatic", "upload", "self_declared"), False),
    },
    ACTIVITY_REVERSED: {"event_id": (_text(MAX_ID), True), "reason": (_text(MAX_TEXT), True)},
    ACCOUNT_LINKED: {"link_code": (_text(32), True)},
    ACCOUNT_UNLINKED: {},
    REDEMPTION_FULFILLED: {"redemption_id": (_text(64), True), "voucher": (_text(256), False)},
    REDEMPTION_REJECTED: {"redemption_id": (_text(64), True), "reason": (_text(MAX_TEXT), True)},
    SETTLEMENT_CONFIRMED: {
        "instruction_id": (_text(64), True),
        "status": (_choice("paid", "received", "disputed"), True),
        "reference": (_text(MAX_TEXT), True),
    },
}
EVENT_TYPES = frozenset(DATA_SCHEMAS)


def _parse_time(value: Any) -> tuple[datetime | None, str | None]:
    """The instant ``value`` names, in UTC, or the error code that refuses it.

    The instant is kept in UTC: the database then never parses an offset, and the stored value is the
    same instant as the one sent.
    """
    if not isinstance(value, str) or "T" not in value.upper():
        return None, "invalid_rfc3339"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None, "invalid_rfc3339"
    offset = moment.utcoffset()
    # RFC 3339 offsets are hours and minutes; PostgreSQL refuses a fraction of a second in one.
    # (``seconds`` counts from the start of the offset's day, so it is whole minutes for -05:30 too.)
    if offset is None or offset.seconds % 60 or offset.microseconds:
        return None, "invalid_rfc3339"
    if not -MAX_UTC_OFFSET < offset < MAX_UTC_OFFSET:
        return None, "out_of_range"
    # Compared before converting: aware comparisons subtract the offsets and cannot overflow.
    if not EARLIEST_TIME <= moment <= LATEST_TIME:
        return None, "out_of_range"
    return (moment.astimezone(UTC) if offset else moment), None


# Any character for which str.isspace() is true (the same set), found in C rather than per character
# in Python: this runs for every event of every batch.
_WHITESPACE = re.compile(r"\s")
# Built once: json.dumps would build an encoder per call, and this runs for every event. Parsed JSON
# cannot be circular, so the circularity check is skipped; the output is the same either way.
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str, check_circular=False
)


def content_hash(event: dict[str, Any]) -> str:
    """SHA-256 over the canonical JSON of the event as sent (keys sorted, no whitespace)."""
    return hashlib.sha256(_CANONICAL.encode(event).encode()).hexdigest()


def validate_event(event: dict[str, Any]) -> EventVerdict:
    """Check one CloudEvent against the contract; never raises for bad input."""
    errors: list[Error] = []
    raw_id = event.get("id")
    event_id = raw_id if isinstance(raw_id, str) else None

    for name in event.keys() - ATTRIBUTES:
        errors.append({"field": name, "code": "unexpected_field"})

    if event.get("specversion") != "1.0":
        errors.append({"field": "specversion", "code": "missing" if "specversion" not in event else "invalid_choice"})
    if "id" not in event:
        errors.append({"field": "id", "code": "missing"})
    elif not isinstance(raw_id, str) or not raw_id or not _storable(raw_id):
        errors.append({"field": "id", "code": "invalid_string"})
    elif len(raw_id) > MAX_ID:
        errors.append({"field": "id", "code": "too_long"})

    source = event.get("source")
    if source is None:
        errors.append({"field": "source", "code": "missing"})
    elif (
        not isinstance(source, str)
        or not source
        or len(source) > MAX_SOURCE
        or _WHITESPACE.search(source)
        or not _storable(source)
    ):
        errors.append({"field": "source", "code": "invalid_uri_reference"})

    event_type = event.get("type")
    if event_type is None:
        errors.append({"field": "type", "code": "missing"})
    elif not isinstance(event_type, str) or event_type not in EVENT_TYPES:
        errors.append({"field": "type", "code": "unknown_type"})
        event_type = None  # requires nothing further; an object or a list cannot even be looked up (was a 500)

    subject = event.get("subject")
    if subject is None:
        if event_type in SUBJECT_REQUIRED:
            errors.append({"field": "subject", "code": "missing"})
    elif not isinstance(subject, str) or not subject or not _storable(subject):
        errors.append({"field": "subject", "code": "invalid_string"})
    elif len(subject) > MAX_SUBJECT:
        errors.append({"field": "subject", "code": "too_long"})

    moment = None
    if "time" in event:
        moment, problem = _parse_time(event["time"])
        if problem:
            errors.append({"field": "time", "code": problem})
    elif event_type in TIME_REQUIRED:
        errors.append({"field": "time", "code": "missing"})

    if "datacontenttype" in event and event["datacontenttype"] != "application/json":
        errors.append({"field": "datacontenttype", "code": "invalid_choice"})

    data = event.get("data", {})
    clean: dict[str, Any] = {}
    if not isinstance(data, dict):
        errors.append({"field": "data", "code": "not_an_object"})
    elif event_type in DATA_SCHEMAS:
        schema = DATA_SCHEMAS[event_type]
        for name in data.keys() - schema.keys():
            errors.append({"field": f"data.{name}", "code": "unexpected_field"})
        for name, (check, required) in schema.items():
            if name not in data:
                if required:
                    errors.append({"field": f"data.{name}", "code": "missing"})
                continue
            value, problem = check(data[name])
            if problem:
                errors.append({"field": f"data.{name}", "code": problem})
            else:
                clean[name] = value

    if errors:
        return EventVerdict(event_id=event_id, errors=errors)
    assert isinstance(event_id, str) and isinstance(event_type, str) and isinstance(source, str)
    return EventVerdict(
        event_id=event_id,
        parsed=ParsedEvent(
            event_id=event_id,
            type=event_type,
            source=source,
            subject=subject,
            time=moment,
            data=clean,
            content_hash=content_hash(event),
        ),
    )
