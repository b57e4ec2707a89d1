"""The intake's performance paths (docs/performance.md) keep the contract: both insert forms store the
same rows, the rate limiter's reservations never admit more than the limit, coalesced kicks still
follow every commit, and the schema still documents the push endpoint served outside DRF."""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Iterator

import pytest
from django.conf import settings
from django.test import Client, override_settings

from clearinghouse.redis import redis_client
from institutions import intake, outbox, tasks
from institutions import kicks as wakeups
from institutions.models import InboxEvent
from tests.conftest import activity, make_sender, post_events

FIELDS = ("type", "source", "subject_ref", "subject_sealed", "time", "data", "content_hash", "status", "attempts")


def stored(sender, event_ids: list[str]) -> list[tuple]:
    rows = InboxEvent.objects.filter(institution=sender.institution, event_id__in=event_ids).order_by("event_id")
    return [tuple(getattr(row, name) for name in FIELDS) for row in rows]


@pytest.mark.django_db
def test_small_and_large_requests_store_the_same_rows(client, bank, other_bank):
    # Fewer than intake._JSON_FROM_ROWS events go as a VALUES list, more as one JSON parameter.
    events = [activity(f"e{i}", subject=f"cust-{i}", quantity=f"{i + 1}.25") for i in range(intake._JSON_FROM_ROWS + 2)]
    events.append({**activity("link"), "type": "carbon.account.linked", "data": {"link_code": "K7Q-93XA"}})
    for event in events:  # one at a time: the VALUES form
        assert post_events(client, bank, event).status_code == 202
    response = post_events(client, other_bank, events)  # all at once: the JSON form on PostgreSQL
    assert [r["status"] for r in response.json()["results"]] == ["accepted"] * len(events)

    ids = [e["id"] for e in events]
    small, large = stored(bank, ids), stored(other_bank, ids)
    assert len(small) == len(large) == len(events)
    # subject_ref is keyed per institution and a sealed copy is randomized: compare everything else.
    assert [a[:2] + a[4:] for a in small] == [b[:2] + b[4:] for b in large]
    assert small[-1][3] and large[-1][3]  # the account event keeps its sealed subject in both forms


@pytest.mark.django_db
def test_a_large_batch_reports_duplicates_and_conflicts_in_order(client, bank):
    post_events(client, bank, [activity("old-1"), activity("old-2")])
    batch = [activity(f"new-{i}") for i in range(5)]
    batch[1:1] = [activity("old-1"), activity("old-2", quantity="99"), activity("new-0")]

    response = post_events(client, bank, batch)

    assert [r["status"] for r in response.json()["results"]] == [
        "accepted",
        "duplicate",
        "conflict",
        "duplicate",
        "accepted",
        "accepted",
        "accepted",
        "accepted",
    ]
    assert InboxEvent.objects.count() == 7
    assert InboxEvent.objects.get(event_id="old-2").data["quantity"] == "12.5"  # the stored row is kept


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_outside_a_transaction_the_insert_commits_before_the_answer():
    sender = make_sender("auto-bank")
    response = post_events(Client(), sender, [activity(f"e{i}") for i in range(10)])
    assert response.status_code == 202
    assert InboxEvent.objects.filter(institution=sender.institution).count() == 10


# --- Rate limiter reservations ------------------------------------------------------------------------


@pytest.fixture
def frozen_window(monkeypatch) -> Iterator[int]:
    window = int(time.time()) + 3600  # a window no other test uses
    monkeypatch.setattr(intake.time, "time", lambda: window + 0.5)
    intake._reserved.clear()
    yield window
    intake._reserved.clear()


@pytest.mark.redis
@pytest.mark.django_db
def test_reserved_requests_never_exceed_the_limit(bank, frozen_window):
    limit = 300  # reserved three at a time
    from institutions.selectors import Verifier

    verifier = Verifier(bank.institution.pk, bank.code, True, limit, (), ())
    key = f"{settings.HUB_REDIS_KEY_PREFIX}ratelimit:intake:{bank.institution.pk}:{limit}:{frozen_window}"
    client = redis_client()
    assert client is not None
    client.set(key, limit - 2, ex=5)  # other processes already took all but two

    intake.check_rate(verifier)  # reserves 3, of which 2 are inside the limit
    intake.check_rate(verifier)  # spends the second one locally
    with pytest.raises(intake.RateLimited):
        intake.check_rate(verifier)
    client.delete(key)


@pytest.mark.redis
@pytest.mark.django_db
def test_small_limits_are_counted_one_request_at_a_time(bank, frozen_window):
    from institutions.selectors import Verifier

    verifier = Verifier(bank.institution.pk, bank.code, True, 150, (), ())
    for _ in range(150):
        intake.check_rate(verifier)
    assert intake._reserved == {}
    with pytest.raises(intake.RateLimited):
        intake.check_rate(verifier)
    client = redis_client()
    assert client is not None
    client.delete(f"{settings.HUB_REDIS_KEY_PREFIX}ratelimit:intake:{bank.institution.pk}:150:{frozen_window}")


# --- Coalesced kicks ----------------------------------------------------------------------------------


class Kicks(list):
    """The kicks a coalescer let through (their times), the coalescer itself as ``soon``, and the
    interval it coalesces over."""

    soon: wakeups.KickCoalescer
    interval: float = 0.2


@pytest.fixture
def kicks() -> Iterator[Kicks]:
    """A fresh coalescer (the intake's and the deliveries' kicks are both one), with a broker (not in
    process), whose kicks are recorded instead of sent."""
    calls = Kicks()
    lock = threading.Lock()

    def record() -> None:
        with lock:
            calls.append(time.monotonic())

    calls.soon = wakeups.KickCoalescer(record, interval=lambda: calls.interval)
    with override_settings(CELERY_TASK_ALWAYS_EAGER=False):
        yield calls


def wait_for(condition, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not condition():
        time.sleep(0.01)
    return condition()


def test_the_first_commit_kicks_at_once_and_the_rest_share_one_trailing_kick(kicks):
    start = time.monotonic()
    kicks.soon()
    assert len(kicks) == 1  # in the request itself
    for _ in range(50):
        kicks.soon()
    assert len(kicks) == 1
    assert wait_for(lambda: len(kicks) == 2)
    assert kicks[1] - start >= 0.19  # at the end of the interval
    time.sleep(0.3)
    assert len(kicks) == 2  # nothing more was pending


def test_a_commit_after_the_trailing_kick_started_gets_a_kick_of_its_own(kicks):
    kicks.soon()
    kicks.soon()  # schedules the trailing kick
    assert wait_for(lambda: len(kicks) == 2)
    kicks.soon()  # inside the new interval: needs another trailing kick
    assert wait_for(lambda: len(kicks) == 3)
    assert kicks[2] - kicks[1] >= 0.19


def test_without_coalescing_every_commit_kicks(kicks):
    kicks.interval = 0
    for _ in range(5):
        kicks.soon()
    assert len(kicks) == 5


def test_the_wake_ups_name_the_edges_tasks():
    """The kicks enqueue by name (they cannot import the tasks, which import the services that kick)."""
    assert wakeups._task(wakeups.INBOX_DRAIN_TASK).run is tasks.inbox_drain.run
    assert wakeups._task(wakeups.DELIVERIES_SEND_TASK).run is tasks.deliveries_send_due.run


INBOX_INTERVAL, DELIVERY_INTERVAL = "HUB_INBOX_KICK_COALESCE_SECONDS", "HUB_DELIVERY_KICK_COALESCE_SECONDS"


@pytest.mark.parametrize(
    ("soon", "kick", "own", "other"),
    [
        ("inbox_kick_soon", "inbox_kick", INBOX_INTERVAL, DELIVERY_INTERVAL),
        ("deliveries_kick_soon", "deliveries_kick", DELIVERY_INTERVAL, INBOX_INTERVAL),
    ],
)
def test_the_intake_and_the_deliveries_coalesce_on_their_own_intervals(monkeypatch, soon, kick, own, other):
    sent: list[float] = []
    monkeypatch.setattr(wakeups, kick, lambda: sent.append(time.monotonic()))
    with override_settings(CELERY_TASK_ALWAYS_EAGER=False, **{own: 0, other: 0.2}):
        for _ in range(5):
            getattr(wakeups, soon)()
    assert len(sent) == 5  # the other kick's interval does not coalesce these


@pytest.mark.django_db
def test_webhooks_enqueued_in_a_burst_share_their_delivery_kicks(monkeypatch, django_capture_on_commit_callbacks):
    """``outbox_enqueue`` kicks the delivery worker through its coalescer after each commit."""
    sent: list[float] = []
    monkeypatch.setattr(wakeups, "deliveries_kick", lambda: sent.append(time.monotonic()))
    coalescer = wakeups.KickCoalescer(
        lambda: wakeups.deliveries_kick(), interval=lambda: settings.HUB_DELIVERY_KICK_COALESCE_SECONDS
    )
    monkeypatch.setattr(wakeups, "deliveries_kick_soon", coalescer)
    bank = make_sender("bank-a")
    with override_settings(CELERY_TASK_ALWAYS_EAGER=False, HUB_DELIVERY_KICK_COALESCE_SECONDS=0.2):
        for n in range(20):
            with django_capture_on_commit_callbacks(execute=True):
                outbox.outbox_enqueue(institution=bank.institution, type="carbon.redemption.requested", data={"n": n})
        assert len(sent) == 1
        assert wait_for(lambda: len(sent) == 2)


# --- The schema ---------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_schema_documents_the_push_endpoint_and_its_signature_headers(client):
    response = client.get("/api/v1/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    schema = response.json()
    operation = schema["paths"]["/api/v1/institutions/{code}/events"]["post"]
    assert operation["operationId"] == "events_push"
    headers = {p["name"] for p in operation["parameters"] if p["in"] == "header"}
    assert headers == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    assert set(operation["requestBody"]["content"]) == {
        "application/cloudevents+json",
        "application/cloudevents-batch+json",
        "application/json",
    }
    assert "202" in operation["responses"]


@pytest.mark.django_db
def test_other_methods_on_the_push_endpoint_are_405_problems(client, bank):
    response = client.get(bank.url)
    assert response.status_code == 405
    assert response["Content-Type"] == "application/problem+json"


# --- Text the database cannot store is the sender's error -----------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "e\x001"),
        ("source", "/app\x00"),
        ("subject", "cust\x00"),
        ("subject", "cust\ud800"),
        ("data.action", "metro\x00"),
        ("data.action", "metro\udfff"),
    ],
)
def test_nul_and_lone_surrogates_are_rejected_not_a_server_error(client, bank, field, value):
    import json

    event = activity("e1")
    if field.startswith("data."):
        event["data"][field[5:]] = value
    else:
        event[field] = value
    good = activity("good")
    body = json.dumps([event, good]).encode()  # json.dumps escapes both as \u0000 and \ud800

    response = post_events(client, bank, None, body=body, content_type="application/cloudevents-batch+json")

    assert response.status_code == 202, response.content
    first, second = response.json()["results"]
    assert first["status"] == "rejected"
    assert {"field": field, "code": "invalid_uri_reference" if field == "source" else "invalid_string"} in (
        first["errors"]
    )
    assert second["status"] == "accepted"
    assert list(InboxEvent.objects.values_list("event_id", flat=True)) == ["good"]


# --- Group commit -------------------------------------------------------------------------------------


def row(event_id: str) -> tuple:
    return (event_id, "carbon.activity.recorded", "/bank/app", "ref", "", None, {}, f"hash-{event_id}")


class ControlledInserts:
    """Stands in for intake._insert_rows: the first statement blocks until released, so requests queue.

    ``fail_call`` (1-based) raises ``failure`` from that statement; a statement holding an event id of
    ``refuse`` raises DataError, as PostgreSQL refusing a value would.
    """

    def __init__(
        self,
        *,
        fail_call: int | None = None,
        failure: Exception | None = None,
        refuse: Collection[str] = (),
        stored: Collection[tuple[int, str]] = frozenset(),
    ):
        from django.db import OperationalError

        self.calls: list[list[tuple[int, str]]] = []
        self.release = threading.Event()
        self.fail_call = fail_call
        self.failure = failure or OperationalError("server closed the connection unexpectedly")
        self.refuse = set(refuse)
        self.stored = set(stored)

    def __call__(self, entries):
        from django.db import DataError

        keys = [(institution_id, r[0]) for institution_id, _, r in entries]
        self.calls.append(keys)
        if len(self.calls) == 1:
            assert self.release.wait(5)
        if self.fail_call == len(self.calls):
            raise self.failure
        if self.refuse.intersection(event_id for _, event_id in keys):
            raise DataError("time zone displacement out of range")
        new = [key for key in keys if key not in self.stored]
        self.stored.update(new)
        return set(new)


def run_in_threads(group, requests: list[list[tuple]]) -> tuple[list[threading.Thread], list]:
    """Start the first request, queue the others behind its statement, then let it finish."""
    answers: list = [None] * len(requests)

    def send(i: int) -> None:
        try:
            answers[i] = group.insert(requests[i])
        except Exception as exc:
            answers[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    threads[0].start()
    assert wait_for(lambda: group._running)
    for queued, thread in enumerate(threads[1:], start=1):
        thread.start()  # one at a time, so the queue keeps the order of ``requests``
        assert wait_for(lambda queued=queued: len(group._queue) == queued)
    return threads, answers


def test_requests_arriving_during_a_statement_share_the_next_one(monkeypatch):
    inserts = ControlledInserts(stored={(1, "old")})
    monkeypatch.setattr(intake, "_insert_rows", inserts)
    group = intake._GroupCommit()
    requests = [
        [(1, "w0", row("a"))],
        [(1, "w1", row("b")), (1, "w1", row("dup"))],
        [(2, "w2", row("b"))],  # another institution's "b" is another event
        [(1, "w3", row("dup")), (1, "w3", row("old"))],  # "dup" is the second request's
    ]
    threads, answers = run_in_threads(group, requests)
    inserts.release.set()
    for thread in threads:
        thread.join(5)

    assert inserts.calls == [[(1, "a")], [(1, "b"), (1, "dup"), (2, "b"), (1, "old")]]
    assert [answer.inserted for answer in answers] == [{(1, "a")}, {(1, "b"), (1, "dup")}, {(2, "b")}, set()]
    assert not group._running and group._queue == []


def test_an_outage_fails_each_request_of_the_statement_and_the_next_ones_still_run(monkeypatch):
    from django.db import DatabaseError

    inserts = ControlledInserts(fail_call=2)
    monkeypatch.setattr(intake, "_insert_rows", inserts)
    group = intake._GroupCommit()
    threads, answers = run_in_threads(group, [[(1, "w", row(f"e{i}"))] for i in range(3)])
    inserts.release.set()
    for thread in threads:
        thread.join(5)

    assert answers[0].inserted == {(1, "e0")}
    assert all(isinstance(answer, DatabaseError) for answer in answers[1:])
    assert len(inserts.calls) == 2  # an outage is not retried request by request: 503, come back later
    assert group.insert([(1, "w", row("later"))]).inserted == {(1, "later")}  # not stuck


def test_a_value_one_request_holds_fails_only_that_requests_row(monkeypatch):
    inserts = ControlledInserts(refuse={"bad"})
    monkeypatch.setattr(intake, "_insert_rows", inserts)
    group = intake._GroupCommit()
    requests = [
        [(1, "w0", row("first"))],
        [(1, "w1", row("ok-1")), (1, "w1", row("bad")), (1, "w1", row("ok-2"))],
        [(2, "w2", row("other"))],  # another institution, sharing the statement that fails
    ]
    threads, answers = run_in_threads(group, requests)
    inserts.release.set()
    for thread in threads:
        thread.join(5)

    assert not any(isinstance(answer, Exception) for answer in answers), answers
    assert answers[0].inserted == {(1, "first")}
    assert answers[1].inserted == {(1, "ok-1"), (1, "ok-2")}
    assert answers[1].refused == {(1, "bad"): {"field": "event", "code": "unstorable"}}
    assert answers[2].inserted == {(2, "other")} and answers[2].refused == {}
    # The shared statement, then each request apart; the refused row is found by halving its request.
    assert inserts.calls[1] == [(1, "ok-1"), (1, "bad"), (1, "ok-2"), (2, "other")]
    assert inserts.calls[2:] == [
        [(1, "ok-1"), (1, "bad"), (1, "ok-2")],
        [(1, "ok-1")],
        [(1, "bad"), (1, "ok-2")],
        [(1, "bad")],
        [(1, "ok-2")],
        [(2, "other")],
    ]


def test_another_failure_of_a_shared_statement_is_answered_by_each_request_alone(monkeypatch):
    from django.db import IntegrityError

    class OneRequestBreaks(ControlledInserts):
        def __call__(self, entries):
            if any(r[0] == "orphan" for _, _, r in entries):
                self.calls.append([(i, r[0]) for i, _, r in entries])
                raise IntegrityError("insert violates foreign key constraint (institution deleted)")
            return super().__call__(entries)

    inserts = OneRequestBreaks()
    monkeypatch.setattr(intake, "_insert_rows", inserts)
    group = intake._GroupCommit()
    threads, answers = run_in_threads(
        group, [[(1, "w0", row("first"))], [(9, "w1", row("orphan"))], [(2, "w2", row("x"))]]
    )
    inserts.release.set()
    for thread in threads:
        thread.join(5)

    assert isinstance(answers[1], IntegrityError)  # that request answers 503 (it led the statement) ...
    assert answers[2].inserted == {(2, "x")}  # ... and the other one is stored


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_single_events_are_each_stored_once_and_answered_in_full():
    import json

    sender = make_sender("busy-bank")
    bodies = [json.dumps(activity(f"e{i % 20}")).encode() for i in range(60)]  # every event sent 3 times
    answers: list = [None] * len(bodies)

    def send(i: int) -> None:
        from django.db import connection

        try:
            response = Client().post(
                sender.url,
                data=bodies[i],
                content_type="application/cloudevents+json",
                headers=sender.headers(bodies[i]),
            )
            answers[i] = (response.status_code, response.json()["results"][0]["status"])
        finally:
            connection.close()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert {status for status, _ in answers} == {202}
    accepted = sorted(i % 20 for i, (_, result) in enumerate(answers) if result == "accepted")
    assert accepted == list(range(20))
    assert {result for _, result in answers} == {"accepted", "duplicate"}
    assert InboxEvent.objects.filter(institution=sender.institution).count() == 20
