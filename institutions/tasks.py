"""Celery tasks of the edge: thin shells around the dispatcher and the delivery worker, safe to run twice.

The wake-ups that enqueue them after a commit are in :mod:`institutions.kicks`.
"""

from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings

from clearinghouse.redis import redis_client
from institutions import inbox, outbox
from institutions.kicks import DELIVERY_KICK_KEY, KICK_KEY

logger = logging.getLogger(__name__)


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


@shared_task(acks_late=True, ignore_result=True)
def deliveries_send_due() -> dict[str, int]:
    """Beat (every few seconds) and kicks: send what is due, batch after batch, for up to a minute.

    Safe to overlap: claims skip rows another run holds. Retries are scheduled in the database
    (``next_attempt_at``), never as Celery countdowns.
    """
    client = redis_client()
    if client is not None:
        try:
            client.delete(DELIVERY_KICK_KEY)
        except Exception:
            logger.debug("deliveries_send_due: Redis unreachable", exc_info=True)
    return outbox.deliveries_drain(limit=settings.HUB_DELIVERY_BATCH_SIZE)
