"""The dispatcher: claim stored events in batches and hand them to the handler of their type.

Exactly-once effect on top of at-least-once delivery (DESIGN.md, reliability model):

* **Claim** leases rows in their own committed transaction (``FOR UPDATE SKIP LOCKED`` on
  PostgreSQL), counting the attempt in the database *before* any work. A row whose handler kills
  the worker therefore still uses up its attempts, and goes ``dead`` instead of looping forever.
* **Process** runs a handler over a run of same-type rows in one transaction with the rows locked,
  so the handler's writes and the row's new status commit together or not at all.
* **Isolate**: whatever one row does (a handler raising anything, a value the database cannot hold,
  a row that cannot even be read back), it fails alone. A run that raises is split in halves, each
  processed on its own, down to the failing rows; every other row of the run is processed as if
  nothing had happened. A failing row waits with backoff (``available_at``) and goes ``dead`` after
  ``HUB_INBOX_MAX_ATTEMPTS``, or at once when the database refused its values (``DataError``:
  waiting cannot change them). Recording a failure reads nothing but the attempt count, and a
  failure to record one is logged, never raised: the drain never dies on a row.
* A leased row whose worker vanished becomes claimable again when its lease runs out, and the
  beat sweeper re-enqueues work for rows left ``received``.

Rows of a type no app handles yet are never claimed: they stay ``received``, visible in admin.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from itertools import groupby
from typing import Any

from django.conf import settings
from django.db import DataError, connection, transaction
from django.db.models import F, Q, TextField
from django.db.models.functions import Cast
from django.utils import timezone

from clearinghouse.db import rows_update
from institutions import kicks
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
    a link followed by an activity of the same subject is applied in that order. A failing row
    fails alone (:func:`_process_isolating`). Raises only when the database itself is gone.
    """
    tally: Counter[str] = Counter()
    rows = list(InboxEvent.objects.filter(pk__in=ids).order_by("id").values_list("id", "type"))
    for event_type, run in groupby(rows, key=lambda row: row[1]):
        _process_isolating(event_type, [pk for pk, _ in run], tally)
    return tally


def _process_isolating(event_type: str, ids: list[int], tally: Counter[str]) -> None:
    """Process ``ids`` as one run; if it raises, process each half on its own, down to single rows,
    whose failure is recorded (:func:`_record_failure`).

    Halving keeps arrival order and finds one failing row among ``n`` in about ``2 log2 n`` runs
    instead of ``n``; in the common case (nothing fails) the run is one transaction, as before.
    """
    try:
        tally.update(_process_run(event_type, ids))
        return
    except Exception as exc:
        if not _database_answers():
            raise  # not a row's doing: the drain stops, the leases run out, the rows are claimed again
        if len(ids) == 1:
            logger.warning("inbox: event %s failed", ids[0], exc_info=exc)
            tally[_record_failure(ids[0], exc)] += 1
            return
        logger.warning(
            "inbox: a run of %d %s failed (%s: %s); isolating the failing rows",
            len(ids),
            event_type,
            type(exc).__name__,
            exc,
        )
    middle = len(ids) // 2
    _process_isolating(event_type, ids[:middle], tally)
    _process_isolating(event_type, ids[middle:], tally)


def _database_answers() -> bool:
    """After a failed run: can the database still be used? A lost connection is opened again once."""
    try:
        if connection.connection is not None and connection.is_usable():
            return True
        if connection.in_atomic_block:  # a caller's transaction (tests): it cannot be reopened here
            return False
        connection.close()
        connection.ensure_connection()
        return True
    except Exception:
        logger.warning("inbox: the database does not answer; stopping this drain", exc_info=True)
        return False


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
    """Note the error and schedule the next try with backoff, or give up and mark the row dead;
    returns the row's status. A ``DataError`` (the database refused or could not read back one of the
    row's values) is final at once.

    Reads nothing of the row but its attempt count: the row itself may be what cannot be read. Never
    raises: if the note cannot be written, a shorter one is tried, and if that fails too the row stays
    leased and is claimed again when its lease runs out (its attempts were counted at the claim).
    """
    message = _storable_text(f"{type(exc).__name__}: {exc}")[:2000]
    final = isinstance(exc, DataError)
    try:
        return _failure_save(pk, message, final=final)
    except Exception:
        logger.exception("inbox: could not record the failure of event %s; trying a shorter note", pk)
    try:
        return _failure_save(pk, f"{type(exc).__name__} (its message could not be stored)", final=final)
    except Exception:
        logger.exception("inbox: could not record the failure of event %s; its lease will run out", pk)
        return Status.RECEIVED


def _failure_save(pk: int, message: str, *, final: bool) -> str:
    now = timezone.now()
    with transaction.atomic():
        attempts = (
            InboxEvent.objects.select_for_update()
            .filter(pk=pk, status=Status.RECEIVED)
            .values_list("attempts", flat=True)
            .first()
        )
        if attempts is None:  # replayed, or handled by another worker meanwhile: nothing to note
            return Status.RECEIVED
        changes: dict[str, object] = {"last_error": message}
        if final or attempts >= settings.HUB_INBOX_MAX_ATTEMPTS:
            changes.update(status=Status.DEAD, processed_at=now)
            if final:
                changes.update(_unreadable_time_cleared(pk, message))
            logger.error("inbox: event %s is dead (attempt %d): %s", pk, attempts, changes["last_error"])
        else:
            changes["available_at"] = now + timedelta(seconds=5 * 2**attempts)
        InboxEvent.objects.filter(pk=pk).update(**changes)
        return str(changes.get("status", Status.RECEIVED))


# The instants Python (and so the driver) can read back. Only ``time`` comes from a sender; the
# intake refuses values outside these since, but rows stored before may still hold one.
_READABLE = Q(time__gte=datetime.min.replace(tzinfo=UTC), time__lte=datetime.max.replace(tzinfo=UTC))


def _unreadable_time_cleared(pk: int, message: str) -> dict[str, object]:
    """If the row's ``time`` cannot be read back, the changes that move it, as text, into the note and
    empty the column: the row can then be shown (admin, the event status API) and replayed."""
    if connection.vendor != "postgresql":
        return {}
    text = (
        InboxEvent.objects.filter(pk=pk, time__isnull=False)
        .exclude(_READABLE)
        .annotate(as_text=Cast("time", TextField()))
        .values_list("as_text", flat=True)
        .first()
    )
    if text is None:
        return {}
    note = f" [time {text} is outside years 1 to 9999 and was cleared]"
    return {"time": None, "last_error": message[: 2000 - len(note)] + note}


def _storable_text(text: str) -> str:
    """``text`` without what a text column refuses (NUL, lone surrogates): an exception's message may
    quote any value."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


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
        transaction.on_commit(kicks.inbox_kick, robust=True)
    return count


def inbox_events_redact(*, ids: Iterable[int], data: dict[str, Any]) -> int:
    """Replace the data of handled rows with ``data`` and drop their sealed subject ids; returns how many.

    For a handler whose events carry what must not outlive their handling (a link code in clear, the
    subject id a membership now keeps sealed itself). Runs in the caller's transaction (the dispatcher's).
    """
    return InboxEvent.objects.filter(pk__in=list(ids)).update(data=data, subject_sealed="")
