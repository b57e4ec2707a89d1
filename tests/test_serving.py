"""Serving as measured, and safe from slow clients: the real gunicorn (gunicorn.conf.py) behind the real
nginx (deploy/nginx.conf), each started here on free ports with compose's production environment.

Issue 11: six connections that sent a body slowly stalled gunicorn as compose ran it (sync workers, no
proxy): ``/healthz`` timed out. Threads alone do not fix it: once a connection's first bytes are in, a
gthread thread waits on the client with no time limit, so one more slow client than threads stalls a
process (the contrast below shows both). nginx reads each request whole before passing it on; behind it,
gunicorn's threads never wait on a client.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from tests.compose_file import ROOT, gunicorn_settings, service_environment

NGINX_CONF = ROOT / "deploy" / "nginx.conf"
PROBE_SECONDS = 1.0  # what a probe waits for /healthz: the bar
INTAKE = "/api/v1/institutions/slow-bank/events"  # reads the whole body before anything else


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if found:
        return found
    if os.environ.get("CLEARINGHOUSE_REQUIRE_SERVICES") == "1":
        pytest.fail("nginx is needed to test serving behind the proxy (apt-get install nginx)")
    pytest.skip("nginx is not installed (apt-get install nginx)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_response(connection: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one answer, read up to its Content-Length (a server
    may keep the connection open after answering, as nginx does after refusing a body it did not read)."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a whole answer: {raw!r}")
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed inside the body: {raw!r}")
        body += chunk
    return int(status_line.split()[1]), headers, body


def get(
    port: int, path: str, *, host: str | None = None, timeout: float = PROBE_SECONDS
) -> tuple[int, dict[str, str], bytes]:
    """One plain-HTTP request on a new connection, redirects not followed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.settimeout(timeout)
        request = f"GET {path} HTTP/1.1\r\nHost: {host or f'127.0.0.1:{port}'}\r\nConnection: close\r\n\r\n"
        connection.sendall(request.encode())
        return read_response(connection)


def healthz_answers(port: int) -> float | None:
    """Seconds /healthz took to answer 200, or None if it did not within the probe's second."""
    started = time.monotonic()
    try:
        status, _, _ = get(port, "/healthz")
    except OSError:  # includes the timeout
        return None
    return time.monotonic() - started if status == 200 else None


# --- The processes ------------------------------------------------------------------------------------


@dataclass
class Served:
    folder: Path
    gunicorn_port: int
    workers: int
    threads: int
    proxy_port: int | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def logs(self) -> str:
        return "\n".join(
            f"--- {log.name} ---\n{log.read_text(errors='replace')[-3000:]}"
            for log in sorted(self.folder.glob("*.log"))
        )


def production_environment(folder: Path, **dotenv: str) -> dict[str, str]:
    """Compose's web environment (with a .env of secrets and ``dotenv``), on SQLite and in-process tasks:
    the requests here need neither a database nor a broker beyond /readyz's ``SELECT 1``."""
    environment = service_environment(
        "web",
        {
            "DJANGO_SECRET_KEY": "serving-test-" + "k" * 50,
            "HUB_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
            "HUB_SUBJECT_KEY": "serving-test-subject-key",
            **dotenv,
        },
    )
    for name in ("DATABASE_URL", "REDIS_URL"):  # compose's hosts (postgres, redis) exist only in compose
        environment.pop(name)
    return {
        **environment,
        "PATH": os.environ["PATH"],
        "CLEARINGHOUSE_VAR_DIR": str(folder / "var"),
        "DJANGO_SETTINGS_MODULE": "clearinghouse.settings",
    }


def start_gunicorn(folder: Path, environment: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    environment = {**environment, "GUNICORN_BIND": f"127.0.0.1:{port}", "GUNICORN_LOG_LEVEL": "warning"}
    with (folder / "gunicorn.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py"],
            env=environment,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, port


def start_nginx(folder: Path, upstream_port: int) -> tuple[subprocess.Popen[bytes], int]:
    """deploy/nginx.conf as compose mounts it (inside http {}), its two addresses made local."""
    port = free_port()
    site = NGINX_CONF.read_text()
    for written, local in (
        ("server web:8000;", f"server 127.0.0.1:{upstream_port};"),
        ("listen 8000;", f"listen 127.0.0.1:{port};"),
    ):
        assert site.count(written) == 1, f"deploy/nginx.conf should have one {written!r}"
        site = site.replace(written, local)
    (folder / "hub.conf").write_text(site)
    temp = {name: folder / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    (folder / "nginx.conf").write_text(
        f"""
        worker_processes 1;
        pid {folder}/nginx.pid;
        error_log {folder}/nginx-error.log warn;
        events {{ worker_connections 1024; }}
        http {{
            access_log off;
            {" ".join(f"{name}_temp_path {path};" for name, path in temp.items())}
            include {folder}/hub.conf;
        }}
        """
    )
    with (folder / "nginx.log").open("wb") as log:
        process = subprocess.Popen(  # noqa: S603 (nginx with our configuration)
            [nginx_binary(), "-e", "stderr", "-p", str(folder), "-c", str(folder / "nginx.conf"), "-g", "daemon off;"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, port


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_until_up(served: Served, port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for process in served.processes:
            if process.poll() is not None:
                pytest.fail(f"a server exited with {process.returncode}:\n{served.logs()}")
        if healthz_answers(port) is not None:
            return
        time.sleep(0.2)
    pytest.fail(f"no answer on :{port} within 60 s:\n{served.logs()}")


@contextlib.contextmanager
def serve(
    tmp_path: Path, *, proxy: bool, dotenv: dict[str, str] | None = None, extra: dict[str, str] | None = None
) -> Iterator[Served]:
    """gunicorn as compose's web runs it (given a .env of ``dotenv``, plus ``extra`` in its environment),
    with nginx in front if ``proxy``."""
    environment = {**production_environment(tmp_path, **(dotenv or {})), **(extra or {})}
    gunicorn, gunicorn_port = start_gunicorn(tmp_path, environment)
    config = gunicorn_settings(environment)
    served = Served(tmp_path, gunicorn_port, config.workers, config.threads, processes=[gunicorn])
    try:
        wait_until_up(served, gunicorn_port)
        if proxy:
            nginx, served.proxy_port = start_nginx(tmp_path, gunicorn_port)
            served.processes.append(nginx)
            wait_until_up(served, served.proxy_port)
        yield served
    finally:
        for process in reversed(served.processes):
            stop(process)


# --- Slow clients -------------------------------------------------------------------------------------


class SlowClients:
    """Connections that send an intake request a byte every half second: the headers, then the body
    (``body``), or never even finish the headers (``headers``). Each notes if the server hung up on it."""

    HEAD = (
        f"POST {INTAKE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/cloudevents+json\r\n"
        "Content-Length: 4096\r\n\r\n"
    ).encode()

    def __init__(self, port: int, count: int, mode: str) -> None:
        self.port, self.mode = port, mode
        self.stopping = threading.Event()
        self.connected = threading.Semaphore(0)
        self.cut_off: list[str] = []
        self.threads = [threading.Thread(target=self.trickle, daemon=True) for _ in range(count)]

    def trickle(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as connection:
                if self.mode == "body":
                    connection.sendall(self.HEAD)
                    to_send = b"[" + b" " * 4094 + b"]"
                else:
                    to_send = self.HEAD
                self.connected.release()
                for byte in to_send:
                    if self.stopping.wait(0.5):
                        return
                    connection.sendall(bytes([byte]))
        except OSError as error:
            if not self.stopping.is_set():
                self.cut_off.append(repr(error))

    def __enter__(self) -> SlowClients:
        for thread in self.threads:
            thread.start()
        for _ in self.threads:
            assert self.connected.acquire(timeout=10), "a slow client could not connect"
        time.sleep(1.5)  # every connection has sent bytes since, and a server thread is waiting on it
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=5)


@pytest.mark.parametrize("mode", ["body", "headers"])
def test_slow_clients_do_not_stall_the_hub_behind_the_proxy(tmp_path, mode):
    """More slow connections than gunicorn has threads in all, and /healthz still answers within a second,
    again and again, while every slow connection is still open (nginx is holding them, not dropping them)."""
    # The slow requests must reach the intake, which reads the body: in production they come over HTTPS.
    with serve(tmp_path, proxy=True, dotenv={"DJANGO_SECURE_SSL_REDIRECT": "0"}) as served:
        assert served.proxy_port
        count = 2 * served.workers * served.threads + 1
        with SlowClients(served.proxy_port, count, mode) as slow:
            answers = []
            for _ in range(5):
                answers.append(healthz_answers(served.proxy_port))
                time.sleep(0.3)
            assert not slow.cut_off, slow.cut_off
        assert all(seconds is not None for seconds in answers), (answers, served.logs())


@pytest.mark.parametrize(
    ("worker_class", "threads"),
    [("gthread", "4"), ("sync", "1")],  # gunicorn runs "sync" with threads > 1 as gthread
    ids=["gthread-without-proxy", "sync-as-compose-ran-it"],
)
def test_without_the_proxy_a_few_slow_clients_stall_gunicorn(tmp_path, worker_class, threads):
    """The contrast: gunicorn faced directly, one process (so the kernel cannot hand the probe to a free
    process by chance), one more slow client than it has threads: /healthz does not answer in a second."""
    dotenv = {"DJANGO_SECURE_SSL_REDIRECT": "0", "GUNICORN_WORKERS": "1", "GUNICORN_THREADS": threads}
    with serve(tmp_path, proxy=False, dotenv=dotenv, extra={"GUNICORN_WORKER_CLASS": worker_class}) as served:
        assert served.workers == 1
        with SlowClients(served.gunicorn_port, served.threads + 1, "body"):
            assert healthz_answers(served.gunicorn_port) is None


# --- The production chain, over plain HTTP inside the network --------------------------------------------


def test_behind_the_proxy_probes_pass_and_the_rest_goes_to_https(tmp_path):
    """Compose's defaults: the redirect to HTTPS is on. The web healthcheck (gunicorn on loopback, Host
    127.0.0.1:8000) and the proxy's (through nginx) are answered; clients on plain HTTP are sent to
    HTTPS; a Host the hub does not serve is refused."""
    with serve(tmp_path, proxy=True) as served:
        assert served.proxy_port
        status, _, body = get(served.gunicorn_port, "/readyz")  # compose's web healthcheck
        assert (status, json.loads(body)["status"]) == (200, "ready")
        assert get(served.proxy_port, "/healthz")[0] == 200  # compose's proxy healthcheck
        status, headers, _ = get(served.proxy_port, "/api/v1/hub/keys")
        assert status == 301 and headers["location"] == "https://127.0.0.1/api/v1/hub/keys"
        assert get(served.proxy_port, "/api/v1/hub/keys", host="evil.example")[0] == 400


def test_the_proxy_refuses_oversized_bodies_as_the_hub_does(tmp_path):
    with serve(tmp_path, proxy=True) as served:
        assert served.proxy_port
        with socket.create_connection(("127.0.0.1", served.proxy_port), timeout=5) as connection:
            connection.sendall(
                f"POST {INTAKE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/cloudevents+json\r\n"
                f"Content-Length: {3 * 1024 * 1024}\r\nConnection: close\r\n\r\n".encode()
            )
            status, headers, body = read_response(connection)
    assert (status, headers["content-type"]) == (413, "application/problem+json")
    assert json.loads(body)["code"] == "payload-too-large"


def test_an_unreachable_hub_is_a_503_with_retry_after_from_the_proxy(tmp_path):
    """Senders retry a 503 (CONTRACT.md); a bare 502 from the proxy would read as the hub's fault."""
    nginx, port = start_nginx(tmp_path, upstream_port=free_port())  # nothing listens there
    served = Served(tmp_path, 0, 0, 0, proxy_port=port, processes=[nginx])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                status, headers, body = get(port, "/api/v1/hub/keys", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(served.logs())
                time.sleep(0.2)
    finally:
        stop(nginx)
    assert status == 503
    assert headers["content-type"] == "application/problem+json" and headers["retry-after"] == "5"
    assert json.loads(body)["code"] == "unavailable"


def test_healthz_helper_sees_a_timeout_as_no_answer(tmp_path):
    """The probe above cannot pass by mistake: a server that accepts and never answers is no answer."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        started = time.monotonic()
        assert healthz_answers(silent.getsockname()[1]) is None
        assert time.monotonic() - started < PROBE_SECONDS + 0.5
