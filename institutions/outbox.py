"""Outbound delivery: the outbox of webhooks the hub owes institutions, and the worker that sends them.

CONTRACT.md section 3, DESIGN.md "Outbound delivery" and "Reliability model":

* :func:`outbox_enqueue` writes the message in the caller's transaction, so the webhook exists if and
  only if the state change that causes it committed; a delivery run is kicked after the commit.
* :func:`deliveries_send` claims due rows (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), leases them by
  pushing ``next_attempt_at`` past the longest the batch can take and counts the attempt *before*
  sending, so a worker that dies mid-batch still uses up the attempt and a row cannot loop forever.
  The count is also the claim's fence: a batch that outlives its lease (the message claimed again
  meanwhile) stores its attempts but leaves the message's state to the later claim.
  The HTTP requests run in a thread pool (no database access there); the results are written back in
  one transaction, with one :class:`DeliveryAttempt` per try.
* Signatures per Standard Webhooks: ``v1a`` with the hub's active Ed25519 key, plus ``v1`` with every
  active HMAC secret of the institution (one during normal operation, two during a rotation). The
  ``webhook-id`` is the message id, the same on every retry; ``webhook-timestamp`` is the attempt's.
* 2xx is delivered. Redirects are never followed and count as failures. ``410`` marks the message
  ``dead`` and disables the institution's endpoint (its other messages are held, not dropped, until
  an operator re-enables it). ``429``, ``502``, ``504`` and any ``Retry-After`` pause the endpoint:
  until ``Retry-After`` (seconds or an HTTP date, capped at a day) when given, else for
  :data:`SLOW_DOWN_SECONDS`; the message itself waits for its next slot, or ``Retry-After`` if later.
* Retry schedule: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h (ten attempts),
  each delay with +-10 % jitter; a message that fails its tenth attempt is ``dead``.
* SSRF guard: the host is resolved and every address must be public (not private, loopback,
  link-local, multicast, reserved or unspecified; an IPv6 address that carries an IPv4 one, mapped or
  6to4, only if that one is public too) unless ``HUB_ALLOW_PRIVATE_ENDPOINTS``; the connection then
  goes to the address that was checked (no second lookup to rebind). A refused target is recorded as
  a *failed attempt* with a clear error and retried on the schedule, like any unreachable endpoint:
  DNS and settings can be fixed, and the admin shows why it failed.

Messages of an institution without an endpoint, or whose endpoint is disabled or paused, are not
claimed: they stay due and go out once the endpoint is usable. Order between messages is not
guaranteed (retries overtake); receivers deduplicate by ``webhook-id``.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import random
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import connection, transaction
from django.db.models import Case, DateTimeField, F, Q, Value, When
from django.utils import timezone

from clearinghouse.db import copy_rows, rows_update
from institutions import crypto, kicks
from institutions.models import Credential, DeliveryAttempt, Institution, OutboxMessage
from institutions.services import hub_signing_key, sealed_subjects_reseal

logger = logging.getLogger(__name__)

Status = OutboxMessage.Status

# Delay before each attempt, in seconds: attempt 1 at once, attempt 10 a day after attempt 9.
HOUR = 3600
RETRY_SCHEDULE = (0, 5, 5 * 60, 30 * 60, 2 * HOUR, 5 * HOUR, 10 * HOUR, 14 * HOUR, 20 * HOUR, 24 * HOUR)
MAX_ATTEMPTS = len(RETRY_SCHEDULE)
JITTER = 0.10
TIMEOUT_SECONDS = 15.0
# What a batch's lease allows for resolving one round of endpoint names (``getaddrinfo`` has no timeout
# of its own; glibc's resolver gives up after two tries of 5 s at one nameserver).
RESOLVE_SECONDS = 10.0
SLOW_DOWN_STATUSES = frozenset({429, 502, 504})
SLOW_DOWN_SECONDS = 5
MAX_RETRY_AFTER_SECONDS = 24 * 3600
USER_AGENT = "carbon-clearinghouse-webhooks/1"
CONTENT_TYPE = "application/cloudevents+json"
MAX_RESPONSE_BYTES = 64 * 1024


def outbox_source() -> str:
    """The CloudEvents ``source`` of every webhook the hub sends (``HUB_EVENT_SOURCE``)."""
    return getattr(settings, "HUB_EVENT_SOURCE", "/clearinghouse")


def _concurrency() -> int:
    return int(getattr(settings, "HUB_DELIVERY_CONCURRENCY", 32))


def _allow_private() -> bool:
    return bool(getattr(settings, "HUB_ALLOW_PRIVATE_ENDPOINTS", False))


# --- Enqueue ----------------------------------------------------------------------------------------


def outbox_enqueue(
    *,
    institution: Institution,
    type: str,
    data: dict[str, Any],
    subject: str | None = None,
    subject_sealed: str = "",
) -> OutboxMessage:
    """Store a webhook for ``institution``; call it inside the transaction that makes the change.

    The CloudEvent is built here, once: its ``id`` is the ``webhook-id`` of every attempt (see
    :func:`outbox_message` for ``subject_sealed``). Delivery starts after the surrounding transaction
    commits (and never if it rolls back). SQL of other apps stores webhooks through this function's SQL
    twin, ``institutions_outbox_enqueue`` (institutions/sql), which builds the same bytes.
    """
    message = outbox_message(
        institution_id=institution.pk, type=type, data=data, subject=subject, subject_sealed=subject_sealed
    )
    message.save(force_insert=True)
    outbox_deliver_after_commit()
    return message


def outbox_message(
    *, institution_id: int, type: str, data: dict[str, Any], subject: str | None = None, subject_sealed: str = ""
) -> OutboxMessage:
    """The webhook as :func:`outbox_enqueue` stores it, not yet saved.

    ``subject_sealed``: a person's sealed subject id at the institution, which :func:`outbox_body`
    unseals into ``data.subject`` when the message is sent (``data`` holds null there meanwhile)."""
    message_id = outbox_message_id()
    now = timezone.now()
    return OutboxMessage(
        institution_id=institution_id,
        message_id=message_id,
        type=type,
        body=outbox_event(message_id=message_id, type=type, time=now, data=data, subject=subject),
        subject_sealed=subject_sealed,
        next_attempt_at=now,
        created_at=now,
    )


def outbox_message_id() -> str:
    """A new message id: the CloudEvent ``id`` and the ``webhook-id`` of every attempt."""
    return f"msg_{uuid.uuid4().hex}"


def outbox_event(
    *, message_id: str, type: str, time: datetime, data: dict[str, Any], subject: str | None = None
) -> str:
    """The CloudEvent as stored, compact JSON: the envelope (:func:`outbox_event_head`), the data, and the
    closing brace. ``institutions_outbox_enqueue`` (institutions/sql) builds the same bytes in SQL."""
    return (
        outbox_event_head(message_id=message_id, type=type, time=time, subject=subject)
        + json.dumps(data, cls=DjangoJSONEncoder, separators=(",", ":"), ensure_ascii=False)
        + "}"
    )


def outbox_event_head(*, message_id: str, type: str, time: datetime, subject: str | None = None) -> str:
    """The CloudEvent's JSON up to its ``data``: the caller appends the data's JSON and a closing brace, as
    :func:`outbox_event` does."""
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": message_id,
        "source": outbox_source(),
        "type": type,
        "time": time.isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
    }
    if subject is not None:
        event["subject"] = subject
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)[:-1] + ',"data":'


def outbox_body(message: OutboxMessage) -> str:
    """The message's body as sent: the stored CloudEvent, with the person's subject id unsealed into
    ``data.subject`` when the message carries one sealed. The same text on every attempt."""
    if not message.subject_sealed:
        return message.body
    event = json.loads(message.body)
    event["data"]["subject"] = crypto.unseal(message.subject_sealed)
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


def outbox_subjects_sealed() -> int:
    """How many messages keep a person's subject id sealed (what a key rotation reseals)."""
    return OutboxMessage.objects.exclude(subject_sealed="").count()


def outbox_subjects_reseal(*, batch_size: int = 500, on_batch: Callable[[int], None] | None = None) -> int:
    """Re-encrypt the subject ids sealed in messages under the newest ``HUB_ENCRYPTION_KEYS`` key, batch
    by batch (:func:`institutions.services.sealed_subjects_reseal`); returns how many."""
    return sealed_subjects_reseal(model=OutboxMessage, batch_size=batch_size, on_batch=on_batch)


def outbox_deliver_after_commit() -> None:
    """Wake the delivery worker once the surrounding transaction has committed: a new message, or
    an operator's change that makes messages due (a retry, a replay, a re-enabled endpoint).

    The wake-up is coalesced per process (``deliveries_kick_soon``): it may trail the commit by up to
    ``HUB_DELIVERY_KICK_COALESCE_SECONDS``; with in-process tasks it sends at once."""
    transaction.on_commit(kicks.deliveries_kick_soon, robust=True)


# --- Schedule ---------------------------------------------------------------------------------------


def retry_delay(attempts: int, *, rng: random.Random | None = None) -> float | None:
    """Seconds to wait after a failed ``attempts``-th attempt, jittered; None when none is left."""
    if attempts >= MAX_ATTEMPTS:
        return None
    base = RETRY_SCHEDULE[attempts]
    return base * (1 + (rng or random).uniform(-JITTER, JITTER))


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds from now (delta-seconds or an HTTP date), capped at a day."""
    if not value:
        return None
    value = value.strip()
    seconds: float
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        seconds = (when - (now or timezone.now())).total_seconds()
    return max(0.0, min(seconds, MAX_RETRY_AFTER_SECONDS))


# --- SSRF guard and HTTP ----------------------------------------------------------------------------


class RefusedTarget(Exception):
    """The endpoint resolves to an address the hub may not reach."""


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return _is_public_ip(ip.ipv4_mapped)
        # 6to4 (2002::/16) counts as global, yet its traffic goes to the IPv4 address it embeds
        # (2002:7f00:1:: is 127.0.0.1): that address must be public too. Teredo (2001::/32) is not
        # global in ipaddress's tables; its server and client addresses are checked all the same.
        embedded = [ip.sixtofour, *(ip.teredo or ())]
        if any(v4 is not None and not _is_public_ip(v4) for v4 in embedded):
            return False
    return _is_public_ip(ip)


def _is_public_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def resolve_endpoint(host: str, port: int, *, allow_private: bool) -> str:
    """The address to connect to for ``host``; raises :class:`RefusedTarget` for non-public ones.

    Every address the name resolves to is checked (an attacker's name may mix public and private ones).
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise RefusedTarget(f"cannot resolve {host!r}: {exc}") from exc
    addresses: list[str] = []
    for info in infos:
        address = info[4][0]
        assert isinstance(address, str)  # AF_INET/AF_INET6 socket addresses start with the host string
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise RefusedTarget(f"{host!r} resolves to no address")
    if not allow_private:
        refused = [a for a in addresses if not _is_public(a)]
        if refused:
            raise RefusedTarget(
                f"refused: {host!r} resolves to non-public address {refused[0]} "
                "(private, loopback, link-local, multicast or reserved; see HUB_ALLOW_PRIVATE_ENDPOINTS)"
            )
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the checked address while the Host header keeps the name."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        context = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address
        self._ssl_context = context  # http.client keeps its own copy in the untyped ``_context``

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._ssl_context.wrap_socket(sock, server_hostname=self.host)


_local = threading.local()


def _connections() -> dict[tuple[str, str, int, str], http.client.HTTPConnection]:
    pool = getattr(_local, "connections", None)
    if pool is None:
        pool = _local.connections = {}
    return pool


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str
    address: str | None  # None when refused
    refusal: str = ""


@dataclass(frozen=True)
class Result:
    status_code: int | None
    error: str
    duration_ms: int
    retry_after: str | None = None


def _target(url: str, allow_private: bool) -> Target:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = parts.hostname or ""
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if scheme not in ("http", "https") or not host:
        return Target(scheme, host, 0, path, None, f"refused: {url!r} is not an http(s) URL")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        return Target(scheme, host, 0, path, None, f"refused: {url!r} has an invalid port")
    try:
        address = resolve_endpoint(host, port, allow_private=allow_private)
    except RefusedTarget as exc:
        return Target(scheme, host, port, path, None, str(exc))
    return Target(scheme, host, port, path, address)


def _post(target: Target, body: bytes, headers: dict[str, str]) -> Result:
    """One POST, on this thread's kept-alive connection to the target when it has one."""
    started = time.monotonic()

    def elapsed() -> int:
        return int((time.monotonic() - started) * 1000)

    if target.address is None:
        return Result(None, target.refusal, 0)
    key = (target.scheme, target.address, target.port, target.host)
    pool = _connections()
    for fresh in (False, True):
        conn = None if fresh else pool.get(key)
        reused = conn is not None
        if conn is None:
            cls = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
            conn = cls(target.host, target.port, target.address, TIMEOUT_SECONDS)
            pool[key] = conn
        try:
            conn.request("POST", target.path, body=body, headers=headers)
            response = conn.getresponse()
            response.read(MAX_RESPONSE_BYTES)
            status = response.status
            retry_after = response.getheader("Retry-After")
            location = response.getheader("Location") or ""
            if response.will_close or not response.isclosed():  # body left unread or server closing: reconnect
                conn.close()
                pool.pop(key, None)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
            conn.close()
            pool.pop(key, None)
            if reused:  # a kept-alive connection the server had closed: try once on a new one
                continue
            return Result(None, f"{type(exc).__name__}: {exc}", elapsed())
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            pool.pop(key, None)
            message = "timeout after 15 s" if isinstance(exc, TimeoutError | socket.timeout) else str(exc)
            return Result(None, f"{type(exc).__name__}: {message}"[:500], elapsed())
        if 200 <= status < 300:
            return Result(status, "", elapsed(), retry_after)
        if 300 <= status < 400:
            return Result(status, f"HTTP {status}: redirect to {location[:200]!r} not followed", elapsed(), retry_after)
        return Result(status, f"HTTP {status}", elapsed(), retry_after)
    raise AssertionError("unreachable")


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=_concurrency(), thread_name_prefix="delivery")
        return _executor


# --- Claim, send, record ----------------------------------------------------------------------------


def _lease_seconds(limit: int, endpoints: int) -> float:
    """Longest a batch of ``limit`` messages to ``endpoints`` institutions can take (every name slow to
    resolve, every request timing out), plus a margin."""
    concurrency = max(1, _concurrency())
    return -(-endpoints // concurrency) * RESOLVE_SECONDS + -(-limit // concurrency) * (TIMEOUT_SECONDS + 1) + 30


def deliveries_claim(*, limit: int) -> list[int]:
    """Lease up to ``limit`` due messages, counting their attempt now; returns their ids.

    Rows that already used every attempt (their worker died after the claim) are marked dead here.
    """
    return list(_claim(limit=limit))


def _claim(*, limit: int) -> dict[int, int]:
    """:func:`deliveries_claim`, with each claimed message's attempt count after the claim: the claim's
    fence. A later claim (this one's lease ran out) counts another attempt, and a worker whose count no
    longer matches leaves the message to the worker that claimed it last (:func:`_results_save`)."""
    now = timezone.now()
    usable = (
        ~Q(institution__endpoint_url="")
        & Q(institution__endpoint_disabled_at__isnull=True)
        & (Q(institution__endpoint_paused_until__isnull=True) | Q(institution__endpoint_paused_until__lte=now))
    )
    with transaction.atomic():
        due = Q(status__in=[Status.PENDING, Status.FAILED], next_attempt_at__lte=now)
        query = OutboxMessage.objects.filter(usable, due)
        if connection.vendor == "postgresql":
            query = query.select_for_update(skip_locked=True, of=("self",))
        else:
            query = query.select_for_update()
        candidates = list(query.order_by("next_attempt_at").values_list("id", "attempts", "institution_id")[:limit])
        exhausted = [pk for pk, attempts, _ in candidates if attempts >= MAX_ATTEMPTS]
        claimed = {pk: attempts + 1 for pk, attempts, _ in candidates if attempts < MAX_ATTEMPTS}
        if exhausted:
            OutboxMessage.objects.filter(pk__in=exhausted).update(
                status=Status.DEAD, last_error="worker lost during the last attempt"
            )
        if claimed:
            endpoints = len({institution for pk, _, institution in candidates if pk in claimed})
            OutboxMessage.objects.filter(pk__in=list(claimed)).update(
                attempts=F("attempts") + 1,
                next_attempt_at=now + timedelta(seconds=_lease_seconds(len(claimed), endpoints)),
            )
    return claimed


def _signers(institution_ids: Iterable[int]) -> tuple[Any, dict[int, list[bytes]]]:
    _, private = hub_signing_key()
    secrets: dict[int, list[bytes]] = {}
    credentials = Credential.objects.filter(
        institution_id__in=list(institution_ids), kind=Credential.Kind.HMAC, status=Credential.Status.ACTIVE
    ).order_by("-created_at")
    for credential in credentials:
        try:
            secrets.setdefault(credential.institution_id, []).append(
                crypto.hmac_secret_bytes(crypto.unseal(credential.secret_sealed))
            )
        except crypto.MalformedKey:
            logger.error("delivery: HMAC credential %s cannot be unsealed; signing without it", credential.pk)
    return private, secrets


def deliveries_send(*, limit: int = 500, rng: random.Random | None = None) -> dict[str, int]:
    """Claim up to ``limit`` due messages, send them concurrently and record every attempt.

    Returns how many ended delivered, failed (to retry) and dead.
    """
    claimed = _claim(limit=limit)
    if not claimed:
        return {}
    messages = [
        m
        for m in OutboxMessage.objects.filter(pk__in=claimed).select_related("institution").order_by("id")
        if m.attempts == claimed[m.pk]  # else claimed again already (a retry-now during the lease): not ours
    ]
    institutions = {m.institution_id: m.institution for m in messages}
    private, secrets = _signers(institutions)
    allow_private = _allow_private()
    # Every endpoint's name resolved at once, in the pool (the lease allows for it).
    endpoints = list(institutions.items())
    resolved = _pool().map(lambda item: _target(item[1].endpoint_url, allow_private), endpoints)
    targets = {pk: target for (pk, _), target in zip(endpoints, resolved, strict=True)}

    def send(message: OutboxMessage) -> Result:
        try:
            body = outbox_body(message).encode()
        except crypto.MalformedKey:  # sealed under a key retired before subjects_reseal reached it
            return Result(None, "the subject id cannot be unsealed with any configured key (HUB_ENCRYPTION_KEYS)", 0)
        headers = crypto.webhook_headers(
            body,
            msg_id=message.message_id,
            timestamp=int(time.time()),
            hmac_secrets=secrets.get(message.institution_id, ()),
            ed25519_keys=[private],
        )
        headers.update({"Content-Type": CONTENT_TYPE, "User-Agent": USER_AGENT})
        return _post(targets[message.institution_id], body, headers)

    attempted_at = timezone.now()
    results = list(_pool().map(send, messages))
    return _record(messages, results, attempted_at, rng=rng)


@transaction.atomic
def _record(
    messages: Sequence[OutboxMessage], results: Sequence[Result], attempted_at: datetime, *, rng: random.Random | None
) -> dict[str, int]:
    now = timezone.now()
    tally = {"delivered": 0, "failed": 0, "dead": 0}
    gone: set[int] = set()
    pauses: dict[int, datetime] = {}
    attempts = []
    for message, result in zip(messages, results, strict=True):
        attempts.append(
            DeliveryAttempt(
                message=message,
                attempted_at=attempted_at,
                status_code=result.status_code,
                error=result.error[:2000],
                duration_ms=result.duration_ms,
            )
        )
        message.last_status_code = result.status_code
        message.last_error = result.error[:2000]
        code = result.status_code
        if code is not None and 200 <= code < 300:
            message.status, message.delivered_at = Status.DELIVERED, now
        elif code == 410:
            message.status = Status.DEAD
            gone.add(message.institution_id)
        else:
            retry_after = parse_retry_after(result.retry_after, now=now)
            if retry_after is not None or code in SLOW_DOWN_STATUSES:
                until = now + timedelta(seconds=SLOW_DOWN_SECONDS if retry_after is None else retry_after)
                pauses[message.institution_id] = max(until, pauses.get(message.institution_id, until))
            delay = retry_delay(message.attempts, rng=rng)
            if delay is None:
                message.status = Status.DEAD
            else:
                message.status = Status.FAILED
                message.next_attempt_at = now + timedelta(seconds=max(delay, retry_after or 0))
        tally[message.status] += 1
    written = _results_save(messages, attempts)
    overrun = [m for m in messages if m.pk not in written]
    if overrun:
        for message in overrun:
            tally[message.status] -= 1
        logger.warning(
            "delivery: the lease of %d message(s) ran out before their results were written and another "
            "worker claimed them again; their results are on record as attempts only: %s",
            len(overrun),
            ", ".join(m.message_id for m in overrun),
        )
    if gone:
        Institution.objects.filter(pk__in=gone, endpoint_disabled_at__isnull=True).update(endpoint_disabled_at=now)
        logger.warning("delivery: endpoints of institutions %s answered 410 and are disabled", sorted(gone))
    if pauses:  # each institution's own pause, in one statement; a longer pause already set stays
        pause = Case(*(When(pk=pk, then=Value(u)) for pk, u in pauses.items()), output_field=DateTimeField())
        Institution.objects.filter(pk__in=list(pauses)).filter(
            Q(endpoint_paused_until__isnull=True) | Q(endpoint_paused_until__lt=pause)
        ).update(endpoint_paused_until=pause)
    if tally["dead"]:
        logger.error("delivery: %d message(s) are dead", tally["dead"])
    return tally


def _results_save(messages: Sequence[OutboxMessage], attempts: Sequence[DeliveryAttempt]) -> set[int]:
    """Every attempt and every message's new state, in two statements on PostgreSQL (COPY, and one
    ``UPDATE ... FROM unnest``); Django's ``bulk_update`` builds a CASE per row and field instead.

    A message is written only while its attempt count is still the one this worker's claim left: if the
    batch outlived its lease and another worker claimed the message again, that worker's result stands
    (the request did go out, so its attempt is stored all the same). Returns the ids of the messages
    written."""
    copy_rows(
        DeliveryAttempt,
        ("message_id", "attempted_at", "status_code", "error", "duration_ms"),
        [(a.message_id, a.attempted_at, a.status_code, a.error, a.duration_ms) for a in attempts],
    )
    return rows_update(
        OutboxMessage,
        [m.pk for m in messages],
        {
            "status": ("text", [m.status for m in messages]),
            "next_attempt_at": ("timestamptz", [m.next_attempt_at for m in messages]),
            "last_status_code": ("int", [m.last_status_code for m in messages]),
            "last_error": ("text", [m.last_error for m in messages]),
            "delivered_at": ("timestamptz", [m.delivered_at for m in messages]),
        },
        match={"attempts": ("int", [m.attempts for m in messages])},
    )


def deliveries_drain(*, limit: int = 500, budget_seconds: float = 60.0) -> dict[str, int]:
    """Send batches until nothing is due or the time budget is spent."""
    tally = {"delivered": 0, "failed": 0, "dead": 0}
    deadline = time.monotonic() + budget_seconds
    while True:
        batch = deliveries_send(limit=limit)
        for key, value in batch.items():
            tally[key] += value
        if sum(batch.values()) < limit or time.monotonic() >= deadline:
            return tally


# --- Operator actions -------------------------------------------------------------------------------


@transaction.atomic
def outbox_retry_now(*, ids: Iterable[int]) -> int:
    """Make pending or failed messages due at once (their attempts and schedule carry on)."""
    count = OutboxMessage.objects.filter(pk__in=list(ids), status__in=[Status.PENDING, Status.FAILED]).update(
        next_attempt_at=timezone.now()
    )
    if count:
        outbox_deliver_after_commit()
    return count


@transaction.atomic
def outbox_replay(*, ids: Iterable[int]) -> int:
    """Put dead messages back to pending with a fresh schedule (same webhook-id); returns how many."""
    count = OutboxMessage.objects.filter(pk__in=list(ids), status=Status.DEAD).update(
        status=Status.PENDING, attempts=0, next_attempt_at=timezone.now(), last_error=""
    )
    if count:
        outbox_deliver_after_commit()
    return count


@transaction.atomic
def institution_endpoint_enable(*, institution: Institution) -> Institution:
    """Lift a 410 disable and any pause; held messages go out on the next run."""
    institution.endpoint_disabled_at = None
    institution.endpoint_paused_until = None
    institution.save(update_fields=["endpoint_disabled_at", "endpoint_paused_until"])
    outbox_deliver_after_commit()
    return institution
