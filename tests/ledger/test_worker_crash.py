"""A worker killed with SIGKILL in the middle of crediting loses nothing and credits nothing twice
(DESIGN.md, reliability model), for real: 10,000 stored events, a real Celery worker on PostgreSQL and
Redis, frozen and killed while it holds an uncommitted batch, then a fresh worker and the sweeper.

The kill is made to land inside the crediting transaction, after the credits are written: the worker
is stopped (SIGSTOP) and killed only if its database session is then idle inside a transaction that
holds the owners' advisory locks (taken first by the handler, kept to its commit) and has inserted
postings; otherwise it is resumed and looked at again a moment later.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection
from django.db.models import Sum
from kombu import Connection, Exchange, Queue

from clearinghouse.celery import app as celery_app
from institutions import crypto, intake, tasks
from institutions.models import InboxEvent
from institutions.selectors import institution_verifier
from ledger.models import LOT_KINDS, Account, AccountKind, Posting, Transfer
from ledger.selectors import ledger_check
from methodology.models import NormalizedActivity
from tests.conftest import activity, make_sender
from tests.institutions.test_broker_outage import broker
from wallets.models import Membership, Person

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parents[2]
EVENTS = 10_000
STORE_BATCH = 1_000
SUBJECTS = 20  # per institution
# The broker: a Redis database other tests leave alone (test_broker_outage uses 13), and in it a queue
# of this run's own, so that no other worker on this Redis takes this test's tasks, nor its worker theirs.
BROKER_DB = 15
LEASE_SECONDS = 3  # how soon the killed worker's leased rows become claimable again
WORKER_BATCH = 200
KILL_FROM = 2_000  # processed rows before the worker may be killed
PLATE_CAP = 3  # food.clean_plate: at most 3 check-ins a day (methodology/data/caps.csv)
Status = InboxEvent.Status


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


def processed() -> int:
    return InboxEvent.objects.filter(status=Status.PROCESSED).count()


def event(n: int) -> dict[str, Any]:
    """Event ``n`` of the stream: mostly metro rides (no cap), every tenth a clean-plate check-in (capped
    per owner and day), over 20 subjects and 28 days."""
    subject = f"cust-{n % SUBJECTS}"
    moment = f"2026-11-{1 + n % 28:02d}T0{n % 10}:00:00Z"
    if n % 10 == 0:
        payload = activity(f"e{n:05d}", subject=subject, action="food.clean_plate", quantity="1", unit="checkin")
    else:
        payload = activity(f"e{n:05d}", subject=subject, quantity=f"{1 + n % 37}.{n % 10}")
    payload["time"] = moment
    return payload


def store_stream(monkeypatch: pytest.MonkeyPatch) -> Person:
    """10,000 recorded activities of three institutions, stored without kicking any processing.

    One subject of the first institution is linked to a person, so both holding and wallet lots are
    credited.
    """
    monkeypatch.setattr(intake, "_kick_processing", lambda: None)
    senders = [make_sender(f"bank-{n}") for n in range(3)]
    user = get_user_model().objects.create_user("commuter", password="x" * 12)
    person = Person.objects.create(user=user)
    Membership.objects.create(
        institution=senders[0].institution,
        person=person,
        subject_ref=crypto.subject_ref(senders[0].code, "cust-0"),
        subject_sealed=crypto.seal("cust-0"),
    )
    for batch, start in enumerate(range(0, EVENTS, STORE_BATCH)):
        verifier = institution_verifier(senders[batch % len(senders)].code)
        assert verifier is not None
        events = [event(n) for n in range(start, start + STORE_BATCH)]
        result = intake.events_store(verifier=verifier, webhook_id=f"msg_{batch}", events=events)
        assert result.accepted == STORE_BATCH, result.results[:3]
    return person


def database_url(application_name: str) -> str:
    """The test database (pytest-django's ``test_...``), as the worker process must reach it."""
    db = connection.settings_dict
    credentials = quote(db["USER"] or "", safe="")
    if db["PASSWORD"]:
        credentials += ":" + quote(db["PASSWORD"], safe="")
    host = f"{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}"
    return f"postgres://{credentials}@{host}/{db['NAME']}?application_name={application_name}"


class Workers:
    """Real ``celery worker`` processes of this test; whatever is left running is killed on exit."""

    def __init__(self, folder: Path, broker_url: str, queue: str) -> None:
        self.folder = folder
        self.broker_url = broker_url
        self.queue = queue
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "clearinghouse.settings",
            "DJANGO_DEBUG": "0",
            "DJANGO_SECRET_KEY": settings.SECRET_KEY,
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
            "HUB_ENCRYPTION_KEYS": ",".join(settings.HUB_ENCRYPTION_KEYS),
            "HUB_SUBJECT_KEY": settings.HUB_SUBJECT_KEY,
            "HUB_REDIS_KEY_PREFIX": settings.HUB_REDIS_KEY_PREFIX,
            "DATABASE_URL": database_url(name),
            "REDIS_URL": self.broker_url,
            "CLEARINGHOUSE_TASKS_EAGER": "0",
            "HUB_INBOX_LEASE_SECONDS": str(LEASE_SECONDS),
            "HUB_INBOX_BATCH_SIZE": str(WORKER_BATCH),
            "LOG_LEVEL": "WARNING",
        }
        command = [sys.executable, "-m", "celery", "-A", "clearinghouse", "worker", "-Q", self.queue]
        command += ["--pool", "solo", "--loglevel", "WARNING", "--hostname", f"{name}@%h"]
        command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        with (self.folder / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603 (our own command)
        self.started[name] = process
        return process

    def logs(self) -> str:
        tails = []
        for name in self.started:
            text = (self.folder / f"{name}.log").read_text(errors="replace")
            tails.append(f"--- {name} (last 3000 characters) ---\n{text[-3000:]}")
        return "\n".join(tails)

    def stop_all(self) -> None:
        for process in self.started.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)  # a worker left stopped could not act on SIGTERM
                process.terminate()
        for process in self.started.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)
        # Their sessions must be gone before the test's teardown empties the tables.
        wait_until(lambda: not any(backends(name) for name in self.started), timeout=15)


@contextmanager
def routed_to(queue: str) -> Iterator[None]:
    """Send the edge's tasks (``inbox_drain``, also from ``inbox_sweep``) to ``queue`` while inside."""

    def route(name: str, *args: Any, **kwargs: Any) -> dict[str, str] | None:
        return {"queue": queue} if name.startswith("institutions.tasks.") else None

    # The list the router consults on every publish (not in celery-types' stubs).
    routes: list[Any] = celery_app.amqp.router.routes  # type: ignore[attr-defined]
    routes.insert(0, route)
    try:
        yield
    finally:
        routes.remove(route)


def unacknowledged(url: str, queue: str) -> list[bytes]:
    """Delivery tags of the messages of ``queue`` a worker received and did not acknowledge; Redis hands
    them out again after the visibility timeout."""
    tags = []
    for tag, payload in redis.Redis.from_url(url).hscan_iter("unacked"):
        try:
            routing_key = json.loads(payload)[2]  # kombu keeps [message, exchange, routing key]
        except (ValueError, LookupError, TypeError):
            continue
        if routing_key == queue:
            tags.append(tag)
    return tags


def forget_queue(url: str, queue: str) -> None:
    """Remove ``queue`` from the broker with what the killed worker left unacknowledged in it; nothing
    of anyone else's."""
    with Connection(url) as broker_connection:
        bound = Queue(queue, Exchange(queue), routing_key=queue)(broker_connection.default_channel)
        bound.declare()  # a channel deletes only the bindings it knows
        bound.delete()
    client = redis.Redis.from_url(url)
    for tag in unacknowledged(url, queue):
        client.hdel("unacked", tag)
        client.zrem("unacked_index", tag)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    url = settings.REDIS_URL.rsplit("/", 1)[0] + f"/{BROKER_DB}"
    queue = f"test-worker-crash-{uuid.uuid4().hex[:12]}"
    started = Workers(tmp_path, url, queue)
    try:
        with broker(url), routed_to(queue):
            yield started
    finally:
        started.stop_all()
        forget_queue(url, queue)


def backends(application_name: str) -> list[tuple[int, str, Any]]:
    """(pid, state, time of the last state change) of the database sessions a worker opened."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid, state, state_change FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = %s ORDER BY pid",
            [application_name],
        )
        return list(cursor.fetchall())


def crediting_uncommitted(pid: int) -> bool:
    """Whether session ``pid`` holds the owners' advisory locks (taken first by the handler, kept to its
    commit) and has written credit postings (it holds the posting table's insert lock): the handler's
    credits are made and not committed."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT coalesce(bool_or(locktype = 'advisory'), false) "
            "   AND coalesce(bool_or(locktype = 'relation' AND relation = %s::regclass "
            "                        AND mode = 'RowExclusiveLock'), false) "
            "FROM pg_locks WHERE pid = %s AND granted",
            [Posting._meta.db_table, pid],
        )
        return bool(cursor.fetchone()[0])


def mid_crediting(application_name: str) -> bool:
    """Whether the stopped worker's session sits inside the crediting transaction, credits written.

    What the worker sent before it stopped is still carried out: a statement runs to its end, a
    message still in the socket (a COMMIT, say) is read and run. So the session must first settle:
    nothing running and no change between two looks. Then ``idle in transaction`` with the locks of
    :func:`crediting_uncommitted` means the credits are written and cannot be committed now.
    """
    previous = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.1)
        sessions = backends(application_name)
        if sessions == previous and all(state != "active" for _, state, _ in sessions):
            return any(state == "idle in transaction" and crediting_uncommitted(pid) for pid, state, _ in sessions)
        previous = sessions
    return False


def kill_mid_crediting(workers: Workers, name: str, timeout: float) -> None:
    """SIGKILL worker ``name`` inside a crediting transaction once it processed ``KILL_FROM`` rows.

    Stopped, the worker makes no progress, and it runs only a few milliseconds between two looks, so
    it cannot run through the window in which its credits are written and not yet committed.
    """
    worker = workers.started[name]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert worker.poll() is None, workers.logs()
        done = processed()
        assert done < EVENTS, "the whole stream was credited and the worker was never seen mid-crediting"
        if done < KILL_FROM:
            time.sleep(0.05)
            continue
        os.kill(worker.pid, signal.SIGSTOP)
        if mid_crediting(name):
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(timeout=15)
            return
        os.kill(worker.pid, signal.SIGCONT)
        time.sleep(random.uniform(0.01, 0.05))
    pytest.fail(f"worker not caught mid-crediting in {timeout} s ({processed()} rows processed)\n{workers.logs()}")


def test_a_worker_killed_mid_stream_credits_every_event_exactly_once_after_a_restart(monkeypatch, workers):
    person = store_stream(monkeypatch)
    assert InboxEvent.objects.filter(status=Status.RECEIVED).count() == EVENTS

    # --- A worker credits the stream and is killed in the middle of a batch.
    first = workers.start("crash-worker-1")
    for _ in range(2):
        tasks.inbox_drain.delay()
    kill_mid_crediting(workers, "crash-worker-1", timeout=120)
    assert first.returncode == -signal.SIGKILL
    # PostgreSQL rolls the dead session's transaction back once it notices the connection is gone.
    assert wait_until(lambda: not backends("crash-worker-1"), timeout=15), backends("crash-worker-1")

    at_crash = processed()
    assert KILL_FROM <= at_crash < EVENTS, at_crash
    leased = set(
        InboxEvent.objects.filter(status=Status.RECEIVED, attempts__gte=1).values_list("id", flat=True)
    )  # claimed by the killed worker, never finished
    assert 0 < len(leased) <= WORKER_BATCH
    # Nothing of the interrupted batch survived: activities and credits exist for processed rows only.
    assert NormalizedActivity.objects.count() == at_crash
    assert not NormalizedActivity.objects.filter(inbox_event_id__in=leased).exists()
    assert not Transfer.objects.filter(idempotency_key__in=[f"activity:{pk}" for pk in leased]).exists()
    assert ledger_check() == []

    # --- A new worker takes over; the sweeper (run here, as beat would) re-enqueues the leased rows
    # once their lease ran out.
    monkeypatch.setattr(settings, "HUB_INBOX_SWEEP_AFTER_SECONDS", 0)
    second = workers.start("crash-worker-2")
    tasks.inbox_drain.delay()
    deadline = time.monotonic() + 120
    while processed() < EVENTS and time.monotonic() < deadline:
        assert second.poll() is None, workers.logs()
        time.sleep(LEASE_SECONDS)
        if processed() < EVENTS:
            tasks.inbox_sweep()
    statuses = Counter(InboxEvent.objects.values_list("status", flat=True))
    assert statuses == {Status.PROCESSED: EVENTS}, (statuses, workers.logs())

    # The interrupted batch was claimed twice, every other row once.
    attempts = dict(InboxEvent.objects.values_list("id", "attempts"))
    assert {pk: n for pk, n in attempts.items() if n != 1} == dict.fromkeys(leased, 2)

    # One activity per inbox row.
    activities = list(NormalizedActivity.objects.values_list("inbox_event_id", "credited_mg"))
    assert len(activities) == EVENTS
    assert {pk for pk, _ in activities} == set(attempts)
    credited = {f"activity:{pk}": mg for pk, mg in activities if mg > 0}
    assert len(credited) > EVENTS * 0.8  # metro rides all credit; capped check-ins do not

    # Exactly one credit transfer per credited activity, and no other transfer at all.
    transfers = list(Transfer.objects.values_list("idempotency_key", "kind"))
    assert len(transfers) == len(credited)
    assert {key for key, _ in transfers} == set(credited)
    assert {kind for _, kind in transfers} == {"credit"}
    # Each moved the activity's milligrams into a lot.
    into_lots = dict(
        Posting.objects.filter(account__kind__in=LOT_KINDS)
        .values("transfer__idempotency_key")
        .annotate(total=Sum("amount"))
        .values_list("transfer__idempotency_key", "total")
    )
    assert into_lots == credited

    # The books: lots hold what was credited, issuers owe it, the invariants hold.
    total = sum(credited.values())
    assert Account.objects.filter(kind__in=LOT_KINDS).aggregate(s=Sum("balance"))["s"] == total
    assert Account.objects.filter(kind=AccountKind.ISSUER_OUTSTANDING).aggregate(s=Sum("balance"))["s"] == -total
    assert Account.objects.filter(kind=AccountKind.WALLET_LOT, person_id=person.pk, balance__gt=0).exists()
    assert ledger_check() == []

    # Caps were counted once: per owner and day, min(3, check-ins) are credited.
    plates: dict[tuple[str, Any], list[Any]] = {}
    for owner, day, quantity in NormalizedActivity.objects.filter(scenario__code="food.clean_plate").values_list(
        "owner_key", "occurred_at__date", "credited_quantity"
    ):
        plates.setdefault((owner, day), []).append(quantity)
    assert plates
    assert all(sum(q) == min(PLATE_CAP, len(q)) for q in plates.values()), plates
