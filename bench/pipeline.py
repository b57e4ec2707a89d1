"""End to end: signed events through the HTTP intake to credited wallets, one web server and one worker.

    .venv/bin/python bench/pipeline.py [--events 20000] [--batch 250] [--repeats 3] [--senders 4]

Starts, as ``bench/intake.py`` does (its helpers are reused): a fresh database ``bench_pipeline``, the
institution ``bench-bank`` (HMAC), gunicorn ``gthread`` with 2 workers x 4 threads on
``bench.settings_bench`` and, unlike the intake benchmark, **one Celery worker process**
(``celery -A clearinghouse worker -Q intake --pool solo``: one process, one task at a time) on the
same database and a Redis database of its own (``/14``, flushed before and after). ``--subjects``
subjects send events; three in four are linked to a person beforehand (users, persons and
memberships bulk-inserted: the state ``account_link`` leaves), so their credits land in wallet lots,
the others' in holding lots. Events are ``carbon.activity.recorded`` of five uncapped scenarios;
one in three carries a fingerprint, and about one in a hundred repeats its subject's previous one (a
duplicate act: measured, credited 0 mg, no transfer).

Each repeat runs two phases of ``--events`` events in batches of ``--batch``, sent from ``--senders``
threads over keep-alive connections, with requests signed just before the phase:

- **burst**: everything as fast as the senders go. Reports the intake rate (events / time to the
  last 202) and the end-to-end rate (events / time from the first request to the last credit);
- **paced**: the same number of events at ``--paced-share`` (0.5) of the burst's end-to-end rate,
  where the worker keeps up: the latency from acceptance (the client receiving the 202) to credit
  (``ledger_transfer.created_at`` of the event's ``activity:<inbox id>`` transfer, set in the worker's
  transaction just before it commits; ``NormalizedActivity.created_at`` for an activity credited 0).

After each phase it waits for the inbox to drain, then checks every accepted event: one inbox row,
``processed``, exactly one activity, and exactly one ``activity:<id>`` transfer whose credited legs
equal the activity's ``credited_mg`` when that is above 0 (none when 0); ``ledger_check`` at the end.
A warm-up phase (not reported) starts the worker and fills the caches. Prints medians of the repeats
as markdown tables, with the CPU each process group used per event (from ``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.intake import (  # noqa: E402 (after the path is set)
    CpuMeter,
    _proc_ticks,
    bench_env,
    flush_redis,
    recreate_database,
    register_institution,
    scratch_cleanup,
    start_server,
)

ACTIONS = (
    ("transit.metro", "km", lambda r: f"{r.randint(5, 300) / 10:.1f}"),
    ("transit.bus", "trip", lambda r: "1"),
    ("paper.e_bill", "bill", lambda r: "1"),
    ("mobility.cycling", "trip", lambda r: "1"),
    ("food.no_cutlery", "order", lambda r: "1"),
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000, help="events per phase")
    parser.add_argument("--batch", type=int, default=250, help="events per request (100-500)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--senders", type=int, default=4, help="client threads, one keep-alive connection each")
    parser.add_argument("--subjects", type=int, default=2000)
    parser.add_argument("--paced-share", type=float, default=0.5, help="paced rate / burst end-to-end rate")
    parser.add_argument("--warmup-events", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, default=4, help="gunicorn threads per worker")
    parser.add_argument("--worker-class", default="gthread")
    parser.add_argument("--port", type=int, default=8919)
    parser.add_argument("--pg-admin-url", default="postgres://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--db-name", default="bench_pipeline")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="flushed before and after")
    parser.add_argument("--drain-timeout", type=float, default=300.0, help="seconds to wait for the inbox")
    parser.add_argument("--keep-db", action="store_true")
    parser.add_argument(
        "--profile-worker", default="", help="run the Celery worker under pyinstrument and write its text profile here"
    )
    return parser.parse_args()


# --- Requests ---------------------------------------------------------------------------------------


@dataclass
class Request:
    body: bytes
    headers: dict[str, str]
    event_ids: list[str]
    due: float = 0.0  # seconds after the phase start (0: at once)
    sent: float = 0.0  # wall clock (time.time())
    answered: float = 0.0
    status: int = 0
    accepted: int = 0


class Maker:
    def __init__(self, institution: Any, subjects: int, seed: int) -> None:
        self.institution = institution
        self.subjects = subjects
        self.rng = random.Random(seed)
        self.last_print: dict[int, str] = {}

    def event(self, event_id: str, now: datetime) -> dict[str, Any]:
        subject = self.rng.randrange(self.subjects)
        action, unit, quantity = ACTIONS[self.rng.randrange(len(ACTIONS))]
        data: dict[str, Any] = {"action": action, "quantity": quantity(self.rng), "unit": unit}
        roll = self.rng.random()
        if roll < 0.01 and subject in self.last_print:
            data["fingerprint"] = self.last_print[subject]  # the same act again: a duplicate
        elif roll < 0.34:
            data["fingerprint"] = self.last_print[subject] = uuid.uuid4().hex
        return {
            "specversion": "1.0",
            "id": event_id,
            "source": "/bench-bank/app",
            "type": "carbon.activity.recorded",
            "subject": f"cust-{subject}",
            "time": (now - timedelta(seconds=self.rng.randint(0, 3600))).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "data": data,
        }

    def requests(self, prefix: str, count: int, batch: int) -> list[Request]:
        from institutions import crypto

        now = datetime.now(UTC)
        out = []
        for start in range(0, count, batch):
            events = [self.event(f"{prefix}-{n}", now) for n in range(start, min(start + batch, count))]
            body = json.dumps(events, separators=(",", ":")).encode()
            headers = crypto.webhook_headers(
                body,
                msg_id=f"msg_{prefix}_{start}",
                timestamp=int(time.time()),
                hmac_secrets=self.institution.hmac_secrets,
            )
            headers["Content-Type"] = "application/cloudevents-batch+json"
            out.append(Request(body=body, headers=headers, event_ids=[e["id"] for e in events]))
        return out


def send_all(requests: list[Request], port: int, senders: int, path: str) -> float:
    """Send the requests from ``senders`` threads, each waiting for a request's ``due`` time; returns the
    wall-clock start of the phase."""
    work: queue.Queue[Request | None] = queue.Queue()
    start_wall = time.time() + 0.05
    start_mono = time.monotonic() + 0.05
    for r in requests:
        work.put(r)
    for _ in range(senders):
        work.put(None)
    errors: list[BaseException] = []

    def sender() -> None:
        conn = HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            while (r := work.get()) is not None:
                delay = start_mono + r.due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                r.sent = time.time()
                conn.request("POST", path, body=r.body, headers=r.headers)
                response = conn.getresponse()
                payload = response.read()
                r.answered = time.time()
                r.status = response.status
                if response.status == 202:
                    r.accepted = sum(1 for x in json.loads(payload)["results"] if x["status"] == "accepted")
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"a sender failed: {errors[0]!r}")
    return start_wall


# --- Phases -----------------------------------------------------------------------------------------


@dataclass
class PhaseResult:
    phase: str
    events: int
    intake_rate: float
    end_to_end_rate: float
    latencies_ms: list[float] = field(default_factory=list)
    credited: int = 0
    cpu_us: dict[str, float] = field(default_factory=dict)
    offered_rate: float = 0.0

    def p(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    args = parse_args()
    work_dir = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    env = bench_env(args, work_dir)
    env["DJANGO_SECRET_KEY"] = secrets.token_urlsafe(48)
    os.environ.update(env)
    recreate_database(args.pg_admin_url, args.db_name)
    flush_redis(args.redis_url)
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.db import connection

    from institutions import crypto
    from institutions.models import Institution as InstitutionModel
    from ledger.selectors import ledger_check
    from wallets.models import Membership, Person

    server: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    results: list[tuple[PhaseResult, PhaseResult]] = []
    try:
        institution = register_institution("v1")
        inst = InstitutionModel.objects.get(code=institution.code)
        # Three subjects in four linked to a person: the rows account_link would leave.
        linked = [s for s in range(args.subjects) if s % 4 != 3]
        users = get_user_model().objects.bulk_create(
            [get_user_model()(username=f"bench-{s}", password="!") for s in linked]  # noqa: S106 (unusable)
        )
        persons = Person.objects.bulk_create([Person(user=u) for u in users])
        Membership.objects.bulk_create(
            [
                Membership(
                    institution=inst,
                    person=p,
                    subject_ref=crypto.subject_ref(inst.code, f"cust-{s}"),
                    subject_sealed=crypto.seal(f"cust-{s}"),
                )
                for s, p in zip(linked, persons, strict=True)
            ]
        )
        connection.close()

        server = start_server(args, dict(os.environ), work_dir / "gunicorn.log")
        worker_log = (work_dir / "celery.log").open("wb")
        profiler = (
            ["-m", "pyinstrument", "-o", args.profile_worker, "-r", "text", "--interval", "0.0005"]
            if args.profile_worker
            else []
        )
        worker = subprocess.Popen(
            [
                sys.executable,
                *profiler,
                "-m",
                "celery",
                "-A",
                "clearinghouse",
                "worker",
                "-Q",
                "intake",
                "--pool",
                "solo",
                "--loglevel",
                "WARNING",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                f"bench-pipeline-{os.getpid()}@%h",
            ],
            env=dict(os.environ),
            stdout=worker_log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        meter = CpuMeter(server.pid, args.db_name)
        maker = Maker(institution, args.subjects, seed=7)
        path = f"/api/v1/institutions/{institution.code}/events"

        def run_phase(name: str, prefix: str, count: int, rate: float = 0.0) -> PhaseResult:
            requests = maker.requests(prefix, count, args.batch)
            if rate:
                for i, r in enumerate(requests):
                    r.due = i * args.batch / rate
            cpu_before, worker_before = meter.sample(), _proc_ticks(worker.pid)
            start = send_all(requests, args.port, args.senders, path)
            bad = [r for r in requests if r.status != 202 or r.accepted != len(r.event_ids)]
            if bad:
                raise SystemExit(f"{name}: {len(bad)} requests not fully accepted (first: {bad[0].status})")
            last_202 = max(r.answered for r in requests)
            rows = wait_and_check(prefix, count, args.drain_timeout, inst.pk)
            cpu = CpuMeter.delta(cpu_before, meter.sample())
            cpu["worker"] = (_proc_ticks(worker.pid) - worker_before) / os.sysconf("SC_CLK_TCK")
            accepted_at = {e: r.answered for r in requests for e in r.event_ids}
            credited_at = {e: at for e, at, _ in rows}
            last_credit = max(credited_at.values())
            return PhaseResult(
                phase=name,
                events=count,
                intake_rate=count / (last_202 - start),
                end_to_end_rate=count / (last_credit - start),
                latencies_ms=[1000 * (credited_at[e] - accepted_at[e]) for e in accepted_at],
                credited=sum(1 for _, _, mg in rows if mg > 0),
                cpu_us={k: 1e6 * v / count for k, v in cpu.items()},
                offered_rate=rate,
            )

        warm = run_phase("warm-up", "warm", args.warmup_events)
        print(f"warm-up: {warm.end_to_end_rate:,.0f} events/s end to end", file=sys.stderr, flush=True)
        for repeat in range(1, args.repeats + 1):
            burst = run_phase("burst", f"b{repeat}", args.events)
            paced = run_phase("paced", f"p{repeat}", args.events, rate=args.paced_share * burst.end_to_end_rate)
            results.append((burst, paced))
            print(
                f"repeat {repeat}: burst intake {burst.intake_rate:,.0f}/s, end to end "
                f"{burst.end_to_end_rate:,.0f}/s (p99 {burst.p(0.99):,.0f} ms); paced at "
                f"{paced.offered_rate:,.0f}/s: end to end {paced.end_to_end_rate:,.0f}/s, p50 {paced.p(0.5):.0f} ms, "
                f"p99 {paced.p(0.99):.0f} ms",
                file=sys.stderr,
                flush=True,
            )
        problems = ledger_check()
        assert not problems, problems
        kinds = lot_kinds()
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        scratch_cleanup(args, server, work_dir)
    report(args, results, kinds)


def wait_and_check(prefix: str, count: int, timeout: float, institution_id: int) -> list[tuple[str, float, int]]:
    """Wait until the phase's events are all processed, then check each; ``(event id, credited at, mg)``."""
    from django.db import connection

    deadline = time.monotonic() + timeout
    like = f"{prefix}-%"
    while True:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM institutions_inboxevent WHERE institution_id = %s "
                "AND event_id LIKE %s AND status <> 'received'",
                [institution_id, like],
            )
            done = cursor.fetchone()[0]
        if done >= count:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"{prefix}: only {done} of {count} events left 'received' after {timeout:.0f} s")
        time.sleep(0.1)
    with connection.cursor() as cursor:
        cursor.execute(
            """SELECT e.event_id, e.status, a.credited_mg, a.created_at, t.n, t.created_at, t.credited
                 FROM institutions_inboxevent e
                 LEFT JOIN methodology_normalizedactivity a ON a.inbox_event_id = e.id
                 LEFT JOIN LATERAL (
                      SELECT count(DISTINCT tr.id) AS n, max(tr.created_at) AS created_at,
                             sum(p.amount) FILTER (WHERE p.amount > 0) AS credited
                        FROM ledger_transfer tr LEFT JOIN ledger_posting p ON p.transfer_id = tr.id
                       WHERE tr.idempotency_key = 'activity:' || e.id) t ON true
                WHERE e.institution_id = %s AND e.event_id LIKE %s""",
            [institution_id, like],
        )
        rows = cursor.fetchall()
    assert len(rows) == count, f"{prefix}: {len(rows)} inbox rows for {count} accepted events"
    out = []
    for event_id, status, mg, activity_at, transfers, transfer_at, credited in rows:
        assert status == "processed", (event_id, status)
        assert mg is not None, f"{event_id}: no activity"
        if mg > 0:
            assert transfers == 1 and credited == mg, (event_id, mg, transfers, credited)
            out.append((event_id, transfer_at.timestamp(), mg))
        else:
            assert transfers == 0, (event_id, transfers)
            out.append((event_id, activity_at.timestamp(), mg))
    return out


def lot_kinds() -> dict[str, int]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("""SELECT a.kind, count(*) FROM ledger_posting p JOIN ledger_account a ON a.id = p.account_id
                           WHERE p.amount > 0 GROUP BY a.kind""")
        return dict(cursor.fetchall())


def report(args: argparse.Namespace, results: list[tuple[PhaseResult, PhaseResult]], kinds: dict[str, int]) -> None:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    bursts = [b for b, _ in results]
    paced = [p for _, p in results]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"{args.events:,} events per phase in batches of {args.batch} from {args.senders} sender threads, "
        f"{args.subjects:,} subjects (3 in 4 linked); gunicorn {args.worker_class} {args.workers} workers x "
        f"{args.threads} threads; one Celery worker process (`--pool solo`), inbox batches of 500; "
        f"medians of {args.repeats} repeats; credited postings by account kind over the run: "
        f"{', '.join(f'{k} {v:,}' for k, v in sorted(kinds.items()))}; load average at the end {load}"
    )
    print()
    print(
        "| phase | offered events/s | intake events/s (to the last 202) | end to end events/s (to the last "
        "credit) | p50 ms 202→credit | p99 ms 202→credit | max ms | CPU µs/event: web / worker / PostgreSQL |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, rows in (
        ("burst (as fast as the senders go)", bursts),
        (f"paced ({args.paced_share:.0%} of the burst's end-to-end rate)", paced),
    ):
        offered = "as fast as possible" if rows is bursts else f"{med([r.offered_rate for r in rows]):,.0f}"
        cpu = " / ".join(f"{med([r.cpu_us.get(k, 0) for r in rows]):,.0f}" for k in ("web", "worker", "postgres"))
        print(
            f"| {name} | {offered} | {med([r.intake_rate for r in rows]):,.0f} "
            f"| {med([r.end_to_end_rate for r in rows]):,.0f} | {med([r.p(0.5) for r in rows]):,.0f} "
            f"| {med([r.p(0.99) for r in rows]):,.0f} | {med([max(r.latencies_ms) for r in rows]):,.0f} | {cpu} |"
        )
    credited = sum(r.credited for pair in results for r in pair)
    total = sum(r.events for pair in results for r in pair)
    print()
    print(
        f"Checked: all {total:,} accepted events processed, each with exactly one activity; {credited:,} "
        f"credited above 0 mg, each with exactly one `activity:<id>` transfer crediting exactly `credited_mg`; "
        f"the rest (duplicate acts) with none; `ledger_check` clean."
    )


if __name__ == "__main__":
    main()
