"""Celery tasks of the edge: thin shells around the dispatcher, safe to run twice."""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import shared_task
from django.conf import settings

from clearinghouse.redis import redis_client
from institutions import inbox

logger = logging.getLogger(__name__)

# A queued drain already exists while this key lives; intake requests then skip enqueueing another.
KICK_KEY = f"{settings.HUB_REDIS_KEY_PREFIX}inbox:drain-queued"
KICK_TTL_SECONDS = 10


@shared_task(acks_late=True, ignore_result=True)
def inbox_drain() -> dict[str, int]:
    client = redis_client()
    if client is not None:
        # Cleared before claiming: an event committed after this line sets the key again and queues
        # another drain; one committed before it is seen by the claims below. None waits for the sweeper.
        try:
            client.delete(KICK_KEY)
        except Exception:
            logger.warning("inbox_drain: Redis unreachable; relying on the sweeper", exc_info=True)
    tally = inbox.inbox_drain()
    return dict(tally)


def inbox_kick() -> None:
    """Make sure a drain will run soon, enqueueing at most one per ``KICK_TTL_SECONDS`` under load.

    Runs after the intake's commit. A failure here loses nothing (the rows are stored and the sweeper
    finds them), so it is logged, never raised into the request.
    """
    if settings.CELERY_TASK_ALWAYS_EAGER:
        inbox.inbox_drain()
        return
    _enqueue_once(inbox_drain, key=KICK_KEY, ttl=KICK_TTL_SECONDS, name="inbox_kick")


def _enqueue_once(task: Any, *, key: str, ttl: int, name: str) -> None:
    """Enqueue ``task`` unless one is already queued (the Redis key ``key`` lives while it is).

    A failure loses nothing (the beat task finds the rows), so it is logged, never raised; the key is
    cleared again so the next commit tries afresh.
    """
    client = redis_client()
    try:
        if client is not None and not client.set(key, "1", nx=True, ex=ttl):
            return
        task.delay()
    except Exception:
        logger.warning("%s: broker unreachable; the beat task will enqueue later", name, exc_info=True)
        if client is not None:
            try:
                client.delete(key)
            except Exception:
                logger.debug("%s: could not clear the kick key", name, exc_info=True)


class KickCoalescer:
    """A kick after every commit, coalesced per process for the hot paths.

    Without coalescing every request pays a Redis round trip after its commit (the ``SET NX`` of the
    kick) although under load nearly all of them find a run already queued. Here the first commit of
    an interval (``interval()`` seconds, asked at each call so a setting can change; 0 kicks after
    every commit) kicks at once, in the request; later commits of the interval schedule one trailing
    kick at its end (a timer thread) unless one is scheduled. The guarantee of the kick is kept: every
    commit is followed by a kick that starts after it (a commit that sees a trailing kick pending is
    covered by it, because the trailing kick clears the pending flag under the lock before it kicks).
    A kick still pending when the process exits is sent by an exit hook; if that is lost too, the beat
    task finds the rows later.
    """

    def __init__(self, kick: Callable[[], None], *, interval: Callable[[], float]) -> None:
        self._kick = kick
        self._interval = interval
        self._lock = threading.Lock()
        self._last = float("-inf")
        self._trailing_pending = False
        atexit.register(self._trailing)

    def __call__(self) -> None:
        interval = self._interval()
        if settings.CELERY_TASK_ALWAYS_EAGER or interval <= 0:
            self._kick()
            return
        now = time.monotonic()
        with self._lock:
            kick_now = now - self._last >= interval
            if kick_now:
                self._last = now
            elif not self._trailing_pending:
                self._trailing_pending = True
                timer = threading.Timer(self._last + interval - now, self._trailing)
                timer.daemon = True
                timer.start()
        if kick_now:
            self._kick()

    def _trailing(self) -> None:
        with self._lock:
            if not self._trailing_pending:
                return
            self._trailing_pending = False
            self._last = time.monotonic()
        self._kick()


# The intake's kick after its commit: :func:`inbox_kick` (looked up at call time), coalesced over
# ``HUB_INBOX_KICK_COALESCE_SECONDS``.
inbox_kick_soon = KickCoalescer(lambda: inbox_kick(), interval=lambda: settings.HUB_INBOX_KICK_COALESCE_SECONDS)


@shared_task(acks_late=True, ignore_result=True)
def inbox_sweep() -> int:
    """Beat task: enqueue a drain when rows have waited past the threshold (a lost broker message,
    a crashed worker whose lease ran out, a row waiting out its backoff)."""
    stuck = inbox.inbox_stuck_count()
    if stuck:
        logger.info("inbox_sweep: %d events waiting; enqueueing a drain", stuck)
        inbox_drain.delay()
    return stuck


# --- Outbound delivery ------------------------------------------------------------------------------

DELIVERY_KICK_KEY = f"{settings.HUB_REDIS_KEY_PREFIX}delivery:send-queued"
DELIVERY_KICK_TTL_SECONDS = 2


@shared_task(acks_late=True, ignore_result=True)
def deliveries_send_due() -> dict[str, int]:
    """Beat (every few seconds) and kicks: send what is due, batch after batch, for up to a minute.

    Safe to overlap: claims skip rows another run holds. Retries are scheduled in the database
    (``next_attempt_at``), never as Celery countdowns.
    """
    from institutions import outbox

    client = redis_client()
    if client is not None:
        try:
            client.delete(DELIVERY_KICK_KEY)
        except Exception:
            logger.debug("deliveries_send_due: Redis unreachable", exc_info=True)
    return outbox.deliveries_drain(limit=settings.HUB_DELIVERY_BATCH_SIZE)


def deliveries_kick() -> None:
    """After a commit that enqueued webhooks: make sure a send runs soon (at most one queued at a time).

    Losing the kick loses nothing: the beat task finds due rows within seconds.
    """
    if settings.CELERY_TASK_ALWAYS_EAGER:
        deliveries_send_due()
        return
    _enqueue_once(deliveries_send_due, key=DELIVERY_KICK_KEY, ttl=DELIVERY_KICK_TTL_SECONDS, name="deliveries_kick")


# After a commit that enqueued webhooks (a redemption hold, a settlement run) or made them due again:
# :func:`deliveries_kick`, coalesced as the intake's kicks are, over its own interval.
deliveries_kick_soon = KickCoalescer(
    lambda: deliveries_kick(), interval=lambda: settings.HUB_DELIVERY_KICK_COALESCE_SECONDS
)
