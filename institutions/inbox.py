"""The dispatcher: claim stored events in batches and hand them to the handler of their type.

Exactly-once effect on top of at-least-once delivery (DESIGN.md, reliability model):

* **Claim** leases rows in their own committed transaction (``FOR UPDATE SKIP LOCKED`` on
  PostgreSQL), counting the attempt in the database *before* any work. A row whose handler kills
  the worker therefore still uses up its attempts, and goes ``dead`` instead of looping forever.
* **Process** runs a handler over a run of same-type rows in one transaction with the rows locked,
  so the handler's writes and the row's new status commit together or not at all. When a batch
  raises, its rows are retried one by one to isolate the failing row; a failing row waits with
  backoff (``available_at``) and goes ``dead`` after ``HUB_INBOX_MAX_ATTEMPTS``.
* A leased row whose worker vanished becomes claimable again when its lease runs out, and the
  beat sweeper re-enqueues work for rows left ``received``.

Rows of a type no app handles yet are never claimed: they stay ``received``, visible in admin.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import timedelta
from itertools import groupby

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from clearinghouse.db import rows_update
from institutions.handlers import Outcome, handled_types, handler_for
from institutions.models import InboxEvent

logger = logging.getLogger(__name__)

Status = InboxEvent.Status


def inbox_claim(*, limit: int | None = None) -> list[int]:
    """Lease up to ``limit`` claimable rows and return their ids in order.

    Rows that already used every attempt are marked ``dead`` here rather than claimed.
    """
    limit = limit or settings.HUB_INBOX_BATCH_SIZE
    types = handled_types()
    if not types:
        return []
    now = timezone.now()
    with transaction.atomic():
        candidates = list(
            InboxEvent.objects.select_for_update(skip_locked=True)
            .filter(status=Status.RECEIVED, type__in=types, available_at__lte=now)
            .order_by("id")
            .values_list("id", "attempts")[:limit]
        )
        exhausted = [pk for pk, attempts in candidates if attempts >= settings.HUB_INBOX_MAX_ATTEMPTS]
        claimed = [pk for pk, attempts in candidates if attempts < settings.HUB_INBOX_MAX_ATTEMPTS]
        if exhausted:
            InboxEvent.objects.filter(pk__in=exhausted).update(status=Status.DEAD, processed_at=now)
            logger.error("inbox: %d events exhausted their attempts and are dead", len(exhausted))
        if claimed:
            InboxEvent.objects.filter(pk__in=claimed).update(
                attempts=F("attempts") + 1,
                available_at=now + timedelta(seconds=settings.HUB_INBOX_LEASE_SECONDS),
            )
    return claimed


def inbox_process(ids: Sequence[int]) -> Counter[str]:
    """Dispatch the claimed rows ``ids``; returns how many ended in each status.

    Consecutive rows of one type form a run handled together; runs keep the order of arrival, so
    a link followed by an activity of the same subject is applied in that order.
    """
    tally: Counter[str] = Counter()
    rows = list(InboxEvent.objects.filter(pk__in=ids).order_by("id").values_list("id", "type"))
    for event_type, run in groupby(rows, key=lambda row: row[1]):
        run_ids = [pk for pk, _ in run]
        try:
            tally.update(_process_run(event_type, run_ids))
        except Exception:
            logger.warning("inbox: a run of %d %s failed; retrying one by one", len(run_ids), event_type, exc_info=True)
            for pk in run_ids:
                try:
                    tally.update(_process_run(event_type, [pk]))
                except Exception as exc:
                    tally[_record_failure(pk, exc)] += 1
    return tally


@transaction.atomic
def _process_run(event_type: str, ids: list[int]) -> Counter[str]:
    handler = handler_for(event_type)
    if handler is None:  # the app was unregistered since the claim: leave the rows received
        return Counter()
    events = list(InboxEvent.objects.select_for_update().filter(pk__in=ids, status=Status.RECEIVED).order_by("id"))
    if not events:
        return Counter()
    outcomes = handler(events)
    if len(outcomes) != len(events):
        raise RuntimeError(f"handler for {event_type} returned {len(outcomes)} outcomes for {len(events)} events")
    _outcomes_save(events, outcomes)
    return Counter(Status.PROCESSED if o.status == "processed" else Status.QUARANTINED for o in outcomes)


def _outcomes_save(events: Sequence[InboxEvent], outcomes: Sequence[Outcome]) -> None:
    """Write every row's new status in one statement (Django's bulk_update builds a CASE per row and
    field, which costs more than the normalization itself at a thousand rows)."""
    rows_update(
        InboxEvent,
        [e.pk for e in events],
        {
            "status": ("text", [Status.PROCESSED if o.status == "processed" else Status.QUARANTINED for o in outcomes]),
            "outcome": ("jsonb", [o.detail for o in outcomes]),
            "last_error": ("text", [o.reason for o in outcomes]),
        },
        same={"processed_at": timezone.now()},
    )


def _record_failure(pk: int, exc: Exception) -> str:
    """Note the error and schedule the next try with backoff, or give up and mark the row dead."""
    message = f"{type(exc).__name__}: {exc}"[:2000]
    with transaction.atomic():
        event = InboxEvent.objects.select_for_update().get(pk=pk)
        event.last_error = message
        if event.attempts >= settings.HUB_INBOX_MAX_ATTEMPTS:
            event.status = Status.DEAD
            event.processed_at = timezone.now()
            logger.error("inbox: event %s is dead after %d attempts: %s", pk, event.attempts, message)
        else:
            event.available_at = timezone.now() + timedelta(seconds=5 * 2**event.attempts)
        event.save(update_fields=["last_error", "status", "processed_at", "available_at"])
    return event.status


def inbox_drain(*, max_batches: int = 100) -> Counter[str]:
    """Claim and process batches until nothing is claimable (or ``max_batches`` ran)."""
    tally: Counter[str] = Counter()
    for _ in range(max_batches):
        ids = inbox_claim()
        if not ids:
            break
        tally.update(inbox_process(ids))
    return tally


def inbox_stuck_count() -> int:
    """Rows a handler could take that have waited longer than the sweep threshold."""
    now = timezone.now()
    return InboxEvent.objects.filter(
        status=Status.RECEIVED,
        type__in=handled_types(),
        available_at__lte=now,
        received_at__lt=now - timedelta(seconds=settings.HUB_INBOX_SWEEP_AFTER_SECONDS),
    ).count()


@transaction.atomic
def inbox_replay(*, ids: Iterable[int]) -> int:
    """Put quarantined or dead rows back to ``received`` with fresh attempts; returns how many.

    Used after an operator fixed what stopped them (a mapping, a bug). Processed rows are left alone.
    """
    count = InboxEvent.objects.filter(pk__in=list(ids), status__in=[Status.QUARANTINED, Status.DEAD]).update(
        status=Status.RECEIVED,
        attempts=0,
        available_at=timezone.now(),
        last_error="",
        outcome=None,
        processed_at=None,
    )
    if count:
        from institutions.tasks import inbox_kick

        transaction.on_commit(inbox_kick, robust=True)
    return count
