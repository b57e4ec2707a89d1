"""Concurrent identical requests against PostgreSQL: the unique inbox row decides, not a prior read."""

import json
import threading

import pytest
from django.db import connection
from django.test import Client

from institutions.models import InboxEvent
from tests.conftest import activity, make_sender

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]

THREADS = 8
EVENTS = 1000


def post_all_at_once(sender, bodies: list[bytes]) -> list[tuple[int, dict]]:
    """POST each body from its own thread, all released together; returns (status, json) per thread."""
    barrier = threading.Barrier(len(bodies))
    answers: list[tuple[int, dict] | BaseException | None] = [None] * len(bodies)

    def send(index: int) -> None:
        try:
            client = Client()
            headers = sender.headers(bodies[index], msg_id=f"msg_thread_{index}")
            barrier.wait(timeout=10)
            response = client.post(
                sender.url, data=bodies[index], content_type="application/cloudevents-batch+json", headers=headers
            )
            answers[index] = (response.status_code, response.json())
        except BaseException as exc:  # reported by the test, not lost in the thread
            answers[index] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    return answers  # type: ignore[return-value]  # every slot holds an answer by now


def test_eight_identical_batches_at_once_store_each_event_exactly_once():
    sender = make_sender("busy-bank")
    body = json.dumps([activity(f"evt-{i}") for i in range(EVENTS)]).encode()

    answers = post_all_at_once(sender, [body] * THREADS)

    assert [status for status, _ in answers] == [202] * THREADS
    assert InboxEvent.objects.filter(institution=sender.institution).count() == EVENTS
    # Every event was accepted by exactly one request; the others saw it as a duplicate.
    accepted: dict[str, int] = {}
    for _, answer in answers:
        assert answer["received"] == EVENTS
        for result in answer["results"]:
            assert result["status"] in ("accepted", "duplicate")
            accepted[result["id"]] = accepted.get(result["id"], 0) + (result["status"] == "accepted")
    assert set(accepted.values()) == {1}


def test_concurrent_batches_with_the_same_ids_but_other_content_conflict_without_overwriting():
    sender = make_sender("busy-bank")
    bodies = [
        json.dumps([activity(f"evt-{i}", quantity=str(n + 1)) for i in range(100)]).encode() for n in range(THREADS)
    ]

    answers = post_all_at_once(sender, bodies)

    assert [status for status, _ in answers] == [202] * THREADS
    winners = [n for n, (_, answer) in enumerate(answers) if answer["results"][0]["status"] == "accepted"]
    assert len(winners) == 1  # one request's version of the event is kept whole
    for n, (_, answer) in enumerate(answers):
        expected = "accepted" if n == winners[0] else "conflict"
        assert {r["status"] for r in answer["results"]} == {expected}
    stored = set(InboxEvent.objects.values_list("data__quantity", flat=True))
    assert stored == {str(winners[0] + 1)}
