"""The hub as a real server process on loopback (Django's ``runserver`` or gunicorn), on the test's
database, for what only a real server shows: how it hands bodies to WSGI, what a socket receives.

The server runs in its own process with the test's secrets and database (committed rows only: use it
from ``django_db(transaction=True)`` tests), and is stopped when the ``with`` block ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from django.conf import settings
from django.db import connection

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def database_url() -> str:
    """The test database (pytest-django's), as another process reaches it."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    credentials = quote(db["USER"] or "", safe="")
    if db["PASSWORD"]:
        credentials += ":" + quote(db["PASSWORD"], safe="")
    return f"postgres://{credentials}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def server_environment(**extra: str) -> dict[str, str]:
    # Settings add PostgreSQL session options to any DATABASE_URL; a SQLite connection takes none.
    sqlite = {"DB_IDLE_IN_TRANSACTION_TIMEOUT_MS": "0", "DB_PREPARED_STATEMENTS": "0"}
    return {
        **(sqlite if connection.vendor == "sqlite" else {}),
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "clearinghouse.settings",
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": settings.SECRET_KEY,
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "DJANGO_SECURE_SSL_REDIRECT": "0",  # plain HTTP straight to the server, no proxy in front
        "HUB_ENCRYPTION_KEYS": ",".join(settings.HUB_ENCRYPTION_KEYS),
        "HUB_SUBJECT_KEY": settings.HUB_SUBJECT_KEY,
        "HUB_REDIS_KEY_PREFIX": settings.HUB_REDIS_KEY_PREFIX,
        "DATABASE_URL": database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "CLEARINGHOUSE_TASKS_EAGER": "1",  # no worker: an accepted event is processed in the request's process
        "LOG_LEVEL": "WARNING",
        **extra,
    }


@dataclass
class Served:
    port: int
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@contextmanager
def hub_server(kind: str, folder: Path, **environment: str) -> Iterator[Served]:
    """``kind`` ``runserver`` or ``gunicorn`` (gthread workers, as production runs it), serving the hub."""
    port = free_port()
    if kind == "runserver":
        command = [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload", "--skip-checks"]
    else:
        command = [sys.executable, "-m", "gunicorn", "clearinghouse.wsgi:application", "--bind", f"127.0.0.1:{port}"]
        command += ["--worker-class", "gthread", "--workers", "1", "--threads", "4", "--no-control-socket"]
    log = folder / f"{kind}-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603 (our own command)
            command, env=server_environment(**environment), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
    served = Served(port, log)
    try:
        deadline = time.monotonic() + 60
        while not _answers(port):
            assert process.poll() is None, f"the {kind} server exited:\n{served.output()}"
            assert time.monotonic() < deadline, f"the {kind} server did not start:\n{served.output()}"
            time.sleep(0.1)
        yield served
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)
        connection.close()  # the server's sessions are gone; the test's own is reopened when needed


def _answers(port: int) -> bool:
    try:
        status, _, _ = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    except OSError:
        return False
    return status == 200


def exchange(port: int, request: bytes, *, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send raw ``request`` bytes; read until the server closes the connection (send ``Connection:
    close``, or expect the server to close); the status, headers (lower-cased) and body (de-chunked)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        # A server may answer and close before it has read the whole request (a body past a limit):
        # what it answered still counts, whatever happens to the rest of the request.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return int(status_line.split()[1]), headers, body


def chunked(body: bytes, size: int = 100) -> bytes:
    """``body`` in Transfer-Encoding: chunked framing, ``size`` bytes a chunk."""
    parts = [b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out
