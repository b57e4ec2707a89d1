#!/usr/bin/env python
"""Intake benchmark: the signed CloudEvents endpoint under gunicorn and PostgreSQL.

One run measures, against one gunicorn server started here:

* ``bare``   a bare Django view answering 200 (``bench/urls.py``), the baseline;
* ``floor``  the bare view plus one committed INSERT of an inbox row per request: what any intake
  that commits each request on its own cannot beat (a diagnostic, not a target);
* ``single`` ``POST /api/v1/institutions/{code}/events`` with one event per request;
* ``batch``  the same endpoint with ``--batch-size`` events per request,

each ``--repeats`` times, interleaved (bare, floor, single, batch, bare, ...) so the machine's noise
hits all of them alike, and reports medians and per-run ratios. The load generator is ``wrk`` (a
separate, event-driven C process) replaying requests that were signed before the phase started, so
neither signing nor JSON encoding runs inside the measured server or competes in Python for the
client side. Every event id is unique, and after each phase the inbox is counted: every acknowledged
event must be stored.

The server gets a fresh PostgreSQL database (dropped and recreated each run), a Redis database of
its own (flushed before and after), ``DJANGO_DEBUG=0`` and explicit secrets; no Celery worker runs,
so inbox rows accumulate and the coalesced kicks queue in Redis. Results go to stdout, to
``docs/performance.md`` (between the markers, the rest of the file is kept) and, raw, to
``bench/results/`` (git-ignored).

    .venv/bin/python bench/intake.py                 # the documented run
    .venv/bin/python bench/intake.py --duration 5 --repeats 1 --no-docs   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LUA_SCRIPT = ROOT / "bench" / "intake.lua"
T = TypeVar("T")
DOCS_FILE = ROOT / "docs" / "performance.md"
RESULTS_DIR = ROOT / "bench" / "results"
MARK_START = "<!-- bench/intake.py results: start (generated, do not edit by hand) -->"
MARK_END = "<!-- bench/intake.py results: end -->"
CODE = "bench-bank"

PHASES = ("bare", "floor", "single", "batch")
# First guesses of requests/s used to size the pre-signed request sets; raised from what is observed.
INITIAL_ESTIMATE = {"single": 3000.0, "batch": 80.0}

TARGETS = {
    "batch_events_per_s": 15_000,
    "single_vs_bare": 0.60,
    "single_p99_ms": 50.0,
}


# --- Command line -----------------------------------------------------------------------------------


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The load generator's options, shared with the other HTTP benchmarks (``bench/redeem.py``)."""
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measured phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of unrecorded warm-up per phase")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per phase; medians are reported")
    parser.add_argument("--clients", type=int, default=16, help="concurrent connections (wrk -c)")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (one keeps the client to one core)")


def add_server_arguments(parser: argparse.ArgumentParser, *, port: int, db_name: str, redis_url: str) -> None:
    """The server's and scratch services' options, shared with the other HTTP benchmarks."""
    # One process per core (each holds the GIL for its Python work), four threads each to overlap the
    # waits on PostgreSQL and let concurrent requests share a commit; see docs/performance.md.
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--worker-class", default="gthread", help="gunicorn worker class")
    parser.add_argument("--threads", type=int, default=4, help="gunicorn threads per worker (gthread)")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument(
        "--pg-admin-url",
        default="postgres://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL connection used to drop and create the bench database",
    )
    parser.add_argument("--db-name", default=db_name, help="dropped and recreated on every run")
    parser.add_argument(
        "--redis-url", default=redis_url, help="a Redis database for this run only: flushed before and after"
    )
    parser.add_argument("--keep-db", action="store_true", help="leave the bench database in place afterwards")
    parser.add_argument("--no-docs", action="store_true", help=f"do not rewrite {DOCS_FILE.relative_to(ROOT)}")
    parser.add_argument("--label", default="", help="a note printed with the results (for comparing runs)")
    parser.add_argument(
        "--proxy",
        action="store_true",
        help="serve as compose does: nginx (deploy/nginx.conf) on --port in front of gunicorn on --port + 1",
    )


def phases_chosen(parser: argparse.ArgumentParser, args: argparse.Namespace, known: tuple[str, ...]) -> None:
    """Split ``--phases`` into ``args.phases`` and check it and ``--clients`` (argparse errors otherwise)."""
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(args.phases) - set(known)
    if unknown:
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    if args.clients < args.wrk_threads:
        parser.error("--clients must be at least --wrk-threads")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/intake.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_load_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=500, help="events per request in the batch phase")
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ",".join(PHASES))
    parser.add_argument(
        "--signature",
        choices=("v1", "v1a", "both"),
        default="v1",
        help="v1 = HMAC-SHA256, v1a = Ed25519, both = one of each in the header",
    )
    add_server_arguments(parser, port=8917, db_name="bench_clearinghouse", redis_url="redis://127.0.0.1:6379/15")
    args = parser.parse_args(argv)
    phases_chosen(parser, args, PHASES)
    return args


# --- Environment: database, Redis, secrets -----------------------------------------------------------


def bench_env(args: argparse.Namespace, var_dir: Path) -> dict[str, str]:
    from cryptography.fernet import Fernet

    base, _, _ = args.pg_admin_url.rpartition("/")
    return {
        "DJANGO_SETTINGS_MODULE": "bench.settings_bench",
        "DATABASE_URL": f"{base}/{args.db_name}",
        "REDIS_URL": args.redis_url,
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(48),
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        # wrk speaks plain HTTP to gunicorn, as the proxy does once it has ended TLS; production's redirect
        # to HTTPS would answer every request 301 here.
        "DJANGO_SECURE_SSL_REDIRECT": "0",
        "HUB_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
        "HUB_SUBJECT_KEY": secrets.token_urlsafe(32),
        "CLEARINGHOUSE_VAR_DIR": str(var_dir),
        "CLEARINGHOUSE_TASKS_EAGER": "0",
        "LOG_LEVEL": "WARNING",
    }


def recreate_database(admin_url: str, name: str) -> None:
    import psycopg

    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise SystemExit(f"--db-name {name!r}: use a plain lower-case identifier")
    with psycopg.connect(admin_url.replace("postgres://", "postgresql://", 1), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")


def drop_database(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url.replace("postgres://", "postgresql://", 1), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def flush_redis(url: str) -> None:
    import redis

    redis.Redis.from_url(url, socket_connect_timeout=2).flushdb()


@dataclass
class Institution:
    code: str
    hmac_secrets: list[bytes]
    ed25519_keys: list[Any]


def register_institution(signature: str) -> Institution:
    """Migrate the bench database and register the sending institution with a limit it will not hit."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    from django.core.management import call_command

    from institutions import crypto
    from institutions.models import Institution as InstitutionModel
    from institutions.services import institution_register

    call_command("migrate", verbosity=0, interactive=False)
    private = Ed25519PrivateKey.generate()
    public = crypto.format_public_key(private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    issued = institution_register(code=CODE, name="Bench Bank", hmac=True, ed25519_public_key=public)
    InstitutionModel.objects.filter(code=CODE).update(rate_limit_per_second=10_000_000)
    assert issued.hmac_secret is not None
    return Institution(
        code=CODE,
        hmac_secrets=[crypto.hmac_secret_bytes(issued.hmac_secret)] if signature in ("v1", "both") else [],
        ed25519_keys=[private] if signature in ("v1a", "both") else [],
    )


def inbox_count() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM institutions_inboxevent")
        return int(cursor.fetchone()[0])


def inbox_settled_count(timeout: float = 15.0) -> int:
    """The inbox row count once requests still inside the server (cut off by wrk's timer) finished."""
    deadline = time.monotonic() + timeout
    last = inbox_count()
    while time.monotonic() < deadline:
        time.sleep(0.4)
        now = inbox_count()
        if now == last:
            return now
        last = now
    return last


# --- Pre-signed requests ------------------------------------------------------------------------------


ACTIONS = (("transit.metro", "km"), ("mobility.cycling", "km"), ("transit.bus", "trip"), ("paper.e_bill", "bill"))


class RequestMaker:
    """Builds raw HTTP/1.1 requests signed like an institution signs them (institutions.crypto)."""

    def __init__(self, institution: Institution, host: str, nonce: str) -> None:
        self.institution = institution
        self.host = host
        self.nonce = nonce
        self.path = f"/api/v1/institutions/{institution.code}/events"
        self.serial = 0
        self.rng = random.Random(nonce)

    def event(self, now: datetime) -> dict[str, Any]:
        self.serial += 1
        action, unit = ACTIONS[self.serial % len(ACTIONS)]
        quantity = f"{self.rng.randint(1, 400) / 10:.1f}" if unit == "km" else "1"
        happened = now - timedelta(seconds=self.rng.randint(0, 86_400))
        data: dict[str, Any] = {
            "action": action,
            "quantity": quantity,
            "unit": unit,
            "issuer_points": self.rng.randint(0, 500),
        }
        if self.serial % 3 == 0:
            data["fingerprint"] = uuid.uuid4().hex
        return {
            "specversion": "1.0",
            "id": f"{self.nonce}-{self.serial}",
            "source": "/bench-bank/app",
            "type": "carbon.activity.recorded",
            "subject": f"cust-{self.rng.randint(1, 200_000)}",
            "time": happened.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "data": data,
        }

    def request(self, events_per_request: int) -> bytes:
        from institutions import crypto

        now = datetime.now(UTC)
        if events_per_request == 1:
            body = json.dumps(self.event(now), separators=(",", ":")).encode()
            content_type = "application/cloudevents+json"
        else:
            events = [self.event(now) for _ in range(events_per_request)]
            body = json.dumps(events, separators=(",", ":")).encode()
            content_type = "application/cloudevents-batch+json"
        headers = crypto.webhook_headers(
            body,
            msg_id=f"msg_{self.nonce}_{self.serial}",
            timestamp=int(time.time()),
            hmac_secrets=self.institution.hmac_secrets,
            ed25519_keys=self.institution.ed25519_keys,
        )
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            + "\r\n"
        )
        return head.encode() + body

    def write(self, path: Path, count: int, events_per_request: int) -> None:
        with path.open("wb") as out:
            for _ in range(count):
                raw = self.request(events_per_request)
                out.write(b"%d\n" % len(raw))
                out.write(raw)


# --- CPU accounting (from /proc, to tell where the time went) --------------------------------------


def _proc_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def _pids_by(predicate: Any) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                head, _, tail = f.read().rpartition(b")")
            comm = head.split(b"(", 1)[1].decode(errors="replace")
            ppid = int(tail.split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if predicate(int(entry), comm, ppid):
            pids.append(int(entry))
    return pids


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class CpuMeter:
    """CPU seconds used by the gunicorn processes, by PostgreSQL (the backends connected to the bench
    database, plus the WAL writer) and by Redis (the whole server) between two samples. Other users
    of the same PostgreSQL server are left out; other users of Redis are not (it is one process)."""

    def __init__(self, server_pid: int, db_name: str) -> None:
        self.server_pid = server_pid
        self.db_marker = f" {db_name} "

    def _is_bench_postgres(self, pid: int, comm: str) -> bool:
        if comm != "postgres":
            return False
        title = _cmdline(pid)
        return self.db_marker in title or "walwriter" in title

    def _groups(self) -> dict[str, list[int]]:
        return {
            "web": [self.server_pid, *_pids_by(lambda pid, comm, ppid: ppid == self.server_pid)],
            "postgres": _pids_by(lambda pid, comm, ppid: self._is_bench_postgres(pid, comm)),
            "redis": _pids_by(lambda pid, comm, ppid: comm.startswith("redis-server")),
        }

    def sample(self) -> dict[str, dict[int, int]]:
        return {group: {pid: _proc_ticks(pid) for pid in pids} for group, pids in self._groups().items()}

    @staticmethod
    def delta(before: dict[str, dict[int, int]], after: dict[str, dict[int, int]]) -> dict[str, float]:
        hz = os.sysconf("SC_CLK_TCK")
        out = {}
        for group, ticks in after.items():
            start = before.get(group, {})
            out[group] = sum(t - start.get(pid, 0) for pid, t in ticks.items()) / hz
        return out


# --- Server and load generator ------------------------------------------------------------------------


# nginx processes started by start_server (--proxy); stop_server ends them with gunicorn.
_proxies: list[subprocess.Popen[bytes]] = []


def start_proxy(listen_port: int, upstream_port: int, folder: Path) -> subprocess.Popen[bytes]:
    """nginx with deploy/nginx.conf as compose mounts it (inside http {}), its two addresses made local."""
    site = (ROOT / "deploy" / "nginx.conf").read_text()
    site = site.replace("server web:8000;", f"server 127.0.0.1:{upstream_port};")
    site = site.replace("listen 8000;", f"listen 127.0.0.1:{listen_port};")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hub.conf").write_text(site)
    temp = " ".join(
        f"{name}_temp_path {folder / name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (folder / "nginx.conf").write_text(
        f"worker_processes 1; pid {folder}/nginx.pid; error_log {folder}/error.log warn;\n"
        f"events {{ worker_connections 4096; }}\n"
        f"http {{ access_log off; {temp} include {folder}/hub.conf; }}\n"
    )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    command = [nginx, "-e", "stderr", "-p", str(folder), "-c", str(folder / "nginx.conf"), "-g", "daemon off;"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=(folder / "nginx.log").open("wb"))


def start_server(args: argparse.Namespace, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    # With --proxy, clients (wrk) still talk to --port, where nginx listens; gunicorn is one port up.
    upstream_port = args.port + 1 if getattr(args, "proxy", False) else args.port
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        # Production's configuration (gunicorn.conf.py); the options below override it only where a run
        # asks for another server (their defaults are the file's values) and to bind a local port.
        "--config",
        str(ROOT / "gunicorn.conf.py"),
        "clearinghouse.wsgi:application",
        "--bind",
        f"127.0.0.1:{upstream_port}",
        "--workers",
        str(args.workers),
        "--worker-class",
        args.worker_class,
        "--threads",
        str(args.threads),
        "--keep-alive",
        "30",
        "--backlog",
        "2048",
        "--log-level",
        "warning",
        "--chdir",
        str(ROOT),
    ]
    log = log_path.open("wb")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if upstream_port != args.port:
        _proxies.append(start_proxy(args.port, upstream_port, log_path.parent / "nginx"))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = log_path.read_text()[-3000:]
            raise SystemExit(f"gunicorn exited with {server.returncode}; see {log_path}:\n{tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/readyz", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.3)
    stop_server(server)
    raise SystemExit(f"gunicorn did not become ready; see {log_path}")


def stop_server(server: subprocess.Popen[bytes]) -> None:
    while _proxies:
        proxy = _proxies.pop()
        proxy.terminate()
        proxy.wait(timeout=20)
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def run_wrk(args: argparse.Namespace, target: str, duration: float) -> dict[str, Any]:
    command = [
        "wrk",
        "-t",
        str(args.wrk_threads),
        "-c",
        str(args.clients),
        "-d",
        f"{max(1, round(duration))}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(LUA_SCRIPT),
        f"http://127.0.0.1:{args.port}",
        "--",
        target,
        str(args.wrk_threads),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in completed.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON ") :])
    raise SystemExit(f"wrk failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}")


@dataclass
class PhaseResult:
    phase: str
    repeat: int  # 0 = warm-up
    events_per_request: int
    requests_per_s: float
    events_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    completed: int
    issued: int
    non_2xx: int
    socket_errors: int
    acknowledged_events: int
    stored_events: int
    cut_off_requests: int
    cpu_s: dict[str, float] = field(default_factory=dict)
    duration_s: float = 0.0

    @property
    def lost_events(self) -> int:
        return max(0, self.acknowledged_events - self.stored_events)

    @property
    def unexplained_rows(self) -> int:
        """Rows beyond the acknowledged events that requests cut off in flight cannot account for."""
        return max(0, self.stored_events - self.acknowledged_events - self.cut_off_requests * self.events_per_request)


class Bench:
    def __init__(
        self, args: argparse.Namespace, institution: Institution, server: subprocess.Popen[bytes], work_dir: Path
    ) -> None:
        self.args = args
        self.maker = RequestMaker(institution, f"127.0.0.1:{args.port}", nonce=uuid.uuid4().hex[:10])
        self.meter = CpuMeter(server.pid, args.db_name)
        self.work_dir = work_dir
        self.estimate = dict(INITIAL_ESTIMATE)

    def events_per_request(self, phase: str) -> int:
        return {"bare": 0, "floor": 1, "single": 1, "batch": self.args.batch_size}[phase]

    def run_phase(self, phase: str, repeat: int, duration: float) -> PhaseResult:
        per_request = self.events_per_request(phase)
        for _attempt in range(4):
            target = f"GET:/bench/{phase}"
            if phase in ("single", "batch"):
                # Signed just before the phase: timestamps are checked within ±300 s.
                count = int(self.estimate[phase] * duration * 1.5) + 8 * self.args.clients
                target_path = self.work_dir / f"{phase}.requests"
                self.maker.write(target_path, count, per_request)
                target = str(target_path)
            before_rows = inbox_count() if per_request else 0
            cpu_before = self.meter.sample()
            raw = run_wrk(self.args, target, duration)
            cpu = CpuMeter.delta(cpu_before, self.meter.sample())
            stored = inbox_settled_count() - before_rows if per_request else 0
            seconds = raw["duration_us"] / 1e6
            if phase in self.estimate:
                self.estimate[phase] = max(self.estimate[phase], raw["completed"] / seconds)
                if raw["exhausted"]:
                    self.estimate[phase] *= 2
                    print(f"  {phase}: ran out of pre-signed requests; retrying with more", flush=True)
                    continue
            break
        else:
            raise SystemExit(f"{phase}: could not pre-sign enough requests")
        errors = raw["errors"]
        ok = raw["completed"] - errors["status"]
        latency = raw["latency_us"]
        result = PhaseResult(
            phase=phase,
            repeat=repeat,
            events_per_request=per_request,
            requests_per_s=raw["completed"] / seconds,
            events_per_s=ok * per_request / seconds,
            p50_ms=latency["p50"] / 1000,
            p90_ms=latency["p90"] / 1000,
            p99_ms=latency["p99"] / 1000,
            max_ms=latency["max"] / 1000,
            completed=raw["completed"],
            issued=raw["issued"],
            non_2xx=errors["status"],
            socket_errors=errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
            acknowledged_events=ok * per_request,
            stored_events=stored,
            cut_off_requests=max(0, raw["issued"] - raw["completed"]),
            cpu_s=cpu,
            duration_s=seconds,
        )
        print("  " + describe(result), flush=True)
        return result


def describe(r: PhaseResult) -> str:
    label = "warm-up" if r.repeat == 0 else f"run {r.repeat}"
    cpu = ", ".join(f"{k} {1e6 * v / max(r.completed, 1):.0f}" for k, v in r.cpu_s.items())
    text = (
        f"{r.phase:6} {label:7} {r.requests_per_s:8.0f} req/s  p50 {r.p50_ms:6.2f} ms  p99 {r.p99_ms:6.2f} ms"
        f"  CPU µs/req: {cpu}"
    )
    if r.events_per_request:
        text += (
            f"  | {r.events_per_s:8.0f} events/s, acknowledged {r.acknowledged_events}, "
            f"stored {r.stored_events}, cut off in flight {r.cut_off_requests} req"
        )
    if r.non_2xx or r.socket_errors:
        text += f"  !! non-2xx {r.non_2xx}, socket errors {r.socket_errors}"
    return text


# --- Report -------------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(results: list[PhaseResult]) -> dict[str, Any]:
    measured = [r for r in results if r.repeat > 0]
    by_phase: dict[str, list[PhaseResult]] = {}
    for r in measured:
        by_phase.setdefault(r.phase, []).append(r)
    summary: dict[str, Any] = {}
    for phase, rows in by_phase.items():
        summary[phase] = {
            "requests_per_s": median([r.requests_per_s for r in rows]),
            "events_per_s": median([r.events_per_s for r in rows]),
            "p50_ms": median([r.p50_ms for r in rows]),
            "p99_ms": median([r.p99_ms for r in rows]),
            "web_cpu_us_per_req": median([1e6 * r.cpu_s.get("web", 0) / max(r.completed, 1) for r in rows]),
            "db_cpu_us_per_req": median([1e6 * r.cpu_s.get("postgres", 0) / max(r.completed, 1) for r in rows]),
            "runs": len(rows),
        }
    # Ratio per repeat (the bare and single runs of one repeat are adjacent in time), then the median.
    bare = {r.repeat: r for r in by_phase.get("bare", [])}
    ratios = [r.requests_per_s / bare[r.repeat].requests_per_s for r in by_phase.get("single", []) if r.repeat in bare]
    if ratios:
        summary["single_vs_bare"] = median(ratios)
    floor = {r.repeat: r for r in by_phase.get("floor", [])}
    if floor and bare:
        summary["floor_vs_bare"] = median(
            [r.requests_per_s / bare[r.repeat].requests_per_s for r in floor.values() if r.repeat in bare]
        )
    if floor:
        summary["single_vs_floor"] = median(
            [r.requests_per_s / floor[r.repeat].requests_per_s for r in by_phase.get("single", []) if r.repeat in floor]
        )
    if "batch" in summary and "bare" in summary:
        summary["batch_events_vs_bare_requests"] = median(
            [r.events_per_s / bare[r.repeat].requests_per_s for r in by_phase["batch"] if r.repeat in bare]
        )
    summary["lost_events"] = sum(r.lost_events for r in results)
    summary["unexplained_rows"] = sum(r.unexplained_rows for r in results)
    summary["non_2xx"] = sum(r.non_2xx for r in results if r.phase != "bare")
    return summary


def verdicts(summary: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    out = []
    if "batch" in summary:
        value = summary["batch"]["events_per_s"]
        out.append(
            (
                "batch events/s",
                f">= {TARGETS['batch_events_per_s']:,}",
                f"{value:,.0f}",
                value >= TARGETS["batch_events_per_s"],
            )
        )
    if "single_vs_bare" in summary:
        value = summary["single_vs_bare"]
        out.append(
            (
                "single req/s vs bare view",
                f">= {TARGETS['single_vs_bare']:.0%}",
                f"{value:.0%}",
                value >= TARGETS["single_vs_bare"],
            )
        )
    if "single" in summary:
        value = summary["single"]["p99_ms"]
        out.append(
            (
                "single p99 latency",
                f"< {TARGETS['single_p99_ms']:.0f} ms",
                f"{value:.1f} ms",
                value < TARGETS["single_p99_ms"],
            )
        )
    out.append(
        (
            "events lost (acknowledged, not stored)",
            "0",
            str(summary["lost_events"]),
            summary["lost_events"] == 0 and summary["unexplained_rows"] == 0,
        )
    )
    return out


def machine_note(args: argparse.Namespace) -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    versions = []
    try:
        import django
        import gunicorn
        import psycopg

        versions += [
            f"Django {django.get_version()}",
            f"gunicorn {gunicorn.__version__}",
            f"psycopg {psycopg.__version__}",
        ]
    except ImportError:
        pass
    try:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            versions.append(f"PostgreSQL {cursor.fetchone()[0].split()[0]}")
            cursor.execute("SHOW synchronous_commit")
            versions.append(f"synchronous_commit={cursor.fetchone()[0]}")
    except Exception:  # noqa: S110 (a note, not a measurement)
        pass
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem_gb:.0f} GB RAM, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, {', '.join(versions)}; {wrk_version.split(' [')[0]}; "
        f"load average at start {load}. Web server, PostgreSQL, Redis and wrk share the same cores."
    )


def render(
    args: argparse.Namespace,
    results: list[PhaseResult],
    summary: dict[str, Any],
    command: str,
    started: datetime,
    machine: str,
) -> str:
    server = (
        f"gunicorn `--worker-class {args.worker_class} --workers {args.workers} --threads {args.threads}"
        f" --keep-alive 30`, `DJANGO_DEBUG=0`, persistent DB connections (`DB_CONN_MAX_AGE` 60)"
    )
    if args.proxy:
        server += "; behind nginx (`deploy/nginx.conf`, one worker process), as compose serves it"
    lines = [
        MARK_START,
        "",
        f"Command (from the repository root): `{command}`",
        "",
        f"Run {started:%Y-%m-%d %H:%M} UTC. Machine: {machine}",
        "",
        f"Server: {server}; {args.clients} concurrent connections from one `wrk` process "
        f"({args.wrk_threads} thread), {args.duration:g} s per run after a {args.warmup:g} s warm-up, "
        f"{args.repeats} runs per phase interleaved ({', '.join(args.phases)}, {args.phases[0]}, ...); medians "
        f"below. "
        f"Signatures: `{args.signature}` (signed before each phase, outside the server)."
        + (f" Note: {args.label}." if args.label else ""),
        "",
        "| phase | requests/s | events/s | p50 ms | p99 ms | web CPU µs/req "
        "| PostgreSQL CPU µs/req (bench backends + WAL writer) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = {
        "bare": "bare Django view (baseline)",
        "floor": "floor: bare view + one committed INSERT",
        "single": "single event",
        "batch": f"batch of {args.batch_size}",
    }
    for phase in PHASES:
        if phase not in summary:
            continue
        s = summary[phase]
        events = f"{s['events_per_s']:,.0f}" if phase in ("single", "batch") else "n/a"
        lines.append(
            f"| {names[phase]} | {s['requests_per_s']:,.0f} | {events} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} "
            f"| {s['web_cpu_us_per_req']:,.0f} | {s['db_cpu_us_per_req']:,.0f} |"
        )
    lines += ["", "| target | required | measured (median) | |", "|---|---|---|---|"]
    for name, required, measured, passed in verdicts(summary):
        lines.append(f"| {name} | {required} | {measured} | {'met' if passed else '**missed**'} |")
    ratios = []
    if "floor_vs_bare" in summary:
        ratios.append(f"floor / bare {summary['floor_vs_bare']:.0%}")
    if "single_vs_floor" in summary:
        ratios.append(f"single / floor {summary['single_vs_floor']:.0%}")
    if ratios:
        lines += ["", "Ratios (median of the per-run ratios): " + "; ".join(ratios) + "."]
    lines += [
        "",
        "<details><summary>Every run</summary>",
        "",
        "| phase | run | requests/s | events/s | p50 ms | p99 ms | max ms | acknowledged events | stored rows "
        "| cut off in flight (req) | non-2xx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        run = "warm-up" if r.repeat == 0 else str(r.repeat)
        events = f"{r.events_per_s:,.0f}" if r.events_per_request else ""
        stored = f"{r.stored_events:,}" if r.events_per_request else ""
        acked = f"{r.acknowledged_events:,}" if r.events_per_request else ""
        cut = str(r.cut_off_requests) if r.events_per_request else ""
        lines.append(
            f"| {r.phase} | {run} | {r.requests_per_s:,.0f} | {events} | {r.p50_ms:.1f} | {r.p99_ms:.1f} "
            f"| {r.max_ms:.1f} | {acked} | {stored} | {cut} | {r.non_2xx} |"
        )
    lines += [
        "",
        "Stored rows are counted in the inbox after each run. They must include every acknowledged event;",
        "beyond those, only the events of requests that wrk's timer cut off in flight (sent, answer not",
        "awaited) may be stored.",
        "",
        "</details>",
        "",
        MARK_END,
    ]
    return "\n".join(lines)


def phases_interleaved(run_phase: Callable[[str, int, float], T], args: argparse.Namespace) -> list[T]:
    """A warm-up run of each phase (repeat 0, ``--warmup`` s), then ``--repeats`` rounds of every phase
    in turn (``--duration`` s each), so each phase meets the machine's drift alike."""
    results = [run_phase(phase, 0, args.warmup) for phase in args.phases] if args.warmup > 0 else []
    for repeat in range(1, args.repeats + 1):
        results += [run_phase(phase, repeat, args.duration) for phase in args.phases]
    return results


def scratch_cleanup(args: argparse.Namespace, server: subprocess.Popen[bytes] | None, work_dir: Path) -> None:
    """Stop the server if it still runs, flush the bench's Redis database, drop the scratch database
    (unless ``--keep-db``) and remove the work directory; each step runs even if one before it fails."""
    from django.db import connections

    try:
        if server is not None:
            stop_server(server)
    finally:
        try:
            flush_redis(args.redis_url)
        finally:
            connections.close_all()
            if not args.keep_db:
                drop_database(args.pg_admin_url, args.db_name)
            shutil.rmtree(work_dir, ignore_errors=True)


def raw_results_write(name: str, started: datetime, record: dict[str, Any]) -> Path:
    """Everything a run measured, as JSON in ``bench/results/`` (git-ignored); returns the file."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{started:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    return path


def docs_block_write(block: str, *, start: str, end: str, heading: str) -> None:
    """Put a benchmark's generated block into ``docs/performance.md``: in place of the text between its
    markers ``start`` and ``end`` (the rest of the file is kept), or appended under ``heading``."""
    text = DOCS_FILE.read_text() if DOCS_FILE.exists() else "# Performance\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        DOCS_FILE.write_text(head + block + tail)
    else:
        DOCS_FILE.parent.mkdir(parents=True, exist_ok=True)
        DOCS_FILE.write_text(text.rstrip("\n") + f"\n\n## {heading}\n\n" + block + "\n")


# --- Main ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is required (Debian/Ubuntu: apt-get install -y wrk).")
    started = datetime.now(UTC)
    command = shlex.join([".venv/bin/python", "bench/intake.py", *(sys.argv[1:] if argv is None else argv)])
    work_dir = Path(tempfile.mkdtemp(prefix="bench-intake-"))
    env = bench_env(args, work_dir)
    os.environ.update(env)

    recreate_database(args.pg_admin_url, args.db_name)
    flush_redis(args.redis_url)
    import django

    django.setup()

    server: subprocess.Popen[bytes] | None = None
    try:
        institution = register_institution(args.signature)
        machine = machine_note(args)
        print(f"Machine: {machine}", flush=True)
        server = start_server(args, dict(os.environ), work_dir / "gunicorn.log")
        print(
            f"gunicorn {args.worker_class} x{args.workers} (threads {args.threads}) on :{args.port}; "
            f"database {args.db_name}; Redis {args.redis_url}",
            flush=True,
        )
        bench = Bench(args, institution, server, work_dir)
        results = phases_interleaved(bench.run_phase, args)
    finally:
        scratch_cleanup(args, server, work_dir)

    summary = summarize(results)
    block = render(args, results, summary, command, started, machine)
    print()
    print(block)
    raw_path = raw_results_write(
        "intake",
        started,
        {
            "command": command,
            "started": started.isoformat(),
            "machine": machine,
            "args": vars(args),
            "summary": summary,
            "runs": [asdict(r) for r in results],
        },
    )
    if not args.no_docs:
        docs_block_write(block, start=MARK_START, end=MARK_END, heading="Latest results")
        print(f"\nWrote {DOCS_FILE.relative_to(ROOT)} and {raw_path.relative_to(ROOT)}")
    failed = [name for name, _, _, passed in verdicts(summary) if not passed]
    if summary["lost_events"] or summary["unexplained_rows"]:
        print("ERROR: acknowledged events missing from the inbox", file=sys.stderr)
        return 2
    if failed:
        print(f"Targets missed: {', '.join(failed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
