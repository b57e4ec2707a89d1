#!/usr/bin/env python
"""The fault campaign, by hand and at any scale: the hub's processes on a PostgreSQL and a Redis of
the campaign's own, faults injected while signed events stream through the real intake, then every
acknowledged event checked against the books.

Faults (``--faults``, comma-separated; all four by default):

  workers   a Celery worker SIGKILLed inside a claimed batch, again and again, restarted at once
  redis     Redis wiped (FLUSHALL), stopped and restarted empty mid-stream
  postgres  PostgreSQL crashed (pg_ctl stop -m immediate) under load and started again
  endpoint  an institution's webhook endpoint down for minutes, then failing a share of requests,
            played on an advanced clock through the contract's retry schedule

The shared PostgreSQL and Redis of the machine are not touched: the campaign starts its own (initdb
into a temporary directory, run as the 'postgres' OS user when run as root; redis-server with
--save ''), on free ports, and removes them at the end. Needs the PostgreSQL server binaries
(found under /usr/lib/postgresql/<version>/bin, or $PG_BINDIR) and redis-server.

Prints progress on stderr, a markdown summary on stdout, and with --json the full figures.
docs/reliability.md explains each fault, what the hub promises and the figures of the last run.

    .venv/bin/python bench/faults.py                              # the documented run
    .venv/bin/python bench/faults.py --faults workers --events 20000 --rate 500 --kills 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import campaign  # noqa: E402 (after the path is set)

FAULTS = ("workers", "redis", "postgres", "endpoint")
DOCS_FILE = ROOT / "docs" / "reliability.md"
MARK_START = "<!-- bench/faults.py results: start -->"
MARK_END = "<!-- bench/faults.py results: end -->"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/faults.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]) if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--faults", default=",".join(FAULTS), help=f"which faults, of {','.join(FAULTS)} (default: all)"
    )
    stream = parser.add_argument_group("the event stream (workers, redis, postgres)")
    stream.add_argument("--events", type=int, default=10_000, help="events per fault (default: %(default)s)")
    stream.add_argument("--rate", type=float, default=400.0, help="events per second offered (default: %(default)s)")
    stream.add_argument("--batch", type=int, default=20, help="events per request (default: %(default)s)")
    kills = parser.add_argument_group("workers")
    kills.add_argument("--kills", type=int, default=8, help="SIGKILLs during the stream (default: %(default)s)")
    kills.add_argument(
        "--kill-every", type=float, default=None, help="seconds between kills, +-30%% (default: spread over the stream)"
    )
    kills.add_argument("--pool", choices=("solo", "prefork"), default="solo", help="the worker's pool (default: solo)")
    kills.add_argument("--concurrency", type=int, default=2, help="prefork pool processes (default: %(default)s)")
    redis = parser.add_argument_group("redis")
    redis.add_argument(
        "--redis-outage-at",
        type=float,
        default=0.4,
        help="share of the stream sent when Redis goes (default: %(default)s)",
    )
    redis.add_argument(
        "--redis-outage",
        type=float,
        default=None,
        help="seconds Redis stays down (default: until 2 s after the stream's last request)",
    )
    pg = parser.add_argument_group("postgres")
    pg.add_argument(
        "--pg-down-at", type=float, default=0.3, help="share of the stream sent at the crash (default: %(default)s)"
    )
    pg.add_argument("--pg-down", type=float, default=10.0, help="seconds PostgreSQL stays down (default: %(default)s)")
    endpoint = parser.add_argument_group("endpoint")
    endpoint.add_argument(
        "--messages", type=int, default=300, help="webhooks owed to the endpoint (default: %(default)s)"
    )
    endpoint.add_argument(
        "--failure-rate", type=float, default=0.4, help="share of requests failed (default: %(default)s)"
    )
    endpoint.add_argument(
        "--down-minutes",
        type=float,
        default=30.0,
        help="minutes (on the advanced clock) the endpoint is down (default: %(default)s)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for the inbox to drain (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, help="write every figure to this file as JSON")
    parser.add_argument(
        "--docs", action="store_true", help=f"put the summary in {DOCS_FILE.relative_to(ROOT)} (between its markers)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs of every process)")
    args = parser.parse_args(argv)
    args.fault_list = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = set(args.fault_list) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say = campaign.say_to_stderr
    missing = campaign.missing_binaries()
    if missing:
        print("bench/faults.py cannot run here; missing:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    bindir = campaign.postgres_bindir()
    assert bindir is not None
    work = Path(tempfile.mkdtemp(prefix="hub-faults-"))
    postgres = campaign.PrivatePostgres(bindir)
    reports: list[campaign.FaultReport] = []
    started = datetime.now(UTC)
    try:
        say(f"private PostgreSQL ({bindir}) on port {postgres.port}; work directory {work}")
        postgres.init()
        postgres.start()
        campaign.template_prepare(postgres, "hub_template", work, say=say)
        say("migrated the template database")
        for fault in args.fault_list:
            with campaign.scene(postgres, "hub_template", work, fault, say=say) as scene:
                if fault == "workers":
                    report = campaign.fault_worker_kills(
                        scene,
                        events=args.events,
                        rate=args.rate,
                        batch=args.batch,
                        kills=args.kills,
                        kill_every=args.kill_every,
                        pool=args.pool,
                        concurrency=args.concurrency if args.pool == "prefork" else 1,
                        drain_timeout=args.drain_timeout,
                        say=say,
                    )
                elif fault == "redis":
                    report = campaign.fault_redis_outage(
                        scene,
                        events=args.events,
                        rate=args.rate,
                        batch=args.batch,
                        outage_at=args.redis_outage_at,
                        outage_seconds=args.redis_outage,
                        drain_timeout=args.drain_timeout,
                        say=say,
                    )
                elif fault == "postgres":
                    report = campaign.fault_postgres_restart(
                        scene,
                        postgres,
                        events=args.events,
                        rate=args.rate,
                        batch=args.batch,
                        down_at=args.pg_down_at,
                        down_seconds=args.pg_down,
                        drain_timeout=args.drain_timeout,
                        say=say,
                    )
                else:
                    report = campaign.fault_flaky_endpoint(
                        scene,
                        messages=args.messages,
                        failure_rate=args.failure_rate,
                        down_minutes=args.down_minutes,
                        say=say,
                    )
            reports.append(report)
            say(f"{report.fault}: {'OK' if not report.problems else 'PROBLEMS: ' + '; '.join(report.problems)}")
    finally:
        postgres.close()
        if args.keep:
            say(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    command = "bench/faults.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    summary = (
        f"`.venv/bin/python {command.strip()}`, {started:%Y-%m-%d %H:%M} UTC, on {os.cpu_count()} cores "
        f"(Python {platform.python_version()}, {postgres_version(bindir)}, {redis_version()}):\n\n"
        + campaign.markdown(reports)
    )
    print(summary)
    if args.docs:
        text = DOCS_FILE.read_text()
        head, _, rest = text.partition(MARK_START)
        _, _, tail = rest.partition(MARK_END)
        DOCS_FILE.write_text(f"{head}{MARK_START}\n{summary}\n{MARK_END}{tail}")
        say(f"summary written to {DOCS_FILE.relative_to(ROOT)}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"command": command, "started": started.isoformat(), "reports": [r.as_dict() for r in reports]},
                indent=2,
            )
        )
        say(f"figures written to {args.json}")
    return 1 if any(r.problems for r in reports) else 0


def postgres_version(bindir: Path) -> str:
    out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip().replace("postgres (PostgreSQL)", "PostgreSQL") or "PostgreSQL"


def redis_version() -> str:
    binary = campaign.redis_server_binary() or "redis-server"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    version = next((part.split("=", 1)[1] for part in out.split() if part.startswith("v=")), "")
    return f"Redis {version}".strip()


if __name__ == "__main__":
    sys.exit(main())
