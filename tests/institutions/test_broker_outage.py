"""Losing the broker loses no events (DESIGN.md, reliability model), run for real: a dead broker, then
a live Redis and a real Celery worker that the sweeper feeds."""

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
import redis
from celery.contrib.testing.worker import start_worker
from celery.signals import task_postrun
from django.conf import settings
from django.db import connections
from django.test import override_settings
from django.utils import timezone

from clearinghouse.celery import app as celery_app
from clearinghouse.redis import redis_client
from institutions import kicks, tasks
from institutions.models import InboxEvent
from tests.conftest import activity, make_sender, post_events

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

DEAD_BROKER = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connections are refused at once
BROKER_DB = 13  # a Redis database of this test's own, emptied before use


def _drop_broker_connections() -> None:
    """Forget pooled connections, so the next publish connects to the broker now configured.

    Celery has no public call for this; these are the attributes it resets itself after a fork.
    """
    pool = getattr(celery_app, "_pool", None)
    if pool is not None:
        pool.force_close_all()
    setattr(celery_app, "_pool", None)  # noqa: B010 (private Celery state, untyped on purpose)
    setattr(celery_app.amqp, "_producer_pool", None)  # noqa: B010


@contextmanager
def broker(url: str) -> Iterator[None]:
    """Send tasks to ``url`` for real (not in process) while inside."""
    conf = celery_app.conf
    saved = {"broker_url": conf.broker_url, "task_always_eager": conf.task_always_eager}
    conf.update(broker_url=url, task_always_eager=False)
    _drop_broker_connections()
    try:
        with override_settings(CELERY_BROKER_URL=url, CELERY_TASK_ALWAYS_EAGER=False):
            yield
    finally:
        conf.update(saved)
        _drop_broker_connections()


def _close_worker_connections(**kwargs: object) -> None:
    connections.close_all()  # runs in the worker's thread: its connection must not outlive the test


@contextmanager
def celery_worker() -> Iterator[None]:
    task_postrun.connect(_close_worker_connections, weak=False)
    try:
        with start_worker(celery_app, pool="solo", perform_ping_check=False, shutdown_timeout=15):
            yield
    finally:
        task_postrun.disconnect(_close_worker_connections)


def wait_until(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_intake_commits_without_a_broker_and_the_sweeper_catches_up_once_it_is_back(client, activity_handler, caplog):
    sender = make_sender("bank-a")
    events = [activity(f"e{i}") for i in range(20)]
    # A drain queued by an earlier test would make the kick skip its publish.
    kick_store = redis_client()
    assert kick_store is not None
    kick_store.delete(kicks.KICK_KEY)

    with broker(DEAD_BROKER), caplog.at_level(logging.WARNING, logger="institutions.kicks"):
        started = time.monotonic()
        response = post_events(client, sender, events)
        took = time.monotonic() - started
    assert response.status_code == 202, response.content
    assert response.json()["received"] == 20
    assert "broker unreachable" in caplog.text  # the kick after commit really tried and failed
    assert InboxEvent.objects.filter(status="received").count() == 20  # committed, waiting for a worker
    assert activity_handler.seen == []
    assert took < 10, "a dead broker must not hang the request"

    url = settings.REDIS_URL.rsplit("/", 1)[0] + f"/{BROKER_DB}"
    redis.Redis.from_url(url).flushdb()
    with broker(url), celery_worker():
        InboxEvent.objects.update(received_at=timezone.now() - timedelta(minutes=2))
        assert tasks.inbox_sweep() == 20
        done = wait_until(lambda: InboxEvent.objects.filter(status="processed").count() == 20)

    assert done, dict(InboxEvent.objects.values_list("event_id", "status"))
    assert sorted(activity_handler.seen) == sorted(e["id"] for e in events)
    assert threading.current_thread().name not in activity_handler.threads  # the worker did it, not this thread
    assert InboxEvent.objects.filter(attempts=1).count() == 20
