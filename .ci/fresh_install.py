#!/usr/bin/env python3
"""A fresh install that runs: the declared runtime dependencies only, a real worker on Redis, one event.

What the image does, outside Docker: a new virtual environment gets ``pip install .`` of a folder holding
only pyproject.toml and README.md (the Dockerfile's install line), so nothing a dev install brings in
(pytest pulls in ``packaging``, which hid issue 11's dead worker) is there. Then, with production
settings (DJANGO_DEBUG=0, explicit secrets) on PostgreSQL and Redis:

1. the environment holds no dev tool, and every module of the hub imports;
2. a database of its own is created and migrated, and an institution registered;
3. ``celery -A clearinghouse worker`` and ``beat`` start on Redis (a database number of its own), and
   gunicorn starts from ``gunicorn.conf.py``, as the image's CMD does;
4. one signed activity event goes through the intake (202) and is processed and credited by that worker;
5. everything is stopped and the database dropped. Any failed step exits non-zero, with the logs.

Standard library only, so any Python 3.11+ runs it. CI calls it from ``.ci/run``; by hand:

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres REDIS_URL=redis://127.0.0.1:6379/0 \\
        python3 .ci/fresh_install.py [--redis-db 13] [--keep]

``DATABASE_URL`` names the server (its database is only used to create and drop this run's own);
``REDIS_URL`` the Redis server, whose database number is replaced by ``--redis-db``. pip's cache is reused.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The hub's own code, as the image holds it (COPY . .): every module here must import in the fresh install.
APPS = ["clearinghouse", "institutions", "ledger", "methodology", "wallets", "settlement", "portal", "demo"]
INSTITUTION = "fresh-install-bank"
STEP_TIMEOUT = 90  # seconds, for any one wait below


class Failed(Exception):
    """A step of the fresh install did not do what it must."""


def log(message: str) -> None:
    print(f"fresh-install: {message}", flush=True)


def run(command: list[str], *, env: dict[str, str] | None = None, cwd: Path = ROOT, what: str) -> str:
    started = time.monotonic()
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, check=False)  # noqa: S603
    if result.returncode != 0:
        raise Failed(f"{what} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    log(f"{what}: ok ({time.monotonic() - started:.1f} s)")
    return result.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def with_redis_db(url: str, db: int) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


# --- The install -------------------------------------------------------------------------------------


def build_venv(work: Path) -> Path:
    """A new venv with ``pip install .`` of pyproject.toml and README.md alone: the image's install line."""
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    venv = work / "venv"
    run([sys.executable, "-m", "venv", str(venv)], what="python -m venv")
    python = venv / "bin" / "python"
    # pip's cache (the user's default) is reused; nothing else of this machine's Python reaches the venv.
    run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        what="pip install . (declared runtime dependencies only)",
    )
    run([str(python), "-m", "pip", "check", "--disable-pip-version-check"], what="pip check")
    return venv


IMPORT_EVERYTHING = """
import importlib, pkgutil, sys
try:
    import pytest
except ImportError:
    pass
else:
    sys.exit("pytest is installed: this is not a runtime-only environment")
import django
django.setup()
modules = []
for app in sys.argv[1:]:
    package = importlib.import_module(app)
    modules.append(app)
    for info in pkgutil.walk_packages(package.__path__, prefix=app + "."):
        importlib.import_module(info.name)
        modules.append(info.name)
# What the worker's broker transport and the schedule need at start, imported as they import it.
import kombu.transport.redis, celery.beat
print(len(modules))
"""


# --- The services ------------------------------------------------------------------------------------


class Services:
    """The processes this run starts; :meth:`stop` ends each (and only those)."""

    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work = work
        self.env = env
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, command: list[str]) -> None:
        with (self.work / f"{name}.log").open("wb") as output:
            self.started[name] = subprocess.Popen(  # noqa: S603 (our own commands)
                command, env=self.env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        log(f"started {name}: {' '.join([Path(command[0]).name, *command[1:]])}")

    def check_alive(self) -> None:
        for name, process in self.started.items():
            if process.poll() is not None:
                raise Failed(f"{name} exited with {process.returncode}")

    def stop(self) -> None:
        for process in self.started.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for name, process in self.started.items():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log(f"{name} did not stop on SIGTERM; killing it")
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def logs(self) -> str:
        return "\n".join(
            f"--- {name}.log (last lines) ---\n" + (self.work / f"{name}.log").read_text(errors="replace")[-4000:]
            for name in self.started
        )


def request(
    url: str, *, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body is not None else "GET")  # noqa: S310 (http to our own server)

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(req, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def wait_for(what: str, check, services: Services, timeout: float = STEP_TIMEOUT):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        services.check_alive()
        try:
            result = check()
        except OSError as error:
            result, last = None, error
        if result:
            return result
        time.sleep(0.5)
    raise Failed(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def signed_headers(secret: str, body: bytes) -> dict[str, str]:
    """Standard Webhooks v1 (HMAC-SHA256 over ``id.timestamp.body``), as an institution signs."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    msg_id = f"msg_{secrets.token_hex(12)}"
    timestamp = str(int(time.time()))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": timestamp,
        "webhook-signature": "v1," + base64.b64encode(digest).decode(),
        "Content-Type": "application/cloudevents+json",
    }


# --- The run -----------------------------------------------------------------------------------------


def fresh_install(args: argparse.Namespace, work: Path) -> None:
    started = time.monotonic()
    venv = build_venv(work)
    python, bin_dir = str(venv / "bin" / "python"), venv / "bin"

    database_name = f"clearinghouse_fresh_{os.getpid()}"
    admin_url = args.database_url.replace("postgres://", "postgresql://", 1)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": os.environ.get("HOME", str(work)),
        "LANG": "C.UTF-8",
        "PYTHONPATH": str(ROOT),  # the hub's code, as the image's WORKDIR holds it
        "DJANGO_SETTINGS_MODULE": "clearinghouse.settings",
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
        "DJANGO_SECURE_PROXY_SSL_HEADER": "HTTP_X_FORWARDED_PROTO,https",
        "HUB_ENCRYPTION_KEYS": base64.urlsafe_b64encode(os.urandom(32)).decode(),
        "HUB_SUBJECT_KEY": secrets.token_urlsafe(32),
        "HUB_REDIS_KEY_PREFIX": f"fresh{os.getpid()}:",
        "DATABASE_URL": with_database(args.database_url, database_name),
        "REDIS_URL": with_redis_db(args.redis_url, args.redis_db),
        "CLEARINGHOUSE_VAR_DIR": str(work / "var"),
        "DJANGO_STATIC_ROOT": str(work / "static"),
        "LOG_LEVEL": "WARNING",
    }
    count = run([python, "-c", IMPORT_EVERYTHING, *APPS], env=env, what="no dev tools; every module of the hub imports")
    log(f"{count.strip()} modules imported")

    db_admin = (
        "import sys, psycopg\n"
        "with psycopg.connect(sys.argv[1], autocommit=True) as c:\n"
        "    c.execute(f'DROP DATABASE IF EXISTS {sys.argv[2]} WITH (FORCE)')\n"
        "    if sys.argv[3] == 'create': c.execute(f'CREATE DATABASE {sys.argv[2]}')\n"
    )
    run([python, "-c", db_admin, admin_url, database_name, "create"], env=env, what=f"create database {database_name}")
    services = Services(work, env)
    try:
        run([python, "manage.py", "migrate", "--noinput"], env=env, what="manage.py migrate")
        run([python, "manage.py", "collectstatic", "--noinput"], env=env, what="manage.py collectstatic")
        issued = json.loads(
            run(
                [python, "manage.py", "institution_register", INSTITUTION, "--name", "Fresh install bank", "--hmac"],
                env=env,
                what="manage.py institution_register",
            )
        )

        port = free_port()
        services.env = {**env, "GUNICORN_BIND": f"127.0.0.1:{port}"}
        services.start(
            "worker",
            [
                *(str(bin_dir / "celery"), "-A", "clearinghouse", "worker"),
                *("--queues", "intake,ledger,delivery,settlement", "--concurrency", "1"),
                *("--loglevel", "INFO", "--hostname", f"fresh{os.getpid()}@%h"),
            ],
        )
        services.start(
            "beat",
            [
                *(str(bin_dir / "celery"), "-A", "clearinghouse", "beat"),
                *("--loglevel", "INFO", "--schedule", str(work / "celerybeat-schedule")),
            ],
        )
        services.start("web", [str(bin_dir / "gunicorn"), "--config", "gunicorn.conf.py"])
        base = f"http://127.0.0.1:{port}"

        # Plain HTTP from inside, as a probe asks: answered, not redirected, the broker reachable.
        def ready() -> bytes | None:
            status, _, body = request(f"{base}/readyz")
            return body if status == 200 else None

        log(f"/readyz: 200 {wait_for('/readyz', ready, services).decode()}")
        status, headers, _ = request(f"{base}/api/v1/hub/keys")
        if status != 301 or not headers.get("Location", "").startswith("https://"):
            raise Failed(f"production settings should redirect plain HTTP to HTTPS; got {status} {headers}")
        log("production settings in force: plain HTTP to the API is redirected to HTTPS")

        # A person's page and its stylesheet, served by gunicorn itself (WhiteNoise), as collected.
        https = {"X-Forwarded-Proto": "https"}
        status, _, page = request(f"{base}/signin/", headers=https)
        stylesheet = re.search(rb'<link rel="stylesheet" href="(/static/portal/portal\.[0-9a-f]{12}\.css)"', page)
        if status != 200 or stylesheet is None:
            raise Failed(f"the sign-in page should link its collected stylesheet; got {status} {page[:300]!r}")
        status, headers, _ = request(base + stylesheet.group(1).decode(), headers=https)
        if status != 200 or not headers.get("Content-Type", "").startswith("text/css"):
            raise Failed(f"the stylesheet should be served by the hub itself; got {status} {headers}")
        log(f"persons' pages: /signin/ and {stylesheet.group(1).decode()} served by gunicorn")

        # One signed activity, as from behind the TLS-ending proxy.
        event_id = f"fresh-{secrets.token_hex(6)}"
        event = {
            "specversion": "1.0",
            "id": event_id,
            "source": "/fresh-install",
            "type": "carbon.activity.recorded",
            "subject": "customer-1",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "data": {"action": "transit.metro", "quantity": "12.5", "unit": "km"},
        }
        raw = json.dumps(event).encode()
        proxied = {"X-Forwarded-Proto": "https"}
        url = f"{base}/api/v1/institutions/{INSTITUTION}/events"
        status, _, body = request(url, body=raw, headers={**signed_headers(issued["hmac_secret"], raw), **proxied})
        answer = json.loads(body or b"{}")
        if status != 202 or answer.get("results", [{}])[0].get("status") != "accepted":
            raise Failed(f"the intake should accept the event with 202; got {status} {body!r}")
        log(f"intake: 202 {answer}")

        auth = {"Authorization": f"Bearer {issued['api_token']}", **proxied}

        def processed() -> dict | None:
            status, _, body = request(f"{url}/{event_id}", headers=auth)
            if status != 200:
                raise Failed(f"following the event answered {status}: {body!r}")
            state = json.loads(body)
            if state["status"] in ("quarantined", "dead"):
                raise Failed(f"the worker did not credit the event: {state}")
            return state if state["status"] == "processed" else None

        state = wait_for("the worker to process the event", processed, services)
        if not (state.get("outcome") or {}).get("points", 0) > 0:
            raise Failed(f"the event was processed but credited nothing: {state}")
        log(f"processed by the worker: {state}")

        time.sleep(1)  # beat writes its schedule file within its first tick
        services.check_alive()
        if not (work / "celerybeat-schedule").exists() and not list(work.glob("celerybeat-schedule*")):
            raise Failed("celery beat is running but wrote no schedule file")
        log("worker, beat and web still running")
    except BaseException:  # a failed step, or anything unforeseen: the services' logs say why
        print(services.logs(), file=sys.stderr)
        raise
    finally:
        services.stop()
        run([python, "-c", db_admin, admin_url, database_name, "drop"], env=env, what=f"drop database {database_name}")
    log(f"passed in {time.monotonic() - started:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url", default=os.environ.get("DATABASE_URL") or "postgres://postgres@127.0.0.1:5432/postgres"
    )
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")
    parser.add_argument("--redis-db", type=int, default=13, help="Redis database number of this run's broker")
    parser.add_argument("--keep", action="store_true", help="keep the venv and the logs (printed at the end)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fresh-install-"))
    try:
        fresh_install(args, work)
        return 0
    except Failed as failure:
        log(f"FAILED: {failure}")
        return 1
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
