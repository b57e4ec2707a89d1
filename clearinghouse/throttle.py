"""Throttles for what people do by hand: signing in, signing up, making link codes.

A :class:`Window` allows at most ``limit`` attempts per subject (an account, a client address, a
person) in any ``seconds`` (a sliding window, exact: no burst of twice the limit across a boundary as
fixed windows allow). An attempt takes a :class:`Ticket` first (:func:`throttle_acquire`; past the
limit :class:`~clearinghouse.errors.RateLimited`, 429 with ``Retry-After``, and nothing counted); a
caller that counts only failures gives the ticket back when the attempt succeeded
(:func:`throttle_release`) or forgets the subject's attempts (:func:`throttle_reset`). Counting
before the attempt, not after its failure, keeps concurrent attempts from all passing the check.

The windows live in the hub's Redis, shared by every web process (a sorted set per subject: one
Lua script, one round trip, per attempt), else in this process: with no ``REDIS_URL`` (the embedded
default), and while Redis fails (each process then counts alone: weaker, but never none). Subjects
are stored as a hash, never in clear.

Services call this, not views: the API's token endpoint and, later, the persons' session sign-in
pages share the same windows.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from django.conf import settings

from clearinghouse.errors import RateLimited
from clearinghouse.redis import redis_client

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Window:
    """At most ``limit`` attempts per subject in any ``seconds``; a limit of 0 turns the window off.

    ``refusal`` is the problem's detail, formatted with ``limit`` and ``seconds``.
    """

    name: str
    limit: int
    seconds: int
    refusal: str = "At most {limit} attempts in {seconds} s."


@dataclass(frozen=True, slots=True)
class Ticket:
    key: str
    member: str


def _key(window: Window, subject: str) -> str:
    digest = hashlib.sha256(f"{window.name}\x00{subject}".encode(errors="surrogatepass")).hexdigest()[:32]
    # Under the prefix the test suite and the intake's limiter use for rate-limit keys.
    return f"{settings.HUB_REDIS_KEY_PREFIX}ratelimit:throttle:{window.name}:{digest}"


def throttle_acquire(window: Window, subject: str) -> Ticket | None:
    """Count an attempt of ``subject``; :class:`RateLimited` (and nothing counted) past the limit.

    Returns the attempt's ticket, or None when the window is off.
    """
    if window.limit <= 0:
        return None
    ticket = Ticket(_key(window, subject), uuid.uuid4().hex)
    now_ms = time.time() * 1000
    window_ms = window.seconds * 1000
    wait_ms = _redis_acquire(ticket, now_ms, window_ms, window.limit)
    if wait_ms is None:
        wait_ms = _local.acquire(ticket, now_ms, window_ms, window.limit)
    if wait_ms > 0:
        raise RateLimited(
            window.refusal.format(limit=window.limit, seconds=window.seconds),
            headers={"Retry-After": str(max(1, math.ceil(wait_ms / 1000)))},
        )
    return ticket


def throttle_acquire_all(attempts: list[tuple[Window, str]]) -> list[Ticket]:
    """:func:`throttle_acquire` for each (window, subject) in order; if one refuses, the tickets
    already taken are given back before :class:`RateLimited` is raised (a refused attempt counts nowhere)."""
    tickets: list[Ticket] = []
    try:
        for window, subject in attempts:
            ticket = throttle_acquire(window, subject)
            if ticket is not None:
                tickets.append(ticket)
    except BaseException:
        throttle_release(*tickets)
        raise
    return tickets


def throttle_release(*tickets: Ticket) -> None:
    """The attempts of ``tickets`` no longer count (they succeeded, or failed on the hub's side)."""
    for ticket in tickets:
        done, _ = _redis_call(partial(_zrem, ticket))
        if not done:
            _local.release(ticket)


def _zrem(ticket: Ticket, client: Any) -> Any:
    return client.zrem(ticket.key, ticket.member)


def throttle_reset(window: Window, subject: str) -> None:
    """Forget every attempt of ``subject`` in ``window``."""
    key = _key(window, subject)
    done, _ = _redis_call(lambda client: client.delete(key))
    if not done:
        _local.reset(key)


def client_address(meta: Mapping[str, Any]) -> str:
    """The client's address as a throttle subject.

    ``REMOTE_ADDR``, unless ``HUB_TRUSTED_PROXIES`` says that many proxies of the hub's own stand in
    front of it: then the address the first of them saw, the ``HUB_TRUSTED_PROXIES``-th entry of
    ``X-Forwarded-For`` counted from the right (each proxy appends the address it was called from, so
    entries further left are the client's to invent). IPv6 addresses count by their /64 network: one
    subscriber usually holds a whole /64.
    """
    address = str(meta.get("REMOTE_ADDR") or "")
    proxies = settings.HUB_TRUSTED_PROXIES
    if proxies > 0:
        forwarded = [entry.strip() for entry in str(meta.get("HTTP_X_FORWARDED_FOR") or "").split(",")]
        forwarded = [entry for entry in forwarded if entry]
        if len(forwarded) >= proxies:
            address = forwarded[-proxies]
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address[:100]
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


# --- Redis ------------------------------------------------------------------------------------------

# KEYS[1] the subject's sorted set (member: ticket, score: milliseconds); ARGV now, window, limit, ticket.
# Returns 0 when the ticket was added, else the milliseconds until an attempt falls out of the window.
_ACQUIRE = """
local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count >= limit then
  local freed = redis.call('ZRANGE', KEYS[1], count - limit, count - limit, 'WITHSCORES')
  return math.max(1, math.ceil(tonumber(freed[2]) + window - now))
end
redis.call('ZADD', KEYS[1], now, ARGV[4])
redis.call('PEXPIRE', KEYS[1], window)
return 0
"""
_scripts: dict[int, Any] = {}


def _redis_acquire(ticket: Ticket, now_ms: float, window_ms: int, limit: int) -> int | None:
    """Milliseconds to wait (0: counted), or None without a working Redis."""

    def acquire(client: Any) -> int:
        script = _scripts.get(id(client))
        if script is None:
            script = _scripts[id(client)] = client.register_script(_ACQUIRE)
        return int(script(keys=[ticket.key], args=[now_ms, window_ms, limit, ticket.member]))

    done, waited = _redis_call(acquire)
    return waited if done else None


def _redis_call(operation: Callable[[Any], Any]) -> tuple[bool, Any]:
    """(True, ``operation(client)``), or (False, None) without Redis or when it fails (logged)."""
    client = redis_client()
    if client is None:
        return False, None
    try:
        return True, operation(client)
    except Exception:
        logger.warning("throttle: Redis unreachable, counting in this process", exc_info=True)
        return False, None


# --- In process -------------------------------------------------------------------------------------


class _LocalWindows:
    """The same windows in this process's memory, for when there is no Redis to share them."""

    SWEEP_AT = 10_000  # subjects held before the expired ones are swept out

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._attempts: dict[str, list[tuple[float, str]]] = {}
        self._expires: dict[str, float] = {}

    def acquire(self, ticket: Ticket, now_ms: float, window_ms: int, limit: int) -> int:
        with self._lock:
            if len(self._attempts) >= self.SWEEP_AT:
                self._sweep(now_ms)
            attempts = [a for a in self._attempts.get(ticket.key, []) if a[0] > now_ms - window_ms]
            if len(attempts) >= limit:
                self._attempts[ticket.key] = attempts
                return max(1, math.ceil(attempts[len(attempts) - limit][0] + window_ms - now_ms))
            attempts.append((now_ms, ticket.member))
            self._attempts[ticket.key] = attempts
            self._expires[ticket.key] = now_ms + window_ms
            return 0

    def release(self, ticket: Ticket) -> None:
        with self._lock:
            attempts = self._attempts.get(ticket.key)
            if attempts is not None:
                self._attempts[ticket.key] = [a for a in attempts if a[1] != ticket.member]

    def reset(self, key: str) -> None:
        with self._lock:
            self._attempts.pop(key, None)
            self._expires.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._attempts.clear()
            self._expires.clear()

    def _sweep(self, now_ms: float) -> None:
        for key in [key for key, expires in self._expires.items() if expires <= now_ms]:
            self._attempts.pop(key, None)
            self._expires.pop(key, None)


_local = _LocalWindows()
