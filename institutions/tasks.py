"""Celery tasks of the edge: thin shells around the dispatcher, safe to run twice."""

from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings

from clearinghouse.redis import redis_client
from institutions import inbox

logger = logging.getLogger(__name__)

# A queued drain already exists while this key lives; intake requests then skip enqueueing another.
KICK_KEY = "inbox:drain-queued"
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
    client = redis_client()
    try:
        if client is not None and not client.set(KICK_KEY, "1", nx=True, ex=KICK_TTL_SECONDS):
            return
        inbox_drain.delay()
    except Exception:
        logger.warning("inbox_kick: broker unreachable; the sweeper will enqueue later", exc_info=True)
        if client is not None:
            try:
                client.delete(KICK_KEY)
            except Exception:
                logger.debug("inbox_kick: could not clear the kick key", exc_info=True)


@shared_task(acks_late=True, ignore_result=True)
def inbox_sweep() -> int:
    """Beat task: enqueue a drain when rows have waited past the threshold (a lost broker message,
    a crashed worker whose lease ran out, a row waiting out its backoff)."""
    stuck = inbox.inbox_stuck_count()
    if stuck:
        logger.info("inbox_sweep: %d events waiting; enqueueing a drain", stuck)
        inbox_drain.delay()
    return stuck
