"""Concurrent requests sharing the group commit on PostgreSQL: one sender's bad input harms no one else.

The reported case: ``time`` offsets Python accepts and PostgreSQL refuses (``+23:59``, ``+20:00``,
``+05:00:00.5``) made the whole request 503, good events included, for ever; and through the group
commit another institution's concurrent request got a 503 too. The intake refuses those offsets now
(``test_intake_ranges``); here the same requests run concurrently with good ones, and then, with the
offset check taken out, the database's own refusal is shown to cost only the event that holds it.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime
from typing import Any

import pytest
from django.db import connection
from django.test import Client

from institutions import envelope, intake
from institutions.models import InboxEvent
from tests.conftest import Sender, activity, make_sender

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

REPORTED = ["+23:59", "+20:00", "+05:00:00.5"]


def post(sender: Sender, events: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    body = json.dumps(events).encode()
    response = Client().post(
        sender.url, data=body, content_type="application/cloudevents-batch+json", headers=sender.headers(body)
    )
    return response.status_code, response.json()


def in_threads(*calls: Any) -> list[Any]:
    """Run each call in its own thread, released together; their answers in order."""
    barrier = threading.Barrier(len(calls))
    answers: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            barrier.wait(10)
            answers[i] = calls[i]()
        except BaseException as exc:  # surfaced below, not lost in the thread
            answers[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    return answers


def stored_ids(sender: Sender) -> set[str]:
    return set(InboxEvent.objects.filter(institution=sender.institution).values_list("event_id", flat=True))


def test_the_reported_offsets_sent_beside_other_institutions_requests_harm_none_of_them():
    careless, others = make_sender("careless-bank"), [make_sender(f"good-bank-{i}") for i in range(4)]
    bad = [{**activity(f"bad-{i}"), "time": f"2026-11-24T08:00:00{offset}"} for i, offset in enumerate(REPORTED)]
    rounds = 5
    for n in range(rounds):
        answers = in_threads(
            lambda n=n: post(careless, [*bad, activity(f"careless-good-{n}")]),
            lambda n=n: post(careless, bad),
            *[lambda s=s, n=n: post(s, [activity(f"e{n}-{k}") for k in range(5)]) for s in others],
        )
        (mixed_status, mixed), (all_bad_status, all_bad), *good = answers
        assert mixed_status == 202
        assert [r["status"] for r in mixed["results"]] == ["rejected"] * 3 + ["accepted"]
        assert all_bad_status == 422 and all_bad["code"] == "invalid-events"
        assert [r["errors"][0]["field"] for r in all_bad["results"]] == ["time"] * 3
        assert [status for status, _ in good] == [202] * len(others)
    for sender in others:
        assert stored_ids(sender) == {f"e{n}-{k}" for n in range(rounds) for k in range(5)}
    assert stored_ids(careless) == {f"careless-good-{n}" for n in range(rounds)}


def _unchecked_time(value: Any) -> tuple[datetime | None, str | None]:
    """The intake's time check as it was: any offset Python parses goes on to the database as sent."""
    try:
        return datetime.fromisoformat(value), None
    except (TypeError, ValueError):
        return None, "invalid_rfc3339"


@pytest.fixture
def offsets_unchecked(monkeypatch):
    """Take the offset and range checks out, so PostgreSQL itself refuses ``+20:00`` (SQLSTATE 22009)."""
    monkeypatch.setattr(envelope, "_parse_time", _unchecked_time)


@pytest.fixture
def held_group():
    """Hold the group commit as if a statement were running: requests queue until ``release()``,
    then all of them share the next statement, as under load."""
    group = intake._group_commit
    with group._lock:
        assert not group._running and not group._queue
        group._running = True

    def queued() -> int:
        with group._lock:
            return len(group._queue)

    def release() -> None:
        with group._lock:  # what the statement that ends does: the first queued leads the next one
            group._queue[0].lead = True
            group._queue[0].woken.set()

    yield queued, release
    with group._lock:
        if not group._queue:
            group._running = False


def wait_until(condition: Any, timeout: float = 10) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_value_postgresql_refuses_in_a_shared_statement_costs_only_its_own_event(offsets_unchecked, held_group):
    queued, release = held_group
    careless, innocent = make_sender("careless-bank"), make_sender("innocent-bank")
    bad = {**activity("bad"), "time": "2026-11-24T08:00:00+20:00"}
    answers: list[Any] = [None, None]

    def send(i: int, sender: Sender, events: list[dict[str, Any]]) -> None:
        try:
            answers[i] = post(sender, events)
        finally:
            connection.close()

    threads = [
        threading.Thread(target=send, args=(0, careless, [activity("c-1"), bad, activity("c-2")])),
        threading.Thread(target=send, args=(1, innocent, [activity("i-1"), activity("i-2"), activity("i-3")])),
    ]
    for n, thread in enumerate(threads, start=1):
        thread.start()
        wait_until(lambda n=n: queued() == n)
    release()  # both requests' six rows go in one statement, which PostgreSQL refuses
    for thread in threads:
        thread.join(30)

    (careless_status, careless_body), (innocent_status, innocent_body) = answers
    assert innocent_status == 202
    assert [r["status"] for r in innocent_body["results"]] == ["accepted"] * 3
    assert stored_ids(innocent) == {"i-1", "i-2", "i-3"}
    assert careless_status == 202
    assert careless_body["results"] == [
        {"id": "c-1", "status": "accepted"},
        {"id": "bad", "status": "rejected", "errors": [{"field": "time", "code": "unstorable"}]},
        {"id": "c-2", "status": "accepted"},
    ]
    assert stored_ids(careless) == {"c-1", "c-2"}


def test_a_request_whose_only_event_postgresql_refuses_is_422_not_a_503_for_ever(offsets_unchecked):
    careless = make_sender("careless-bank")
    for offset in ("+20:00", "+05:00:00.5"):
        for events in ([{**activity("bad"), "time": f"2026-11-24T08:00:00{offset}"}],) * 2:  # and again: the same
            status, body = post(careless, events)
            assert status == 422, body
            assert body["results"] == [
                {"id": "bad", "status": "rejected", "errors": [{"field": "time", "code": "unstorable"}]}
            ]
    assert stored_ids(careless) == set()


def test_in_a_large_batch_the_refused_events_are_found_and_the_rest_stored(offsets_unchecked):
    careless = make_sender("careless-bank")
    events = [activity(f"e{i}") for i in range(200)]
    for i in (3, 150, 151):
        events[i]["time"] = "2026-11-24T08:00:00+23:59"
    status, body = post(careless, events)
    assert status == 202
    rejected = [r["id"] for r in body["results"] if r["status"] == "rejected"]
    assert rejected == ["e3", "e150", "e151"]
    assert stored_ids(careless) == {f"e{i}" for i in range(200)} - set(rejected)
