"""The fault campaign's machinery, shared by ``tests/faults`` (small and bounded, in CI) and
``bench/faults.py`` (the same campaign at any scale, by hand). ``docs/reliability.md`` tells the story.

Everything a fault touches is private to the campaign: a PostgreSQL cluster (``initdb`` into a
temporary directory, a free port; run as the ``postgres`` OS user when the campaign runs as root, since
PostgreSQL refuses root) and a Redis server (``--save ''``, a temporary directory, a free port). The
shared servers of the machine are never stopped, wiped or restarted. The hub runs as it does in
production, as separate processes on those servers: gunicorn serving the real intake, and real
``celery worker`` processes. Events go through the signed HTTP intake, and every figure comes from the
hub's own tables (read with plain SQL) and its own API.

Time is compressed where production waits long (docs/reliability.md says where and by how much): the
inbox lease is seconds instead of five minutes, the sweeper looks at rows seconds old instead of a
minute old and runs every few seconds instead of every thirty, and the outbound retry schedule of hours
is played on a clock advanced by rewriting the stored ``next_attempt_at`` (what the delivery worker
itself reads) while every request still goes over real HTTP to a real receiver.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pwd
import queue
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from institutions import crypto  # noqa: E402 (Django-free: only the signing primitives)

Say = Callable[[str], None]


def say_to_stderr(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


# --- The servers' binaries ---------------------------------------------------------------------------


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (0,)


def postgres_bindir() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``: ``$PG_BINDIR`` if set, else what
    ``pg_config --bindir`` says, else the newest ``/usr/lib/postgresql/<version>/bin`` (Debian keeps the
    server binaries there, off the PATH), else wherever ``initdb`` on the PATH really lives."""
    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(Path(out.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for candidate in candidates:
        if all((candidate / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return candidate
    return None


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


def missing_binaries() -> list[str]:
    """What the campaign cannot start, in words (empty when everything is there)."""
    missing = []
    if postgres_bindir() is None:
        missing.append("PostgreSQL server binaries (initdb, pg_ctl, postgres; apt install postgresql)")
    if redis_server_binary() is None:
        missing.append("redis-server (apt install redis-server)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            missing.append("an OS user 'postgres' to run PostgreSQL as (it refuses to run as root)")
        if shutil.which("runuser") is None:
            missing.append("runuser (util-linux), to run PostgreSQL as the postgres user")
    return missing


# --- A private PostgreSQL ---------------------------------------------------------------------------


class PrivatePostgres:
    """A PostgreSQL cluster of the campaign's own: a temporary directory, 127.0.0.1 and a free port,
    no Unix socket, trust authentication for ``postgres``. ``crash()`` stops it as a power cut would
    (``pg_ctl stop -m immediate``: no shutdown checkpoint, WAL replay at the next start)."""

    def __init__(self, bindir: Path, *, port: int | None = None) -> None:
        self.bindir = bindir
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="hub-faults-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.user: str | None = None
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as its own OS user
            self.user = "postgres"
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.running = False

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def init(self) -> None:
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"
        )

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "-t", "60", "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")
        self.running = False

    def crash(self) -> None:
        self.stop("immediate")

    def url(self, database: str, application_name: str = "") -> str:
        url = f"postgres://postgres@127.0.0.1:{self.port}/{database}"
        return f"{url}?application_name={application_name}" if application_name else url

    def connect(self, database: str = "postgres") -> Any:
        import psycopg

        return psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname={database}", autocommit=True, connect_timeout=5
        )

    def execute(self, sql: str, database: str = "postgres") -> None:
        with self.connect(database) as conn:
            conn.execute(sql)

    def create_database(self, name: str, *, template: str | None = None) -> None:
        _check_identifier(name)
        if template is not None:
            _check_identifier(template)
        self.execute(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.running:
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def _check_identifier(name: str) -> None:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"{name!r} is not a plain lower-case identifier")


# --- A private Redis --------------------------------------------------------------------------------


class PrivateRedis:
    """A Redis server of the campaign's own: no persistence, a temporary directory and a free port.
    ``stop()`` ends it without saving, so a ``start()`` on the same port comes back empty."""

    def __init__(self, *, port: int | None = None) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="hub-faults-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=2, socket_timeout=5)

    def start(self) -> None:
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        command += ["--dir", str(self.root), "--logfile", str(self.root / "redis.log")]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_until(self._answers, timeout=20):
            raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except Exception:
            return False

    def flushall(self) -> None:
        self.client().flushall()

    def stop(self) -> None:
        """Gone at once, nothing saved (SIGKILL: as a crashed or rebooted cache host)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=20)
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


# --- The hub as processes ---------------------------------------------------------------------------


@dataclass
class Issued:
    """An institution's credentials as ``institution_register`` prints them."""

    code: str
    hmac_secret: str
    api_token: str

    @property
    def secret_bytes(self) -> bytes:
        return crypto.hmac_secret_bytes(self.hmac_secret)


@dataclass
class HubSettings:
    """The hub's reliability knobs as the campaign sets them (production values in comments)."""

    lease_seconds: int = 5  # HUB_INBOX_LEASE_SECONDS, production 300
    sweep_after_seconds: int = 2  # HUB_INBOX_SWEEP_AFTER_SECONDS, production 60
    inbox_batch: int = 200  # HUB_INBOX_BATCH_SIZE, production 500
    max_attempts: int = 5  # HUB_INBOX_MAX_ATTEMPTS, production 5
    web_workers: int = 1
    web_threads: int = 4


class Worker:
    """One ``celery worker`` process (with its pool children, in a process group of its own)."""

    def __init__(self, name: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log
        self.started_at = datetime.now(UTC)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.alive():
            self.signal(signal.SIGCONT)  # a stopped worker could not act on SIGTERM
            self.signal(signal.SIGTERM)  # a warm shutdown: the pool's children end with it
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class Hub:
    """The hub on a database and a Redis of the campaign's: migrations, operator commands, gunicorn
    and Celery workers as subprocesses, and a small Celery client to send the beat's tasks."""

    def __init__(
        self,
        postgres: PrivatePostgres,
        database: str,
        redis: PrivateRedis,
        work: Path,
        *,
        settings: HubSettings | None = None,
    ) -> None:
        from cryptography.fernet import Fernet

        self.postgres = postgres
        self.database = database
        self.redis = redis
        self.work = work
        self.settings = settings or HubSettings()
        work.mkdir(parents=True, exist_ok=True)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("HUB_", "DJANGO_", "CLEARINGHOUSE_"))},
            "DJANGO_SETTINGS_MODULE": "clearinghouse.settings",
            "DATABASE_URL": postgres.url(database),
            "REDIS_URL": redis.url(0),
            "DJANGO_DEBUG": "0",
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(48),
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
            "DJANGO_SECURE_SSL_REDIRECT": "0",  # the campaign speaks plain HTTP to gunicorn, with no proxy
            "HUB_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
            "HUB_SUBJECT_KEY": secrets.token_urlsafe(32),
            "HUB_ALLOW_PRIVATE_ENDPOINTS": "1",  # the campaign's receiver listens on loopback
            "CLEARINGHOUSE_VAR_DIR": str(work / "var"),
            "CLEARINGHOUSE_TASKS_EAGER": "0",
            "HUB_INBOX_LEASE_SECONDS": str(self.settings.lease_seconds),
            "HUB_INBOX_SWEEP_AFTER_SECONDS": str(self.settings.sweep_after_seconds),
            "HUB_INBOX_BATCH_SIZE": str(self.settings.inbox_batch),
            "HUB_INBOX_MAX_ATTEMPTS": str(self.settings.max_attempts),
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
        self.port = 0
        self.web: subprocess.Popen[bytes] | None = None
        self.workers: list[Worker] = []
        self._client_app: Any = None
        self._db: Any = None

    # --- processes

    def _env(self, application_name: str) -> dict[str, str]:
        return {**self.env, "DATABASE_URL": self.postgres.url(self.database, application_name)}

    def manage(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            env=self._env("manage"),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"manage.py {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return result

    def migrate(self) -> None:
        self.manage("migrate", "--noinput", "-v", "0")

    def register(self, code: str, *, provider: bool = False, endpoint: str = "") -> Issued:
        args = ["institution_register", code, "--name", code.replace("-", " ").title(), "--hmac"]
        if provider:
            args.append("--provider")
        if endpoint:
            args += ["--endpoint", endpoint]
        printed = json.loads(self.manage(*args).stdout)
        return Issued(code=printed["code"], hmac_secret=printed["hmac_secret"], api_token=printed["api_token"])

    def start_web(self) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "gunicorn", "clearinghouse.wsgi:application"]
        command += ["--bind", f"127.0.0.1:{self.port}", "--workers", str(self.settings.web_workers)]
        command += ["--worker-class", "gthread", "--threads", str(self.settings.web_threads)]
        command += ["--keep-alive", "30", "--log-level", "warning", "--graceful-timeout", "5"]
        with (self.work / "gunicorn.log").open("ab") as log:
            self.web = subprocess.Popen(
                command, env=self._env("web"), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        if not wait_until(self._web_ready, timeout=60, interval=0.2):
            raise RuntimeError(f"gunicorn did not become ready:\n{self.web_log_tail()}")

    def _web_ready(self) -> bool:
        if self.web is not None and self.web.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {self.web.returncode}:\n{self.web_log_tail()}")
        try:
            status, _, _ = self.call("GET", "/readyz", timeout=2)
        except OSError:
            return False
        return status == 200

    def web_log_tail(self, chars: int = 3000) -> str:
        try:
            return (self.work / "gunicorn.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def start_worker(self, name: str, *, queues: str = "intake", pool: str = "solo", concurrency: int = 1) -> Worker:
        log = self.work / f"{name}.log"
        command = [sys.executable, "-m", "celery", "-A", "clearinghouse", "worker", "-Q", queues]
        command += ["--pool", pool, "--concurrency", str(concurrency), "--loglevel", "WARNING"]
        command += ["--hostname", f"{name}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat"]
        with log.open("ab") as out:
            process = subprocess.Popen(
                command, env=self._env(name), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        worker = Worker(name, process, log)
        self.workers.append(worker)
        return worker

    def worker_ready(self, worker: Worker, timeout: float = 60) -> bool:
        """Wait until a worker consumes from the broker (a client of Redis blocked in ``BRPOP``); False if
        ``worker`` died or none did within ``timeout``."""
        return wait_until(lambda: not worker.alive() or self._consumers() > 0, timeout, interval=0.2) and worker.alive()

    def _consumers(self) -> int:
        try:
            clients = self.redis.client().client_list()
        except Exception:
            return 0
        return sum(1 for c in clients if "BRPOP" in str(c.get("cmd", "")).upper())

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        if self.web is not None and self.web.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.web.pid, signal.SIGTERM)
            try:
                self.web.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.web.pid, signal.SIGKILL)
                self.web.wait(timeout=20)
        if self._db is not None:
            with contextlib.suppress(Exception):
                self._db.close()
        if self._client_app is not None:
            with contextlib.suppress(Exception):
                self._client_app.close()

    # --- the beat's tasks, sent as beat sends them

    def send_task(self, name: str, *, queue_name: str) -> bool:
        """Publish task ``name`` on ``queue_name`` of the hub's broker; False when the broker is down."""
        from celery import Celery

        if self._client_app is None:
            app = Celery("campaign", broker=self.redis.url(0), set_as_current=False)
            app.conf.update(
                task_serializer="json",
                accept_content=["json"],
                broker_connection_timeout=2,
                broker_transport_options={"socket_connect_timeout": 2, "socket_timeout": 5},
                task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2},
            )
            self._client_app = app
        try:
            self._client_app.send_task(name, queue=queue_name)
            return True
        except Exception:
            return False

    def sweep(self) -> bool:
        """What beat does every 30 s: ``inbox_sweep`` enqueues a drain when rows wait past the threshold."""
        return self.send_task("institutions.tasks.inbox_sweep", queue_name="intake")

    def deliveries_due(self) -> bool:
        """What beat does every 5 s: ``deliveries_send_due`` sends what is due."""
        return self.send_task("institutions.tasks.deliveries_send_due", queue_name="delivery")

    # --- reading the hub's tables

    def db(self) -> Any:
        """A connection to the hub's database (reopened after a restart)."""
        if self._db is not None and not self._db.closed and not self._db.broken:
            return self._db
        self._db = self.postgres.connect(self.database)
        return self._db

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        for attempt in (1, 2):
            try:
                return list(self.db().execute(sql, params).fetchall())
            except Exception:
                if attempt == 2:
                    raise
                self._db = None
        raise AssertionError("unreachable")

    def scalar(self, sql: str, params: Any = None) -> Any:
        return self.query(sql, params)[0][0]

    # --- HTTP

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> tuple[int, dict[str, str], Any]:
        """One request to the hub; (status, lower-cased headers, JSON body or None)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            sent = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            raw = response.read()
            answered = {k.lower(): v for k, v in response.getheaders()}
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = raw.decode(errors="replace")
            return response.status, answered, parsed
        finally:
            conn.close()

    def push(self, issued: Issued, events: list[dict[str, Any]], *, msg_id: str | None = None) -> tuple[int, Any]:
        """POST signed events once (no retry); (status, body)."""
        body = json.dumps(events, separators=(",", ":")).encode()
        headers = crypto.webhook_headers(
            body,
            msg_id=msg_id or f"msg_{uuid.uuid4().hex}",
            timestamp=int(time.time()),
            hmac_secrets=[issued.secret_bytes],
        )
        headers["Content-Type"] = "application/cloudevents-batch+json"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("POST", f"/api/v1/institutions/{issued.code}/events", body=body, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
        finally:
            conn.close()


# --- The people and events of a scenario ---------------------------------------------------------


def metro_grams(hub: Hub) -> Decimal:
    """Grams CO2e per km of ``transit.metro`` as the hub publishes its standard (``/standard/scenarios``)."""
    status, _, body = hub.call("GET", "/api/v1/standard/scenarios")
    assert status == 200, (status, body)
    for scenario in body["scenarios"]:
        if scenario["code"] == "transit.metro":
            return Decimal(scenario["factor"]["grams_per_unit"])
    raise AssertionError("transit.metro is not in the published standard")


def expected_mg(quantity: str, grams_per_unit: Decimal) -> int:
    """Milligrams a metro ride of ``quantity`` km credits under the standard (1 point = 1 g)."""
    return int((Decimal(quantity) * grams_per_unit * 1000).quantize(Decimal(1), ROUND_HALF_EVEN))


def activity(event_id: str, subject: str, quantity: str, when: datetime) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "/campaign/app",
        "type": "carbon.activity.recorded",
        "subject": subject,
        "time": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": {"action": "transit.metro", "quantity": quantity, "unit": "km"},
    }


@dataclass
class Person:
    username: str
    token: str


def person_signup(hub: Hub, username: str) -> Person:
    status, _, body = hub.call(
        "POST", "/api/v1/auth/signup", {"username": username, "password": secrets.token_urlsafe(16)}
    )
    assert status == 201, (status, body)
    return Person(username, body["token"])


def person_link(hub: Hub, person: Person, issued: Issued, subject: str, *, timeout: float = 60) -> None:
    """Link ``subject`` of ``issued`` to ``person`` as the contract does it: the person makes a code, the
    institution sends ``carbon.account.linked`` with it; waits until a worker handled it."""
    status, _, body = hub.call("POST", "/api/v1/me/link-codes", {}, headers={"Authorization": f"Token {person.token}"})
    assert status == 201, (status, body)
    event_id = f"link-{uuid.uuid4().hex[:12]}"
    event = {
        "specversion": "1.0",
        "id": event_id,
        "source": "/campaign/app",
        "type": "carbon.account.linked",
        "subject": subject,
        "data": {"link_code": body["code"]},
    }
    status, answer = hub.push(issued, [event])
    assert status == 202, (status, answer)

    def status_now() -> str | None:
        code, _, followed = hub.call(
            "GET",
            f"/api/v1/institutions/{issued.code}/events/{event_id}",
            headers={"Authorization": f"Bearer {issued.api_token}"},
        )
        return followed["status"] if code == 200 else None

    assert wait_until(lambda: status_now() not in (None, "received"), timeout, interval=0.2), "link not handled"
    assert status_now() == "processed"


def wallet_points(hub: Hub, person: Person) -> int:
    status, _, body = hub.call("GET", "/api/v1/me/wallet", headers={"Authorization": f"Token {person.token}"})
    assert status == 200, (status, body)
    return int(body["points"])


# --- A stream of signed events ----------------------------------------------------------------------


@dataclass
class Batch:
    msg_id: str
    events: list[dict[str, Any]]
    due: float  # seconds after the stream's start
    answer: dict[str, str] = field(default_factory=dict)  # event id -> final per-event status
    attempts: int = 0
    first_sent: float = 0.0


@dataclass
class StreamTally:
    """What the sender saw: every HTTP answer, and what became of each event."""

    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    unavailable: int = 0  # 503 answers
    unavailable_without_retry_after: int = 0
    unavailable_not_problem: int = 0  # 503 without a problem+json body of code "unavailable"
    retry_after_values: Counter[str] = field(default_factory=Counter)
    connection_errors: int = 0
    event_statuses: Counter[str] = field(default_factory=Counter)  # final per-event status
    unexpected: list[str] = field(default_factory=list)  # anything but 202 / 503, first few
    first_503: float | None = None
    last_503: float | None = None
    gave_up: int = 0  # batches never acknowledged before the deadline


class EventStream:
    """Streams ``count`` metro rides of one institution through the signed intake, at ``rate`` events
    a second in batches of ``batch``, from ``senders`` threads, as a careful institution sends:

    * the ``webhook-id`` of a batch is stable across its retries; each attempt is signed afresh;
    * a ``503`` is retried after its ``Retry-After`` (plus jitter), a connection error after a moment;
    * anything else (a ``500``, a ``429``) is recorded as unexpected and retried too, so one bad answer
      does not hide what happens to the rest.

    An event is acknowledged when a ``202`` answered it ``accepted`` or ``duplicate`` (a retry of a
    request whose answer was lost finds its events stored). ``expected`` maps each event id to the
    milligrams the standard credits for it.
    """

    def __init__(
        self,
        hub: Hub,
        issued: Issued,
        *,
        prefix: str,
        count: int,
        rate: float,
        batch: int = 20,
        senders: int = 4,
        subjects: int = 50,
        grams_per_unit: Decimal,
        give_up_after: float = 180.0,
        retry_after_cap: float = 10.0,
    ) -> None:
        self.hub = hub
        self.issued = issued
        self.senders = senders
        self.give_up_after = give_up_after
        self.retry_after_cap = retry_after_cap
        when = datetime.now(UTC) - timedelta(hours=1)
        self.expected: dict[str, int] = {}
        self.subject_of: dict[str, str] = {}
        self.batches: list[Batch] = []
        for start in range(0, count, batch):
            events = []
            for n in range(start, min(start + batch, count)):
                event_id, subject, quantity = f"{prefix}-{n}", f"cust-{n % subjects}", f"{1 + n % 40}.{n % 10}"
                events.append(activity(event_id, subject, quantity, when))
                self.expected[event_id] = expected_mg(quantity, grams_per_unit)
                self.subject_of[event_id] = subject
            self.batches.append(Batch(f"msg_{prefix}_{start}", events, due=start / rate))
        self.tally = StreamTally()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.started = 0.0
        self.finished = 0.0
        self.sent_events = 0

    @property
    def count(self) -> int:
        return len(self.expected)

    @property
    def duration(self) -> float:
        return self.batches[-1].due if self.batches else 0.0

    def start(self) -> None:
        work: queue.Queue[Batch | None] = queue.Queue()
        for b in self.batches:
            work.put(b)
        for _ in range(self.senders):
            work.put(None)
        self.started = time.monotonic()
        self._threads = [
            threading.Thread(target=self._send_from, args=(work,), daemon=True) for _ in range(self.senders)
        ]
        for thread in self._threads:
            thread.start()

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            raise TimeoutError("the stream's senders are still running")
        self.finished = time.monotonic()

    def done(self) -> bool:
        """Whether every batch was answered (or given up)."""
        return bool(self._threads) and not any(t.is_alive() for t in self._threads)

    def progress(self) -> float:
        """The share of the stream's events sent at least once."""
        with self._lock:
            return self.sent_events / max(1, self.count)

    def acknowledged(self) -> set[str]:
        return {e for b in self.batches for e, s in b.answer.items() if s in ("accepted", "duplicate")}

    def _send_from(self, work: queue.Queue[Batch | None]) -> None:
        conn: http.client.HTTPConnection | None = None
        while (b := work.get()) is not None:
            delay = self.started + b.due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            conn = self._deliver(b, conn)
        if conn is not None:
            conn.close()

    def _deliver(self, b: Batch, conn: http.client.HTTPConnection | None) -> http.client.HTTPConnection | None:
        body = json.dumps(b.events, separators=(",", ":")).encode()
        path = f"/api/v1/institutions/{self.issued.code}/events"
        b.first_sent = time.monotonic()
        with self._lock:
            self.sent_events += len(b.events)
        deadline = b.first_sent + self.give_up_after
        while time.monotonic() < deadline:
            b.attempts += 1
            headers = crypto.webhook_headers(
                body, msg_id=b.msg_id, timestamp=int(time.time()), hmac_secrets=[self.issued.secret_bytes]
            )
            headers["Content-Type"] = "application/cloudevents-batch+json"
            reused = conn is not None
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.hub.port, timeout=30)
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                raw = response.read()
                status = response.status
                answered = {k.lower(): v for k, v in response.getheaders()}
            except (OSError, http.client.HTTPException) as exc:
                if conn is not None:
                    conn.close()
                conn = None
                if reused and isinstance(exc, http.client.RemoteDisconnected | BrokenPipeError | ConnectionResetError):
                    b.attempts -= 1  # a kept-alive connection the server had closed: not an attempt
                    continue
                with self._lock:
                    self.tally.connection_errors += 1
                time.sleep(0.5 + random.random() * 0.5)
                continue
            with self._lock:
                self.tally.requests += 1
                self.tally.statuses[status] += 1
            if status == 202:
                for result in json.loads(raw)["results"]:
                    b.answer[result["id"]] = result["status"]
                with self._lock:
                    self.tally.event_statuses.update(b.answer.values())
                    bad = [f"{e}: {s}" for e, s in b.answer.items() if s not in ("accepted", "duplicate")]
                    self.tally.unexpected.extend(bad[:5])
                return conn
            wait = 0.5 + random.random() * 0.5
            if status == 503:
                retry_after = answered.get("retry-after")
                problem_code = None
                with contextlib.suppress(ValueError, AttributeError, TypeError):
                    problem_code = json.loads(raw).get("code")
                now = time.monotonic()
                with self._lock:
                    self.tally.unavailable += 1
                    self.tally.retry_after_values[str(retry_after)] += 1
                    if retry_after is None:
                        self.tally.unavailable_without_retry_after += 1
                    if problem_code != "unavailable" or "problem+json" not in answered.get("content-type", ""):
                        self.tally.unavailable_not_problem += 1
                    self.tally.first_503 = now if self.tally.first_503 is None else self.tally.first_503
                    self.tally.last_503 = now
                if retry_after is not None and retry_after.isdigit():
                    wait = min(float(retry_after), self.retry_after_cap) + random.random() * 0.5
            else:
                with self._lock:
                    if len(self.tally.unexpected) < 20:
                        self.tally.unexpected.append(f"HTTP {status}: {raw[:300]!r}")
            time.sleep(wait)
        with self._lock:
            self.tally.gave_up += 1
        return conn


# --- What the hub did with the events ---------------------------------------------------------------


@dataclass
class CreditCheck:
    """Every acknowledged event against the hub's books, as figures (each problem list empty when right)."""

    acknowledged: int = 0
    inbox_rows: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    credited_once: int = 0
    lost: list[str] = field(default_factory=list)  # acknowledged, and no row or never finished
    dead: list[str] = field(default_factory=list)  # acknowledged, parked after every attempt (replayable)
    doubled: list[str] = field(default_factory=list)  # more than one activity or credit transfer
    wrong_amount: list[str] = field(default_factory=list)
    unacknowledged_stored: int = 0  # rows the sender was never told about (none expected)
    other_transfers: int = 0  # transfers that belong to no acknowledged event
    redelivered: int = 0  # rows claimed more than once (a worker lost mid-batch, a failed batch)
    max_attempts: int = 0
    expected_total_mg: int = 0
    lots_total_mg: int = 0
    issuer_outstanding_mg: int = 0
    expected_wallet_mg: int = 0
    wallet_mg: int = 0
    wallet_points_api: int | None = None
    ledger_verify: str = ""

    @property
    def problems(self) -> list[str]:
        out = []
        if self.lost:
            out.append(f"{len(self.lost)} acknowledged events lost (first: {self.lost[:5]})")
        if self.dead:
            out.append(f"{len(self.dead)} acknowledged events dead, not credited (first: {self.dead[:5]})")
        if self.doubled:
            out.append(f"{len(self.doubled)} events credited more than once (first: {self.doubled[:5]})")
        if self.wrong_amount:
            out.append(f"{len(self.wrong_amount)} events credited a wrong amount (first: {self.wrong_amount[:5]})")
        if self.unacknowledged_stored:
            out.append(f"{self.unacknowledged_stored} stored events the sender was never acknowledged")
        if self.other_transfers:
            out.append(f"{self.other_transfers} transfers of no acknowledged event")
        if self.lots_total_mg != self.expected_total_mg:
            out.append(f"lots hold {self.lots_total_mg} mg, expected {self.expected_total_mg}")
        if self.issuer_outstanding_mg != -self.expected_total_mg:
            out.append(f"issuer outstanding {self.issuer_outstanding_mg} mg, expected {-self.expected_total_mg}")
        if self.wallet_mg != self.expected_wallet_mg:
            out.append(f"the linked person's wallet holds {self.wallet_mg} mg, expected {self.expected_wallet_mg}")
        if self.wallet_points_api is not None and self.wallet_points_api != self.expected_wallet_mg // 1000:
            out.append(
                f"GET /me/wallet says {self.wallet_points_api} points, expected {self.expected_wallet_mg // 1000}"
            )
        if not self.ledger_verify.startswith("ok"):
            out.append(f"ledger_verify: {self.ledger_verify}")
        return out


def credits_check(hub: Hub, stream: EventStream, *, person: Person | None, linked_subject: str | None) -> CreditCheck:
    """Compare what the sender was told with the hub's inbox, activities, transfers and balances."""
    check = CreditCheck()
    acknowledged = stream.acknowledged()
    check.acknowledged = len(acknowledged)
    rows = hub.query(
        """
        SELECT e.event_id, e.status, e.attempts,
               (SELECT count(*) FROM methodology_normalizedactivity a WHERE a.inbox_event_id = e.id),
               (SELECT count(*) FROM ledger_transfer t WHERE t.idempotency_key = 'activity:' || e.id),
               (SELECT coalesce(sum(p.amount), 0) FROM ledger_transfer t
                  JOIN ledger_posting p ON p.transfer_id = t.id JOIN ledger_account ac ON ac.id = p.account_id
                 WHERE t.idempotency_key = 'activity:' || e.id AND ac.kind IN ('holding_lot', 'wallet_lot'))
          FROM institutions_inboxevent e JOIN institutions_institution i ON i.id = e.institution_id
         WHERE i.code = %s AND e.type = 'carbon.activity.recorded'
        """,
        [stream.issued.code],
    )
    check.inbox_rows = len(rows)
    check.statuses = dict(Counter(status for _, status, *_ in rows))
    seen: dict[str, tuple[Any, ...]] = {row[0]: row[1:] for row in rows}
    for event_id in sorted(acknowledged):
        row = seen.get(event_id)
        if row is not None and row[0] == "dead":
            check.dead.append(f"{event_id} (after {row[1]} claims)")
            continue
        if row is None or row[0] != "processed":
            check.lost.append(f"{event_id} ({'no inbox row' if row is None else row[0]})")
            continue
        _, _, activities, transfers, into_lots = row
        if activities != 1 or transfers != 1:
            check.doubled.append(f"{event_id} ({activities} activities, {transfers} transfers)")
            continue
        if into_lots != stream.expected[event_id]:
            check.wrong_amount.append(f"{event_id} ({into_lots} mg, expected {stream.expected[event_id]})")
            continue
        check.credited_once += 1
    check.unacknowledged_stored = len(set(seen) - acknowledged)
    check.redelivered = sum(1 for row in seen.values() if row[1] > 1)
    check.max_attempts = max((row[1] for row in seen.values()), default=0)
    check.expected_total_mg = sum(stream.expected[e] for e in acknowledged)
    keys = hub.scalar("SELECT count(*) FROM ledger_transfer")
    check.other_transfers = int(keys) - sum(row[3] for e, row in seen.items() if e in acknowledged)
    check.lots_total_mg = int(
        hub.scalar("SELECT coalesce(sum(balance), 0) FROM ledger_account WHERE kind IN ('holding_lot', 'wallet_lot')")
    )
    check.issuer_outstanding_mg = int(
        hub.scalar("SELECT coalesce(sum(balance), 0) FROM ledger_account WHERE kind = 'issuer_outstanding'")
    )
    if linked_subject is not None:
        check.expected_wallet_mg = sum(
            stream.expected[e] for e in acknowledged if stream.subject_of[e] == linked_subject
        )
    check.wallet_mg = int(
        hub.scalar("SELECT coalesce(sum(balance), 0) FROM ledger_account WHERE kind = 'wallet_lot' AND balance > 0")
    )
    if person is not None:
        check.wallet_points_api = wallet_points(hub, person)
    verified = hub.manage("ledger_verify", check=False)
    last = (verified.stdout.strip().splitlines() or [""])[-1]
    check.ledger_verify = (
        f"ok ({last})" if verified.returncode == 0 else f"exit {verified.returncode}: {verified.stdout[-500:]}"
    )
    return check


def inbox_waiting(hub: Hub, code: str) -> int:
    return int(
        hub.scalar(
            "SELECT count(*) FROM institutions_inboxevent e JOIN institutions_institution i ON i.id = e.institution_id "
            "WHERE i.code = %s AND e.status = 'received'",
            [code],
        )
    )


def drain(hub: Hub, code: str, *, timeout: float, sweep_every: float = 2.0, say: Say = say_to_stderr) -> float | None:
    """Wait until no event of ``code`` is left ``received``, running the sweeper every ``sweep_every``
    seconds as beat would; the seconds it took, or None on timeout."""
    started = time.monotonic()
    deadline = started + timeout
    next_sweep = started
    last_said = started
    while time.monotonic() < deadline:
        waiting = inbox_waiting(hub, code)
        if waiting == 0:
            return time.monotonic() - started
        now = time.monotonic()
        if now >= next_sweep:
            hub.sweep()
            next_sweep = now + sweep_every
        if now - last_said >= 5:
            say(f"  draining: {waiting} events waiting")
            last_said = now
        time.sleep(0.1)
    return None


# --- The faults -------------------------------------------------------------------------------------


@dataclass
class FaultReport:
    """One fault's figures; ``problems`` is empty when the hub kept its promises."""

    fault: str
    events: int = 0
    figures: dict[str, Any] = field(default_factory=dict)
    tally: dict[str, Any] = field(default_factory=dict)
    check: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def template_prepare(postgres: PrivatePostgres, name: str, work: Path, *, say: Say = say_to_stderr) -> None:
    """Create database ``name`` and migrate it once; each scene's database is a copy (``TEMPLATE``),
    which takes a second where migrating takes several."""
    postgres.create_database(name)
    redis = PrivateRedis()  # the settings want one; migrating does not use it
    redis.start()
    try:
        Hub(postgres, name, redis, work / "template").migrate()
    finally:
        redis.close()


@dataclass
class Scene:
    """A hub on a fresh database and a fresh Redis, with one issuing institution and one person linked
    to its subject ``cust-0``."""

    hub: Hub
    redis: PrivateRedis
    bank: Issued
    person: Person
    grams: Decimal
    linked_subject: str = "cust-0"


@contextlib.contextmanager
def scene(
    postgres: PrivatePostgres,
    template: str,
    work: Path,
    name: str,
    *,
    settings: HubSettings | None = None,
    say: Say = say_to_stderr,
) -> Iterator[Scene]:
    """Create the database ``name`` from ``template`` (migrated), start a Redis, the web server and one
    intake worker, register a bank and link a person; stop everything afterwards."""
    database = f"hub_{name}_{uuid.uuid4().hex[:6]}"
    postgres.create_database(database, template=template)
    redis = PrivateRedis()
    redis.start()
    hub = Hub(postgres, database, redis, work / name, settings=settings)
    try:
        hub.start_web()
        bank = hub.register(f"bank-{name.replace('_', '-')}")
        setup_worker = hub.start_worker(f"{name}-setup")
        person = person_signup(hub, f"commuter-{name}")
        person_link(hub, person, bank, "cust-0")
        setup_worker.stop()
        hub.workers.remove(setup_worker)
        yield Scene(hub=hub, redis=redis, bank=bank, person=person, grams=metro_grams(hub))
    finally:
        hub.stop()
        redis.close()
        with contextlib.suppress(Exception):
            if postgres.running:
                postgres.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def _finish(report: FaultReport, scene_: Scene, stream: EventStream, started: float) -> None:
    check = credits_check(scene_.hub, stream, person=scene_.person, linked_subject=scene_.linked_subject)
    report.events = stream.count
    report.tally = {
        "requests": stream.tally.requests,
        "statuses": {str(k): v for k, v in sorted(stream.tally.statuses.items())},
        "unavailable_503": stream.tally.unavailable,
        "unavailable_without_retry_after": stream.tally.unavailable_without_retry_after,
        "unavailable_not_problem_json": stream.tally.unavailable_not_problem,
        "retry_after_values": dict(stream.tally.retry_after_values),
        "connection_errors": stream.tally.connection_errors,
        "event_statuses": dict(stream.tally.event_statuses),
        "unexpected": stream.tally.unexpected[:10],
        "gave_up": stream.tally.gave_up,
        "batches_retried": sum(1 for b in stream.batches if b.attempts > 1),
    }
    report.check = asdict(check) | {"lost": check.lost[:20], "dead": check.dead[:20], "doubled": check.doubled[:20]}
    report.problems += check.problems
    if check.acknowledged != stream.count:
        report.problems.append(f"only {check.acknowledged} of {stream.count} events were ever acknowledged")
    if stream.tally.unexpected:
        report.problems.append(f"unexpected answers: {stream.tally.unexpected[:5]}")
    report.seconds = round(time.monotonic() - started, 1)


def _stream(scene_: Scene, prefix: str, count: int, rate: float, batch: int) -> EventStream:
    return EventStream(
        scene_.hub, scene_.bank, prefix=prefix, count=count, rate=rate, batch=batch, grams_per_unit=scene_.grams
    )


def leased_since(hub: Hub, since: datetime) -> tuple[int, int]:
    """Rows claimed after ``since`` and not finished (their lease, ``available_at``, was set by a claim
    made after that moment and they are still ``received``): how many, and the most claims among them."""
    count, most = hub.query(
        "SELECT count(*), coalesce(max(attempts), 0) FROM institutions_inboxevent "
        "WHERE status = 'received' AND attempts > 0 AND available_at > %s",
        [since + timedelta(seconds=hub.settings.lease_seconds)],
    )[0]
    return int(count), int(most)


def kill_mid_batch(hub: Hub, worker: Worker, *, timeout: float) -> int | None:
    """SIGKILL ``worker`` (its whole process group) while it holds a claimed, unfinished batch; returns
    how many rows that batch held, or None (the worker left running) if none was caught in ``timeout``.

    The worker is frozen (SIGSTOP) and looked at: if rows it claimed are still unfinished, it dies
    frozen, inside its batch; if not, it is thawed and looked at again a moment later. A frozen worker
    makes no progress, so what is seen is what the kill interrupts.

    A kill never takes a row's last attempt: the claim counts attempts to park a row that kills every
    worker taking it (``dead`` after ``HUB_INBOX_MAX_ATTEMPTS``, tests/institutions cover that rule),
    and a campaign that aimed every kill at the same rows would test that rule, not recovery. Real
    crashes do not pick their rows; after a restart the rows of the killed batch come first, so without
    this a kill every few seconds would keep landing on them.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not worker.alive():
            raise RuntimeError(f"worker {worker.name} died on its own:\n{worker.log_tail()}")
        worker.signal(signal.SIGSTOP)
        time.sleep(0.15)  # a statement already sent runs to its end; let it
        in_flight, most_claims = leased_since(hub, worker.started_at)
        if in_flight and most_claims < hub.settings.max_attempts:
            worker.kill()
            return in_flight
        worker.signal(signal.SIGCONT)
        time.sleep(random.uniform(0.02, 0.1))
    return None


def fault_worker_kills(
    scene_: Scene,
    *,
    events: int = 3000,
    rate: float = 200.0,
    batch: int = 20,
    kills: int = 4,
    kill_every: float | None = None,
    pool: str = "solo",
    concurrency: int = 1,
    drain_timeout: float = 120.0,
    say: Say = say_to_stderr,
) -> FaultReport:
    """(a) A worker SIGKILLed repeatedly under load, inside a batch each time, and restarted at once (as
    a supervisor would). By default the kills are spread evenly over the stream. With ``pool="prefork"``
    the kill takes the worker's whole process group, its pool's children with it (a lost host)."""
    started = time.monotonic()
    report = FaultReport("worker SIGKILLed repeatedly under load")
    hub = scene_.hub
    worker = hub.start_worker("kill-1", pool=pool, concurrency=concurrency)
    stream = _stream(scene_, "kill", events, rate, batch)
    spacing = kill_every if kill_every is not None else stream.duration / (kills + 1)
    say(f"(a) streaming {events} events at {rate:.0f}/s; {kills} kills, one every ~{spacing:.1f} s")
    stream.start()
    in_flight: list[int] = []
    recovered = time.monotonic()
    planned = time.monotonic()
    for n in range(1, kills + 1):
        planned += spacing * (random.uniform(0.7, 1.3) if kill_every is not None else 1.0)
        time.sleep(max(0.0, planned - time.monotonic()))
        if stream.done() and inbox_waiting(hub, scene_.bank.code) == 0:
            say(f"  kill {n}: the stream is over and nothing waits; no more kills")
            break
        rows = kill_mid_batch(hub, worker, timeout=max(10.0, spacing * 3))
        if rows is None:
            say(f"  kill {n}: {worker.name} was not caught inside a batch; left running")
            continue
        in_flight.append(rows)
        say(f"  kill {n}: SIGKILL to {worker.name} holding {rows} claimed rows; stream at {stream.progress():.0%}")
        worker = hub.start_worker(f"kill-{n + 1}", pool=pool, concurrency=concurrency)
        recovered = time.monotonic()
    stream.join(timeout=stream.duration + 240)
    say(f"  stream done: {dict(stream.tally.statuses)}; draining")
    drained = drain(hub, scene_.bank.code, timeout=drain_timeout, say=say)
    report.figures = {
        "kills": len(in_flight),
        "rows_in_flight_at_each_kill": in_flight,
        "drain_seconds_after_the_stream": None if drained is None else round(drained, 1),
        "seconds_from_the_last_restart_to_all_credited": None
        if drained is None
        else round(time.monotonic() - recovered, 1),
    }
    if drained is None:
        report.problems.append(f"not drained after {drain_timeout:.0f} s")
    if not worker.alive():
        report.problems.append(f"the last worker died:\n{worker.log_tail()}")
    _finish(report, scene_, stream, started)
    report.figures["rows_claimed_again"] = report.check["redelivered"]
    report.figures["most_claims_of_a_row"] = report.check["max_attempts"]
    return report


def fault_redis_outage(
    scene_: Scene,
    *,
    events: int = 2000,
    rate: float = 200.0,
    batch: int = 20,
    outage_at: float = 0.4,
    outage_seconds: float | None = None,
    observe_seconds: float = 3.0,
    drain_timeout: float = 120.0,
    say: Say = say_to_stderr,
) -> FaultReport:
    """(b) Redis wiped (FLUSHALL), stopped and restarted empty mid-stream. The intake keeps answering
    202 (Redis is not the store); the stream ends while Redis is down, so nothing but the sweeper can
    bring the waiting rows to a worker afterwards."""
    started = time.monotonic()
    report = FaultReport("Redis wiped, stopped and restarted mid-stream")
    hub = scene_.hub
    worker = hub.start_worker("redis-1")
    hub.worker_ready(worker)
    stream = _stream(scene_, "redis", events, rate, batch)
    if outage_seconds is None:  # until a moment after the stream's last request
        outage_seconds = stream.duration * (1 - outage_at) + 2
    say(f"(b) streaming {events} events at {rate:.0f}/s; Redis down at {outage_at:.0%} for {outage_seconds:.0f} s")
    stream.start()
    wait_until(lambda: stream.progress() >= outage_at, timeout=stream.duration + 60)
    scene_.redis.flushall()
    scene_.redis.stop()
    down_at = time.monotonic()
    say(f"  Redis wiped and stopped at {stream.progress():.0%} of the stream")
    time.sleep(outage_seconds)
    scene_.redis.start()
    up_at = time.monotonic()
    say(f"  Redis restarted, empty, after {up_at - down_at:.1f} s; stream at {stream.progress():.0%}")
    stream.join(timeout=stream.duration + 240)
    waiting_at_restart = inbox_waiting(hub, scene_.bank.code)
    time.sleep(observe_seconds)  # no traffic, no sweeper: what the broker lost stays lost
    waiting_unswept = inbox_waiting(hub, scene_.bank.code)
    say(f"  {waiting_unswept} events waiting {observe_seconds:.0f} s after the restart with no sweeper; sweeping")
    drained = drain(hub, scene_.bank.code, timeout=drain_timeout, say=say)
    report.figures = {
        "outage_seconds": round(up_at - down_at, 1),
        "waiting_when_redis_came_back": waiting_at_restart,
        "waiting_without_the_sweeper": waiting_unswept,
        "drain_seconds_after_the_first_sweep": None if drained is None else round(drained, 1),
        "seconds_from_the_restart_to_all_credited": None if drained is None else round(time.monotonic() - up_at, 1),
    }
    if drained is None:
        report.problems.append(f"not drained after {drain_timeout:.0f} s")
    if not worker.alive():
        report.problems.append(f"the worker died:\n{worker.log_tail()}")
    _finish(report, scene_, stream, started)
    non_202 = {k: v for k, v in stream.tally.statuses.items() if k != 202}
    if non_202:
        report.problems.append(f"the intake answered other than 202 while Redis was down: {non_202}")
    return report


def fault_postgres_restart(
    scene_: Scene,
    postgres: PrivatePostgres,
    *,
    events: int = 2000,
    rate: float = 200.0,
    batch: int = 20,
    down_at: float = 0.3,
    down_seconds: float = 5.0,
    drain_timeout: float = 120.0,
    say: Say = say_to_stderr,
) -> FaultReport:
    """(c) PostgreSQL crashed (``-m immediate``) under load, down a while, started again: 503 with
    ``Retry-After`` meanwhile, nothing acknowledged lost, everything drains after."""
    started = time.monotonic()
    report = FaultReport("PostgreSQL crashed and restarted under load")
    hub = scene_.hub
    worker = hub.start_worker("pg-1")
    hub.worker_ready(worker)
    stream = _stream(scene_, "pg", events, rate, batch)
    say(f"(c) streaming {events} events at {rate:.0f}/s; PostgreSQL down at {down_at:.0%} for {down_seconds:.0f} s")
    stream.start()
    wait_until(lambda: stream.progress() >= down_at, timeout=stream.duration + 60)
    acknowledged_before = len(stream.acknowledged())
    postgres.crash()
    crashed = time.monotonic()
    say(f"  PostgreSQL crashed (immediate stop) at {stream.progress():.0%}, {acknowledged_before} events acknowledged")
    time.sleep(down_seconds)
    postgres.start()
    back = time.monotonic()
    say(f"  PostgreSQL up again after {back - crashed:.1f} s (WAL replayed)")
    stream.join(timeout=stream.duration + 240)
    stream_end = time.monotonic()
    drained = drain(hub, scene_.bank.code, timeout=drain_timeout, say=say)
    report.figures = {
        "down_seconds": round(back - crashed, 1),
        "acknowledged_before_the_crash": acknowledged_before,
        "503_answered": stream.tally.unavailable,
        "seconds_from_restart_to_the_last_503": None
        if stream.tally.last_503 is None
        else round(stream.tally.last_503 - back, 1),
        "stream_end_after_restart_seconds": round(stream_end - back, 1),
        "drain_seconds_after_the_stream": None if drained is None else round(drained, 1),
        "seconds_from_the_restart_to_all_credited": None if drained is None else round(time.monotonic() - back, 1),
    }
    if drained is None:
        report.problems.append(f"not drained after {drain_timeout:.0f} s")
    if not worker.alive():
        report.problems.append(f"the worker died:\n{worker.log_tail()}")
    _finish(report, scene_, stream, started)
    tally = stream.tally
    if tally.unavailable_without_retry_after:
        report.problems.append(f"{tally.unavailable_without_retry_after} answers 503 without Retry-After")
    if tally.unavailable_not_problem:
        report.problems.append(f"{tally.unavailable_not_problem} answers 503 not problem+json 'unavailable'")
    return report


# --- Outbound delivery to a flaky endpoint -----------------------------------------------------------

# CONTRACT.md section 3: the delay before each attempt, in seconds.
CONTRACT_SCHEDULE = (0, 5, 5 * 60, 30 * 60, 2 * 3600, 5 * 3600, 10 * 3600, 14 * 3600, 20 * 3600, 24 * 3600)
CONTRACT_JITTER = 0.10


class _Server(ThreadingHTTPServer):
    # The delivery worker sends up to HUB_DELIVERY_CONCURRENCY (32) requests at once; the default
    # listen backlog of 5 would refuse some connections, failures of the receiver and not of the hub.
    request_queue_size = 128


class FlakyEndpoint:
    """An institution's webhook endpoint on loopback that verifies the hub's ``v1a`` signature, applies
    each ``webhook-id`` once (it dedupes, as the contract tells receivers to) and fails a share of
    requests: half of the failures before applying the message, half after (the answer is lost, so the
    hub must resend what the receiver already has). ``down()`` closes the port (connection refused)."""

    def __init__(self, hub_keys: list[bytes], *, failure_rate: float, seed: int = 7) -> None:
        self.port = free_port()
        self.hub_keys = hub_keys
        self.failure_rate = failure_rate
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, bytes]] = []  # (webhook-id, body)
        self.applied: set[str] = set()  # webhook-ids applied: the receiver's dedupe
        self.effects: Counter[str] = Counter()  # redemption id -> times its effect took place (must stay 1)
        self.duplicates_skipped = 0  # requests for a webhook-id already applied
        self.bad_signatures = 0
        self.answers: Counter[int] = Counter()
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def up(self) -> None:
        if self.server is not None:
            return
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                msg_id = self.headers.get("webhook-id", "")
                signed = crypto.verify(
                    msg_id,
                    self.headers.get("webhook-timestamp", ""),
                    body,
                    self.headers.get("webhook-signature", ""),
                    hmac_secrets=[],
                    ed25519_public_keys=endpoint.hub_keys,
                )
                with endpoint.lock:
                    endpoint.requests.append((msg_id, body))
                    roll = endpoint.rng.random()
                    if not signed:
                        endpoint.bad_signatures += 1
                        status = 401
                    elif roll < endpoint.failure_rate / 2:
                        status = 500  # failed before applying
                    else:
                        if msg_id in endpoint.applied:  # dedupe by webhook-id
                            endpoint.duplicates_skipped += 1
                        else:
                            endpoint.applied.add(msg_id)
                            endpoint.effects[json.loads(body)["data"]["redemption_id"]] += 1
                        status = 503 if roll < endpoint.failure_rate else 200  # 503: applied, answer lost
                    endpoint.answers[status] += 1
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        server = _Server(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.server = server

    def down(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class AdvancedClock:
    """The delivery worker's clock, moved forward by rewriting what it reads: ``next_attempt_at`` of
    the messages still to send and ``endpoint_paused_until`` of the institutions. Advancing by Δ is the
    same to the worker as Δ passing (it compares those columns with ``now()``), while every request it
    then makes is real. ``virtual(t)`` maps a real instant to the campaign's clock."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.offset = 0.0
        self.steps: list[tuple[datetime, float]] = []  # (real instant of the step, offset from then on)

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.offset)

    def advance(self, seconds: float) -> None:
        if seconds <= 0:
            return
        delta = timedelta(seconds=seconds)
        self.hub.query(
            "UPDATE institutions_outboxmessage SET next_attempt_at = next_attempt_at - %s "
            "WHERE status IN ('pending', 'failed') RETURNING 1",
            [delta],
        )
        self.hub.query(
            "UPDATE institutions_institution SET endpoint_paused_until = endpoint_paused_until - %s "
            "WHERE endpoint_paused_until IS NOT NULL RETURNING 1",
            [delta],
        )
        self.offset += seconds
        self.steps.append((datetime.now(UTC), self.offset))

    def virtual(self, instant: datetime) -> datetime:
        offset = 0.0
        for at, after in self.steps:
            if at <= instant:
                offset = after
        return instant + timedelta(seconds=offset)


def fault_flaky_endpoint(
    scene_: Scene,
    *,
    messages: int = 60,
    failure_rate: float = 0.4,
    down_minutes: float = 10.0,
    step_share: float = 0.05,
    timeout: float = 240.0,
    say: Say = say_to_stderr,
) -> FaultReport:
    """(d) A provider's endpoint down for minutes, then failing ``failure_rate`` of requests, while the
    hub owes it ``messages`` webhooks (``carbon.redemption.requested``, from real redemptions).

    A delivery worker process sends for real; the clock is advanced from one due moment to the next
    (each step to the earliest ``next_attempt_at`` plus ``step_share`` of the wait, so a message may go
    out that much late, never early). Messages that use up all ten attempts go ``dead`` and are replayed
    as an operator would (same ``webhook-id``). Checks: every message applied exactly once at the
    receiver, always under its own ``webhook-id``; each retry waited what the contract's schedule says.
    """
    started = time.monotonic()
    report = FaultReport(f"an institution's endpoint down for minutes, then failing {failure_rate:.0%} of requests")
    hub = scene_.hub
    intake_worker = hub.start_worker("flaky-intake")
    _, _, keys = hub.call("GET", "/api/v1/hub/keys")
    endpoint = FlakyEndpoint(
        [crypto.public_key_bytes(k["public_key"]) for k in keys["keys"]], failure_rate=failure_rate
    )
    shop = hub.register(f"shop-{uuid.uuid4().hex[:6]}", provider=True, endpoint=endpoint.url)
    reward = f"ride-{uuid.uuid4().hex[:6]}"
    hub.manage("reward_create", shop.code, reward, "--title", "A ride", "--points", "100")
    # Points for the redemptions: metro rides of the linked subject, through the intake.
    rides = [
        activity(f"ride-{n}", scene_.linked_subject, "30", datetime.now(UTC) - timedelta(hours=1)) for n in range(40)
    ]
    status, answer = hub.push(scene_.bank, rides)
    assert status == 202, (status, answer)
    drain(hub, scene_.bank.code, timeout=60, say=say)
    assert wallet_points(hub, scene_.person) >= messages * 100, "not enough points for the redemptions"
    intake_worker.stop()

    # The endpoint is down from the start; the first attempt (immediately) is refused.
    clock = AdvancedClock(hub)
    down_until = clock.now() + timedelta(minutes=down_minutes)
    delivery_worker = hub.start_worker("delivery-1", queues="delivery")
    hub.worker_ready(delivery_worker)
    redemptions: list[str] = []
    auth = {"Authorization": f"Token {scene_.person.token}"}
    for n in range(messages):
        code, _, body = hub.call(
            "POST",
            "/api/v1/me/redemptions",
            {"reward": reward, "quantity": 1},
            headers={**auth, "Idempotency-Key": f"r{n}"},
        )
        assert code == 201, (code, body)
        redemptions.append(body["id"])
    say(
        f"(d) {messages} redemptions held; {shop.code}'s endpoint down for {down_minutes:.0f} min, "
        f"then failing {failure_rate:.0%}"
    )

    def outbox(sql: str) -> int:
        return int(hub.scalar(sql, [shop.code]))

    shop_rows = (
        "FROM institutions_outboxmessage m JOIN institutions_institution i ON i.id = m.institution_id WHERE i.code = %s"
    )
    due = f"SELECT count(*) {shop_rows} AND m.status IN ('pending', 'failed') AND m.next_attempt_at <= now()"
    open_ = f"SELECT count(*) {shop_rows} AND m.status IN ('pending', 'failed')"
    recorded_before_replay: Counter[int] = Counter()  # message id -> attempts on record when replayed

    def leased() -> int:
        """Messages claimed whose attempt is not on record yet (being sent): the claim counts the attempt
        before sending, the record is written after (a replay restarts the count)."""
        recorded = "(SELECT count(*) FROM institutions_deliveryattempt a WHERE a.message_id = m.id)"
        rows = hub.query(f"SELECT m.id, m.attempts, {recorded} {shop_rows}", [shop.code])
        return sum(1 for pk, attempts, on_record in rows if attempts > on_record - recorded_before_replay[pk])

    def settle(within: float = 60.0) -> bool:
        """Let the worker send everything due now (beat's task sent again while rows stay due) and
        record it: nothing due, nothing being sent."""
        deadline = time.monotonic() + within
        published = 0.0
        while time.monotonic() < deadline:
            leased_now, due_now = leased(), outbox(due)
            if not leased_now and not due_now:
                return True
            if due_now and not leased_now and time.monotonic() - published > 1.0:
                hub.deliveries_due()
                published = time.monotonic()
            time.sleep(0.05)
        return False

    deadline = time.monotonic() + timeout
    steps = replayed = 0
    while True:
        if time.monotonic() > deadline:
            report.problems.append(f"deliveries not finished after {timeout:.0f} s")
            break
        if clock.now() >= down_until:
            endpoint.up()
        if not settle():
            report.problems.append("the delivery worker did not settle a step within 60 s")
            break
        dead_ids = [row[0] for row in hub.query(f"SELECT m.id {shop_rows} AND m.status = 'dead'", [shop.code])]
        if dead_ids:
            for pk, recorded in hub.query(
                "SELECT message_id, count(*) FROM institutions_deliveryattempt WHERE message_id = ANY(%s) GROUP BY 1",
                [dead_ids],
            ):
                recorded_before_replay[pk] = recorded
            # Ten attempts over three days all failed: the operator replays them (same webhook-id).
            hub.manage("shell", "-c", f"from institutions.outbox import outbox_replay; outbox_replay(ids={dead_ids!r})")
            replayed += len(dead_ids)
            say(f"  {len(dead_ids)} dead messages replayed by the operator")
            continue
        if outbox(open_) == 0:
            break
        earliest = hub.scalar(
            f"SELECT min(m.next_attempt_at) {shop_rows} AND m.status IN ('pending', 'failed')",
            [shop.code],
        )
        wait = max(0.0, (earliest - datetime.now(UTC)).total_seconds())
        clock.advance(wait * (1 + step_share) + 0.5)
        steps += 1
    endpoint.down()
    delivery_worker.stop()

    # --- what the receiver and the hub's records say
    rows = hub.query(
        f"SELECT m.id, m.message_id, m.status, m.attempts, m.created_at {shop_rows}",
        [shop.code],
    )
    attempts_by_message: dict[int, list[tuple[datetime, int | None]]] = {}
    unanswered_while_up: Counter[str] = Counter()
    for message_pk, attempted_at, status_code, error in hub.query(
        "SELECT a.message_id, a.attempted_at, a.status_code, a.error FROM institutions_deliveryattempt a "
        "JOIN institutions_outboxmessage m ON m.id = a.message_id "
        "JOIN institutions_institution i ON i.id = m.institution_id "
        "WHERE i.code = %s ORDER BY a.attempted_at, a.id",
        [shop.code],
    ):
        attempts_by_message.setdefault(message_pk, []).append((attempted_at, status_code))
        if status_code is None and clock.virtual(attempted_at) >= down_until:
            unanswered_while_up[error[:80]] += 1
    delivered = sum(1 for r in rows if r[2] == "delivered")
    ids_by_redemption: dict[str, set[str]] = {}
    for msg_id, body in endpoint.requests:
        ids_by_redemption.setdefault(json.loads(body)["data"]["redemption_id"], set()).add(msg_id)
    early: list[str] = []
    late: list[str] = []
    gaps_checked = 0
    for message_pk, message_id, _, _, created_at in rows:
        tries = attempts_by_message.get(message_pk, [])
        previous = clock.virtual(created_at)
        for number, (attempted_at, _) in enumerate(tries, start=1):
            index = (number - 1) % len(CONTRACT_SCHEDULE)  # a replay starts the schedule afresh
            base = CONTRACT_SCHEDULE[index]
            gap = (clock.virtual(attempted_at) - previous).total_seconds()
            # Late by at most a step's share of the wait, plus the worker's own seconds.
            allowed = base * (1 + CONTRACT_JITTER) * (1 + step_share) + 30
            if index and gap < base * (1 - CONTRACT_JITTER) - 1:
                early.append(f"{message_id} attempt {number}: {gap:.0f} s after the previous, schedule {base} s")
            if gap > allowed and not (index == 0 and number > 1):  # a replay goes when the operator says
                late.append(f"{message_id} attempt {number}: {gap:.0f} s after the previous, schedule {base} s")
            gaps_checked += 1
            previous = clock.virtual(attempted_at)
    report.events = messages
    report.figures = {
        "messages": messages,
        "delivered": delivered,
        "replayed_after_ten_failed_attempts": replayed,
        "requests_received": len(endpoint.requests),
        "answers": {str(k): v for k, v in sorted(endpoint.answers.items())},
        "attempts_unanswered": sum(1 for tries in attempts_by_message.values() for _, code in tries if code is None),
        "attempts_unanswered_while_the_endpoint_was_up": sum(unanswered_while_up.values()),
        "attempts_recorded": sum(len(t) for t in attempts_by_message.values()),
        "max_attempts_of_a_message": max((len(t) for t in attempts_by_message.values()), default=0),
        "applied_at_the_receiver": len(endpoint.applied),
        "resends_skipped_by_the_receivers_dedupe": endpoint.duplicates_skipped,
        "redemptions_applied_twice": sum(1 for n in endpoint.effects.values() if n > 1),
        "redemptions_under_more_than_one_webhook_id": sum(1 for ids in ids_by_redemption.values() if len(ids) > 1),
        "virtual_hours_played": round(clock.offset / 3600, 1),
        "clock_steps": steps,
        "retry_gaps_checked": gaps_checked,
        "early_retries": len(early),
        "late_retries": len(late),
    }
    if delivered != messages:
        report.problems.append(f"only {delivered} of {messages} messages delivered")
    if set(ids_by_redemption) != set(redemptions):
        report.problems.append("the receiver did not get every redemption")
    if report.figures["redemptions_under_more_than_one_webhook_id"]:
        report.problems.append(
            "a redemption arrived under more than one webhook-id (the receiver would apply it twice)"
        )
    if set(endpoint.effects) != set(redemptions) or report.figures["redemptions_applied_twice"]:
        report.problems.append(f"{len(endpoint.effects)} redemptions applied for {messages}, some more than once")
    if endpoint.bad_signatures:
        report.problems.append(f"{endpoint.bad_signatures} requests without a valid hub signature")
    if unanswered_while_up:
        report.problems.append(f"requests that never reached the endpoint while it was up: {dict(unanswered_while_up)}")
    if early:
        report.problems.append(f"{len(early)} retries earlier than the schedule: {early[:3]}")
    if late:
        report.problems.append(f"{len(late)} retries later than the schedule allows: {late[:3]}")
    answered = int(
        hub.scalar(
            "SELECT count(*) FROM institutions_deliveryattempt a "
            "JOIN institutions_outboxmessage m ON m.id = a.message_id "
            "JOIN institutions_institution i ON i.id = m.institution_id "
            "WHERE i.code = %s AND a.status_code IS NOT NULL",
            [shop.code],
        )
    )
    if answered != len(endpoint.requests):
        report.problems.append(f"{len(endpoint.requests)} requests reached the receiver, {answered} answers on record")
    report.seconds = round(time.monotonic() - started, 1)
    return report


# --- Reporting --------------------------------------------------------------------------------------


def markdown(reports: list[FaultReport]) -> str:
    """The reports as markdown: a table of the streamed faults, one of the endpoint, then every figure."""
    out: list[str] = []
    streamed = [r for r in reports if r.check]
    if streamed:
        out += [
            "| fault | events sent | acknowledged (202) | credited exactly once | lost | dead | doubled "
            "| 503 answered | other non-202 | seconds from recovery to all credited |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        ]
        for r in streamed:
            check, tally = r.check, r.tally
            non_202 = {k: v for k, v in tally["statuses"].items() if k not in ("202", "503")}
            recovery = next((v for k, v in r.figures.items() if k.startswith("seconds_from_the")), None)
            out.append(
                f"| {r.fault} | {r.events:,} | {check['acknowledged']:,} | {check['credited_once']:,} "
                f"| {len(check['lost'])} | {len(check['dead'])} | {len(check['doubled'])} "
                f"| {tally['unavailable_503']:,} | {non_202 or 'none'} | {recovery} |"
            )
    for r in reports:
        if r.check:
            continue
        f = r.figures
        if out:
            out.append("")
        out += [
            "| fault | webhooks owed | delivered | applied twice | requests received | answered 500 / 503 "
            "| attempts unanswered (endpoint down) | resends skipped by the receiver | replayed after 10 attempts "
            "| retries early / late | hours played |",
            "|---|---:|---:|---:|---:|---|---:|---:|---:|---|---:|",
            f"| {r.fault} | {f['messages']:,} | {f['delivered']:,} | {f['redemptions_applied_twice']} "
            f"| {f['requests_received']:,} | {f['answers'].get('500', 0)} / {f['answers'].get('503', 0)} "
            f"| {f['attempts_unanswered']:,} | {f['resends_skipped_by_the_receivers_dedupe']} "
            f"| {f['replayed_after_ten_failed_attempts']} | {f['early_retries']} / {f['late_retries']} "
            f"| {f['virtual_hours_played']} |",
        ]
    for r in reports:
        figures = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in r.figures.items())
        out += ["", f"**{r.fault}** ({r.seconds} s): {figures}. Problems: {'; '.join(r.problems) or 'none'}."]
    return "\n".join(out)
