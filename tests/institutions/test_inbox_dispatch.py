"""The dispatcher: claims stored events, hands them to the handler of their type, retries, gives up."""

from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from institutions import handlers, inbox, tasks
from institutions.models import InboxEvent
from tests.conftest import activity, post_events

pytestmark = pytest.mark.django_db

CONFIRMED = {
    "specversion": "1.0",
    "id": "conf-1",
    "source": "/bank/settlement",
    "type": "carbon.settlement.confirmed",
    "data": {"instruction_id": "i-1", "status": "paid", "reference": "REF-1"},
}


@pytest.fixture
def confirmed_unhandled(monkeypatch):
    """``carbon.settlement.confirmed`` with its app's handler set aside: a type no app handles."""
    monkeypatch.delitem(handlers._handlers, CONFIRMED["type"], raising=False)


def store(client, sender, *events) -> None:
    response = post_events(client, sender, list(events))
    assert response.status_code == 202, response.content


def statuses() -> dict[str, str]:
    return dict(InboxEvent.objects.values_list("event_id", "status"))


def row(event_id: str) -> InboxEvent:
    return InboxEvent.objects.get(event_id=event_id)


def make_due(*event_ids: str) -> None:
    """Let rows waiting out a backoff become claimable now (as if the wait had passed)."""
    InboxEvent.objects.filter(event_id__in=event_ids).update(available_at=timezone.now())


def test_without_a_handler_events_stay_received(client, bank, monkeypatch):
    monkeypatch.setattr(handlers, "_handlers", {})  # as before any app registered its handlers
    store(client, bank, activity("e1"))
    assert inbox.inbox_drain() == {}
    assert row("e1").status == "received" and row("e1").attempts == 0


def test_events_of_types_no_app_handles_stay_received(client, bank, activity_handler, confirmed_unhandled):
    store(client, bank, activity("e1"), CONFIRMED)
    assert inbox.inbox_drain() == {"processed": 1}
    assert statuses() == {"e1": "processed", "conf-1": "received"}
    assert row("conf-1").attempts == 0
    assert activity_handler.seen == ["e1"]


def test_processed_rows_keep_the_handlers_outcome(client, bank, activity_handler):
    store(client, bank, activity("e1"), activity("e2"))
    assert inbox.inbox_drain() == {"processed": 2}
    processed = row("e1")
    assert processed.status == "processed"
    assert processed.outcome == {"points": 42, "reason": None}
    assert processed.processed_at is not None and processed.attempts == 1 and processed.last_error == ""


def test_quarantined_rows_keep_their_reason(client, bank, activity_handler):
    activity_handler.quarantine.add("odd")
    store(client, bank, activity("ok"), activity("odd", action="teleport"))
    assert inbox.inbox_drain() == {"processed": 1, "quarantined": 1}
    odd = row("odd")
    assert odd.status == "quarantined"
    assert odd.last_error == "unknown_action"
    assert odd.outcome == {"action": "teleport"}


def test_rows_are_handed_over_in_arrival_order(client, bank, activity_handler):
    store(client, bank, activity("c"), activity("a"), activity("b"))
    inbox.inbox_drain()
    assert activity_handler.seen == ["c", "a", "b"]


def test_a_claimed_row_is_leased_and_not_claimed_twice(client, bank, activity_handler):
    store(client, bank, activity("e1"))
    first = inbox.inbox_claim()
    assert len(first) == 1
    assert inbox.inbox_claim() == []
    leased = row("e1")
    assert leased.attempts == 1 and leased.available_at > timezone.now() + timedelta(seconds=60)


def test_a_failing_row_is_retried_with_backoff_and_the_rest_of_the_batch_is_processed(client, bank, activity_handler):
    activity_handler.fail.add("bad")
    store(client, bank, activity("good-1"), activity("bad"), activity("good-2"))

    before = timezone.now()
    assert inbox.inbox_drain() == {"processed": 2, "received": 1}
    assert statuses() == {"good-1": "processed", "bad": "received", "good-2": "processed"}
    bad = row("bad")
    assert bad.attempts == 1
    assert bad.last_error == "RuntimeError: handler refuses bad"
    first_wait = bad.available_at - before
    assert first_wait >= timedelta(seconds=9)

    assert inbox.inbox_drain() == {}  # still waiting out its backoff
    make_due("bad")
    before = timezone.now()
    inbox.inbox_drain()
    bad = row("bad")
    assert bad.attempts == 2 and bad.status == "received"
    assert bad.available_at - before > first_wait  # the wait grows


@override_settings(HUB_INBOX_MAX_ATTEMPTS=3)
def test_a_row_that_keeps_failing_goes_dead_with_its_error(client, bank, activity_handler):
    activity_handler.fail.add("bad")
    store(client, bank, activity("bad"), activity("good"))
    for _ in range(3):
        inbox.inbox_drain()
        make_due("bad")
    bad = row("bad")
    assert bad.status == "dead"
    assert bad.attempts == 3
    assert bad.last_error == "RuntimeError: handler refuses bad"
    assert bad.processed_at is not None
    assert row("good").status == "processed"

    inbox.inbox_drain()
    assert row("bad").attempts == 3  # a dead row is not claimed again


@override_settings(HUB_INBOX_MAX_ATTEMPTS=2)
def test_a_row_whose_worker_died_after_its_last_claim_goes_dead(client, bank, activity_handler):
    store(client, bank, activity("e1"))
    InboxEvent.objects.update(attempts=2)  # two claims whose workers never came back
    assert inbox.inbox_drain() == {}
    assert row("e1").status == "dead"
    assert activity_handler.seen == []


def test_a_handler_returning_the_wrong_number_of_outcomes_fails_the_rows(client, bank, activity_handler):
    from institutions import handlers

    handlers.unregister("carbon.activity.recorded")
    handlers.register("carbon.activity.recorded")(lambda events: [])
    store(client, bank, activity("e1"))
    inbox.inbox_drain()
    assert row("e1").status == "received"
    assert "returned 0 outcomes for 1 events" in row("e1").last_error


def test_replay_puts_quarantined_and_dead_rows_back(client, bank, activity_handler, django_capture_on_commit_callbacks):
    activity_handler.quarantine.add("odd")
    store(client, bank, activity("ok"), activity("odd"), activity("dead"))
    inbox.inbox_drain()
    InboxEvent.objects.filter(event_id="dead").update(status="dead", attempts=5, last_error="boom")
    activity_handler.quarantine.clear()  # the operator fixed what stopped them

    with django_capture_on_commit_callbacks(execute=True):  # the replay kicks a drain after commit
        replayed = inbox.inbox_replay(ids=InboxEvent.objects.values_list("pk", flat=True))

    assert replayed == 2  # the processed row is left alone
    assert statuses() == {"ok": "processed", "odd": "processed", "dead": "processed"}
    assert activity_handler.seen.count("ok") == 1
    assert row("dead").attempts == 1 and row("dead").last_error == ""


def test_replay_resets_the_row(client, bank, activity_handler):
    store(client, bank, activity("e1"))
    InboxEvent.objects.update(status="dead", attempts=5, last_error="boom", outcome={"x": 1})
    assert inbox.inbox_replay(ids=[row("e1").pk]) == 1
    replayed = row("e1")
    assert (replayed.status, replayed.attempts, replayed.last_error, replayed.outcome, replayed.processed_at) == (
        "received",
        0,
        "",
        None,
        None,
    )


# --- The sweeper ------------------------------------------------------------------------------------


def age(minutes: float) -> None:
    InboxEvent.objects.update(received_at=timezone.now() - timedelta(minutes=minutes))


def test_the_sweeper_leaves_fresh_rows_to_the_intakes_own_kick(client, bank, activity_handler):
    store(client, bank, activity("e1"))
    assert tasks.inbox_sweep() == 0
    assert row("e1").status == "received"


def test_the_sweeper_finds_rows_older_than_a_minute_and_gets_them_processed(client, bank, activity_handler):
    store(client, bank, activity("e1"), activity("e2"))
    age(2)
    assert tasks.inbox_sweep() == 2  # in-process tasks here: the drain it enqueues runs at once
    assert statuses() == {"e1": "processed", "e2": "processed"}


def test_the_sweeper_ignores_rows_no_handler_takes_and_rows_waiting_out_a_backoff(
    client, bank, activity_handler, confirmed_unhandled
):
    store(client, bank, activity("waiting"), CONFIRMED)
    age(2)
    InboxEvent.objects.filter(event_id="waiting").update(available_at=timezone.now() + timedelta(seconds=30))
    assert tasks.inbox_sweep() == 0


def test_tasks_are_safe_to_run_twice(client, bank, activity_handler):
    store(client, bank, activity("e1"))
    assert tasks.inbox_drain() == {"processed": 1}
    assert tasks.inbox_drain() == {}
    assert activity_handler.seen == ["e1"]
