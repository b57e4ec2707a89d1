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
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from clearinghouse.errors import (
    InvalidEnvelope,
    InvalidSignature,
    MalformedJson,
    PayloadTooLarge,
    RateLimited,
    StaleTimestamp,
    Unavailable,
    UnsupportedMediaType,
)
from clearinghouse.redis import redis_client
from institutions import crypto
from institutions.envelope import SEAL_SUBJECT, EventVerdict, validate_event
from institutions.models import InboxEvent
from institutions.selectors import Verifier, institution_verifier

logger = logging.getLogger(__name__)

SINGLE = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
EITHER = "application/json"
CONTENT_TYPES = (SINGLE, BATCH, EITHER)
_TIMESTAMP = re.compile(r"^[0-9]{1,15}$")


# --- Request-level checks ---------------------------------------------------------------------------


def check_size(content_length: str | None) -> None:
    try:
        declared = int(content_length or 0)
    except ValueError:
        declared = 0
    if declared > settings.HUB_INTAKE_MAX_BYTES:
        raise PayloadTooLarge(f"At most {settings.HUB_INTAKE_MAX_BYTES} bytes per request.")


def check_content_type(content_type: str) -> str:
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type not in CONTENT_TYPES:
        raise UnsupportedMediaType(f"Send one of {', '.join(CONTENT_TYPES)}; got {media_type or 'none'}.")
    return media_type


def authenticate(code: str, headers: Mapping[str, str], body: bytes) -> Verifier:
    """The verifier of the institution that signed ``body``, or :class:`InvalidSignature`.

    Unknown and suspended institutions, missing or malformed headers and non-matching signatures
    all get the same answer.
    """
    msg_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    signature = headers.get("webhook-signature", "")
    if not msg_id or not signature or not timestamp:
        raise InvalidSignature("The webhook-id, webhook-timestamp and webhook-signature headers are required.")
    if "." in msg_id or len(msg_id) > 256 or not _TIMESTAMP.match(timestamp):
        raise InvalidSignature("Malformed webhook headers.")
    verifier = institution_verifier(code)
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
    protects the hub, it must not take intake down with it."""
    limit = verifier.rate_limit_per_second
    now = time.time()
    window = int(now)
    client = redis_client()
    if client is not None:
        key = f"ratelimit:intake:{verifier.institution_id}:{window}"
        try:
            pipe = client.pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, 2)
            count = pipe.execute()[0]
        except Exception:
            logger.warning("rate limiter: Redis unreachable, letting the request through", exc_info=True)
            return
    else:
        count = _local_window_count(verifier.institution_id, window)
    if count > limit:
        retry_after = max(1, int(window + 1 - now + 0.999))
        raise RateLimited(
            f"At most {limit} requests per second for this institution.",
            headers={"Retry-After": str(retry_after)},
        )


_local_windows: dict[int, tuple[int, int]] = {}


def _local_window_count(institution_id: int, window: int) -> int:
    current_window, count = _local_windows.get(institution_id, (window, 0))
    count = count + 1 if current_window == window else 1
    _local_windows[institution_id] = (window, count)
    return count


def parse_events(body: bytes, media_type: str) -> list[Any]:
    """The list of events the body carries; numbers with a fraction are read as Decimal, never float."""
    try:
        document = json.loads(body, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedJson(f"The body is not JSON: {exc}.") from exc
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


def events_store(*, verifier: Verifier, webhook_id: str, events: list[dict[str, Any]]) -> IntakeResult:
    """Validate each event and insert the good ones in one transaction; per-event results in order.

    Idempotent per (institution, event id): a resend with the same content is ``duplicate``, with
    other content ``conflict``; neither changes the stored row. Safe under concurrent identical
    requests: PostgreSQL's unique index makes the second inserter wait for the first and skip.
    Raises :class:`Unavailable` when the database cannot store (the caller must not answer 2xx).
    """
    verdicts: list[EventVerdict] = [validate_event(event) for event in events]
    first_hash: dict[str, str] = {}
    rows: list[tuple[Any, ...]] = []
    now = timezone.now()
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
            (
                verifier.institution_id,
                parsed.event_id,
                parsed.type,
                parsed.source,
                ref,
                sealed,
                parsed.time,
                json.dumps(parsed.data, separators=(",", ":")),
                parsed.content_hash,
                webhook_id,
                now,
                now,
            )
        )

    inserted: set[str] = set()
    existing: dict[str, str] = {}
    if rows:
        try:
            with transaction.atomic():
                inserted = _insert_rows(rows)
                missing = [row[1] for row in rows if row[1] not in inserted]
                if missing:
                    existing = dict(
                        InboxEvent.objects.filter(
                            institution_id=verifier.institution_id, event_id__in=missing
                        ).values_list("event_id", "content_hash")
                    )
                if inserted:
                    transaction.on_commit(_kick_processing, robust=True)
        except DatabaseError as exc:
            logger.exception("intake: could not store %d events", len(rows))
            raise Unavailable("The hub cannot store events right now; retry later.") from exc

    result = IntakeResult()
    seen: set[str] = set()
    for verdict in verdicts:
        parsed = verdict.parsed
        if parsed is None:
            result.results.append({"id": verdict.event_id, "status": "rejected", "errors": verdict.errors})
            continue
        event_id = parsed.event_id
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


def _insert_rows(rows: list[tuple[Any, ...]]) -> set[str]:
    """Multi-row INSERT ... ON CONFLICT DO NOTHING RETURNING: one round trip for the whole batch,
    and the database (not a prior SELECT) decides which events are new."""
    table = InboxEvent._meta.db_table
    ops = connection.ops
    params: list[Any] = []
    for row in rows:
        params.extend(row[:6])
        params.append(ops.adapt_datetimefield_value(row[6]) if connection.vendor == "sqlite" else row[6])
        params.extend(row[7:10])
        if connection.vendor == "sqlite":
            params.extend(ops.adapt_datetimefield_value(v) for v in row[10:])
        else:
            params.extend(row[10:])
    # Only the fixed table name, column list and placeholders are formatted in; values are bound.
    sql = (
        f"INSERT INTO {table} ({_COLUMNS}) VALUES {', '.join([_ROW] * len(rows))} "  # noqa: S608
        "ON CONFLICT (institution_id, event_id) DO NOTHING RETURNING event_id"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {r[0] for r in cursor.fetchall()}


def _kick_processing() -> None:
    from institutions.tasks import inbox_kick

    inbox_kick()
