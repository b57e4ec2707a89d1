"""Wake-ups of the edge's workers after a commit that left them work: inbox rows to dispatch (the
intake, a replay), webhooks to send (an enqueue, a retry, a re-enabled endpoint).

The services (intake, inbox, outbox) call these after their commits; the Celery tasks call the services.
The wake-ups name the tasks they enqueue through Celery's registry (``institutions.tasks`` registers them
at start-up, imported by ``InstitutionsConfig.ready``), so this module imports neither the tasks nor the
services, and no module of the edge imports one that imports it back.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from django.conf import settings

from clearinghouse.celery import app as celery_app
from clearinghouse.redis import redis_client

logger = logging.getLogger(__name__)

INBOX_DRAIN_TASK = "institutions.tasks.inbox_drain"
DELIVERIES_SEND_TASK = "institutions.tasks.deliveries_send_due"

# A queued drain already exists while this key lives; intake requests then skip enqueueing another.
KICK_KEY = f"{settings.HUB_REDIS_KEY_PREFIX}inbox:drain-queued"
KICK_TTL_SECONDS = 10
DELIVERY_KICK_KEY = f"{settings.HUB_REDIS_KEY_PREFIX}delivery:send-queued"
DELIVERY_KICK_TTL_SECONDS = 2


def _task(name: str) -> Any:
    return celery_app.tasks[name]


def inbox_kick() -> None:
    """Make sure a drain will run soon, enqueueing at most one per ``KICK_TTL_SECONDS`` under load.

    Runs after the intake's commit. A failure here loses nothing (the rows are stored and the sweeper
    finds them), so it is logged, never raised into the request. With in-process tasks the drain runs here.
    """
    if settings.CELERY_TASK_ALWAYS_EAGER:
        _task(INBOX_DRAIN_TASK)()
        return
    _enqueue_once(_task(INBOX_DRAIN_TASK), key=KICK_KEY, ttl=KICK_TTL_SECONDS, name="inbox_kick")


def deliveries_kick() -> None:
    """After a commit that enqueued webhooks: make sure a send runs soon (at most one queued at a time).

    Losing the kick loses nothing: the beat task finds due rows within seconds.
    """
    if settings.CELERY_TASK_ALWAYS_EAGER:
        _task(DELIVERIES_SEND_TASK)()
        return
    _enqueue_once(
        _task(DELIVERIES_SEND_TASK), key=DELIVERY_KICK_KEY, ttl=DELIVERY_KICK_TTL_SECONDS, name="deliveries_kick"
    )


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

# After a commit that enqueued webhooks (a redemption hold, a settlement run) or made them due again:
# :func:`deliveries_kick`, coalesced as the intake's kicks are, over its own interval.
deliveries_kick_soon = KickCoalescer(
    lambda: deliveries_kick(), interval=lambda: settings.HUB_DELIVERY_KICK_COALESCE_SECONDS
)
