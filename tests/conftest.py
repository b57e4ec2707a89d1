"""Shared fixtures: institutions with real keys, and a client that signs like an institution does."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.test import Client

from institutions import crypto
from institutions.models import InboxEvent, Institution
from institutions.selectors import forget_all_institutions
from institutions.services import institution_register


@dataclass
class Sender:
    """An institution as seen from its own side: its code, its secrets and its private key."""

    institution: Institution
    hmac_secret: str | None
    ed25519_private: Ed25519PrivateKey | None
    api_token: str

    @property
    def code(self) -> str:
        return self.institution.code

    @property
    def url(self) -> str:
        return f"/api/v1/institutions/{self.code}/events"

    def headers(
        self,
        body: bytes,
        *,
        versions: tuple[str, ...] = ("v1", "v1a"),
        msg_id: str | None = None,
        timestamp: int | None = None,
    ) -> dict[str, str]:
        return crypto.webhook_headers(
            body,
            msg_id=msg_id or f"msg_{uuid.uuid4().hex}",
            timestamp=int(time.time()) if timestamp is None else timestamp,
            hmac_secrets=[crypto.hmac_secret_bytes(self.hmac_secret)] if "v1" in versions and self.hmac_secret else [],
            ed25519_keys=[self.ed25519_private] if "v1a" in versions and self.ed25519_private else [],
        )


def run_together(
    count: int, work: Callable[[int], Any], *, timeout: float = 120
) -> tuple[list[Any], list[BaseException]]:
    """Run ``work(i)`` for each ``i`` below ``count`` in its own thread, all released at once; each thread
    closes its database connection at the end. Returns the results by ``i`` (None where ``work`` raised)
    and the exceptions raised; fails the test if a thread is still running after ``timeout`` seconds."""
    from django.db import connection

    results: list[Any] = [None] * count
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def run(i: int) -> None:
        try:
            start.wait(30)
            results[i] = work(i)
        except BaseException as exc:  # surfaced by the caller, with the thread's own traceback
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    return results, errors


def make_sender(code: str, *, hmac: bool = True, ed25519: bool = True, provider: bool = False) -> Sender:
    private = Ed25519PrivateKey.generate() if ed25519 else None
    public = None
    if private is not None:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        public = crypto.format_public_key(private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    issued = institution_register(
        code=code, name=code.replace("-", " ").title(), hmac=hmac, ed25519_public_key=public, is_provider=provider
    )
    assert issued.api_token is not None
    return Sender(Institution.objects.get(code=code), issued.hmac_secret, private, issued.api_token)


def activity(event_id: str | None = None, *, subject: str = "cust-1", **data: Any) -> dict[str, Any]:
    """A valid ``carbon.activity.recorded`` event; keyword arguments override ``data`` fields."""
    payload = {"action": "transit.metro", "quantity": "12.5", "unit": "km", **data}
    return {
        "specversion": "1.0",
        "id": event_id or f"evt-{uuid.uuid4().hex[:12]}",
        "source": "/bank/app",
        "type": "carbon.activity.recorded",
        "subject": subject,
        "time": "2026-11-24T08:00:00Z",
        "data": {k: v for k, v in payload.items() if v is not None},
    }


def post_events(
    client: Client,
    sender: Sender,
    events: Any,
    *,
    content_type: str | None = None,
    body: bytes | None = None,
    **header_options: Any,
) -> Any:
    """POST events signed by ``sender``; a list goes as a batch, a dict as one event."""
    if body is None:
        body = json.dumps(events).encode()
    if content_type is None:
        content_type = (
            "application/cloudevents-batch+json" if isinstance(events, list) else "application/cloudevents+json"
        )
    headers = sender.headers(body, **header_options)
    return client.post(sender.url, data=body, content_type=content_type, headers=headers)


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix: None) -> None:
    """On SQLite, a test database in a file, as the embedded hub has, not in memory.

    An in-memory database is one connection that Django shares between the test and every thread of
    the live server; requests running at once (the demo receiver answers a webhook while the request
    that sent it is still finishing) would interleave their transactions on it. With a file each
    thread has its own connection and SQLite serializes the writers, as under ``make run``.
    """
    from django.conf import settings

    database = settings.DATABASES["default"]
    if database["ENGINE"] == "django.db.backends.sqlite3":
        name = f"test-{os.getpid()}.sqlite3"
        database.setdefault("TEST", {})["NAME"] = str(settings.VAR_DIR / name)


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings: Any) -> None:
    # The default hasher is slow on purpose; the tests check behaviour, not hashing cost.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _fresh_credential_cache() -> Iterator[None]:
    forget_all_institutions()
    yield
    forget_all_institutions()


@pytest.fixture(autouse=True)
def _fresh_rate_windows() -> Iterator[None]:
    """Institution ids repeat from test to test (rolled back), so no test inherits another's window."""
    from django.conf import settings

    from clearinghouse import throttle
    from clearinghouse.redis import redis_client
    from institutions import intake

    intake._local_windows.clear()
    intake._reserved.clear()  # requests this process reserved in Redis and has not spent yet
    throttle._local.clear()  # sign-in, sign-up and link-code windows counted without Redis
    yield
    intake._local_windows.clear()
    intake._reserved.clear()
    throttle._local.clear()
    client = redis_client()
    # Tests that point Redis at a closed port leave a client that cannot answer: nothing to clean then.
    with contextlib.suppress(Exception):
        keys = list(client.scan_iter(f"{settings.HUB_REDIS_KEY_PREFIX}ratelimit:*", count=1000)) if client else []
        if keys:
            client.delete(*keys)  # type: ignore[union-attr]


@pytest.fixture
def bank(db: None) -> Sender:
    return make_sender("bank-a")


@pytest.fixture
def other_bank(db: None) -> Sender:
    return make_sender("bank-b")


Deliver = Callable[..., list[InboxEvent]]


@pytest.fixture
def deliver(client: Client, django_capture_on_commit_callbacks: Any) -> Deliver:
    """Send events signed by ``sender`` (one request; a batch when several) and return their inbox
    rows after the dispatcher drained them on commit."""

    def send(sender: Sender, *events: dict[str, Any]) -> list[InboxEvent]:
        with django_capture_on_commit_callbacks(execute=True):
            response = post_events(client, sender, list(events) if len(events) > 1 else events[0])
        assert response.status_code == 202, response.content
        return [InboxEvent.objects.get(institution=sender.institution, event_id=e["id"]) for e in events]

    return send


# --- A webhook receiver on loopback -------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


Respond = Callable[[dict[str, str], bytes], tuple[int, dict[str, str]]]


class Receiver:
    """A threaded HTTP/1.1 server recording every request; ``respond`` decides each answer."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.effects: dict[str, int] = {}  # webhook-id -> times applied (deduplicated: must stay 1)
        self.respond: Respond = lambda headers, body: (200, {})
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver.lock:
                    receiver.requests.append((headers, body))
                    status, extra = receiver.respond(headers, body)
                    if 200 <= status < 300:
                        msg_id = headers["webhook-id"]
                        receiver.effects[msg_id] = receiver.effects.get(msg_id, 0) or 1  # dedupe by webhook-id
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.request_queue_size = 128
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Transactional tests restore the database as migrations left it (serialized rollback).

    A ``transaction=True`` test ends by emptying every table, which would also remove what data
    migrations seeded (the unified standard). Every such test therefore uses serialized rollback;
    mixing the two kinds would re-insert content types that the flush had already re-created.
    """
    for item in items:
        marker = item.get_closest_marker("django_db")
        if marker and marker.kwargs.get("transaction") and not marker.kwargs.get("serialized_rollback"):
            kwargs = {**marker.kwargs, "serialized_rollback": True}
            item.add_marker(pytest.mark.django_db(*marker.args, **kwargs), append=False)
