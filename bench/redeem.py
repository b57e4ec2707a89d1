#!/usr/bin/env python
"""Redemption holds through the real HTTP API: ``POST /api/v1/me/redemptions`` under gunicorn and PostgreSQL.

One run measures, against one gunicorn server started here (the configuration of ``bench/intake.py``):

* ``bare``    a bare Django view answering 200 (``bench/urls.py``): the server's own ceiling;
* ``wallet``  ``GET /api/v1/me/wallet``: the same token authentication and person lookup as a hold, and
  a read of the person's lots: the same-session baseline of an authenticated person request;
* ``hold``    ``POST /api/v1/me/redemptions`` for a reward without stock, each request from the next of
  ``--persons`` distinct wallets in turn and with its own ``Idempotency-Key``;
* ``stocked`` the same for a reward with stock (``--stock`` units), whose row every hold updates: what
  one hot reward costs.

each ``--repeats`` times, interleaved (bare, wallet, hold, stocked, bare, ...), with ``--clients``
connections from one ``wrk`` process replaying requests built before the phase (each sent at most once:
every key is new). After each hold phase the redemptions are counted: every ``201`` must have made one.
At the end the ledger's invariants are checked (``ledger.selectors.ledger_check``).

The database ``--db-name`` (default ``bench_redeem``) is dropped and recreated; persons, their API tokens
and their wallet lots are written directly (not timed): ``--persons`` persons, each with ``--lots`` lots
across three issuers and several expiry months. Redis database ``--redis-url`` is flushed before and
after; no Celery worker runs, so the webhooks stay in the outbox and the delivery wake-ups queue in Redis.
Results go to stdout, to ``docs/performance.md`` (between this benchmark's markers) and, raw, to
``bench/results/`` (git-ignored).

    .venv/bin/python bench/redeem.py                               # the documented run (about 4 minutes)
    .venv/bin/python bench/redeem.py --duration 5 --repeats 1 --no-docs   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.intake import (  # noqa: E402 (the path above first)
    DOCS_FILE,
    CpuMeter,
    add_load_arguments,
    add_server_arguments,
    docs_block_write,
    flush_redis,
    machine_note,
    phases_chosen,
    phases_interleaved,
    raw_results_write,
    recreate_database,
    run_wrk,
    scratch_cleanup,
    start_server,
    stop_server,
)
from bench.intake import bench_env as intake_bench_env  # noqa: E402

MARK_START = "<!-- bench/redeem.py results: start (generated, do not edit by hand) -->"
MARK_END = "<!-- bench/redeem.py results: end -->"
PHASES = ("bare", "wallet", "hold", "stocked")
TARGETS = {"holds_per_s": 500.0, "hold_p99_ms": 100.0}
PROVIDER = "bench-coffee"
ISSUERS = ("bench-bank-a", "bench-bank-b", "bench-bus")
REWARD_POINTS = 25


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/redeem.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_load_arguments(parser)
    parser.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ",".join(PHASES))
    parser.add_argument("--persons", type=int, default=2000, help="distinct wallets the holds cycle through")
    parser.add_argument("--lots", type=int, default=6, help="wallet lots per person (issuers x months)")
    parser.add_argument("--stock", type=int, default=10_000_000, help="units of the stocked reward")
    add_server_arguments(parser, port=8918, db_name="bench_redeem", redis_url="redis://127.0.0.1:6379/14")
    parser.add_argument(
        "--server-side-binding",
        action="store_true",
        help="an experiment: serve with Django's server_side_binding and prepared plans (bench/settings_bench.py)",
    )
    args = parser.parse_args(argv)
    phases_chosen(parser, args, PHASES)
    return args


def bench_env(args: argparse.Namespace, var_dir: Path) -> dict[str, str]:
    """The intake benchmark's server environment, plus the server-side binding switch."""
    return {**intake_bench_env(args, var_dir), "BENCH_SERVER_SIDE_BINDING": "1" if args.server_side_binding else "0"}


# --- Data: institutions, rewards, persons with tokens and lots ------------------------------------------


def populate(args: argparse.Namespace) -> list[str]:
    """Migrate, register the institutions and rewards, and make the persons; returns their API tokens."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import transaction
    from rest_framework.authtoken.models import Token

    from institutions.models import Institution
    from institutions.services import institution_register
    from ledger.services import AccountKey, TransferSpec, accounts_ensure, lot_expiry, transfers_post
    from settlement.services import reward_create
    from wallets.models import Person

    call_command("migrate", verbosity=0, interactive=False)
    institution_register(code=PROVIDER, name="Bench Coffee", hmac=True, is_provider=True)
    issuers = []
    for code in ISSUERS:
        institution_register(code=code, name=code, hmac=True)
        issuers.append(Institution.objects.get(code=code).pk)
    provider = Institution.objects.get(code=PROVIDER)
    reward_create(provider=provider, code="coffee", title="Coffee", points=REWARD_POINTS)
    reward_create(provider=provider, code="mug", title="Mug", points=REWARD_POINTS, stock=args.stock)

    user_model = get_user_model()
    nonce = uuid.uuid4().hex[:8]
    with transaction.atomic():
        users = user_model.objects.bulk_create(
            [user_model(username=f"bench-{nonce}-{n}", password="!") for n in range(args.persons)]  # noqa: S106
        )
        persons = Person.objects.bulk_create([Person(user=user) for user in users])
        tokens = Token.objects.bulk_create([Token(key=Token.generate_key(), user=user) for user in users])
    rng = random.Random(11)
    today = date.today()
    months = [lot_expiry(date(today.year + (today.month + m) // 12, (today.month + m) % 12 + 1, 1)) for m in range(24)]
    specs: list[tuple[AccountKey, AccountKey, int]] = []
    for person in persons:
        for n in range(args.lots):
            issuer = issuers[n % len(issuers)]
            lot = AccountKey.wallet_lot(person_id=person.pk, issuer_id=issuer, expires_on=months[(n * 5) % 24])
            # 2,000 to 6,000 points a lot, in milligrams not always whole points.
            specs.append((AccountKey.issuer_outstanding(issuer_id=issuer), lot, rng.randint(2_000_000, 6_000_000)))
    for start in range(0, len(specs), 1000):
        chunk = specs[start : start + 1000]
        with transaction.atomic():
            ids = accounts_ensure(keys=[key for spec in chunk for key in spec[:2]])
            transfers_post(
                transfers=[
                    TransferSpec(
                        idempotency_key=f"bench-credit:{start + n}",
                        kind="credit",
                        legs=[(ids[outstanding], -mg), (ids[lot], mg)],
                    )
                    for n, (outstanding, lot, mg) in enumerate(chunk)
                ]
            )
    return [token.key for token in tokens]


def redemptions_count() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM settlement_redemption")
        return int(cursor.fetchone()[0])


# --- Requests ---------------------------------------------------------------------------------------------


class RequestMaker:
    """Raw HTTP/1.1 requests: each hold from the next person in turn, each with a fresh Idempotency-Key."""

    def __init__(self, tokens: list[str], host: str) -> None:
        self.tokens = tokens
        self.host = host
        self.turn = 0

    def hold(self, reward: str) -> bytes:
        token = self.tokens[self.turn % len(self.tokens)]
        self.turn += 1
        body = json.dumps({"reward": reward, "quantity": 1}, separators=(",", ":")).encode()
        head = (
            f"POST /api/v1/me/redemptions HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Token {token}\r\nIdempotency-Key: {uuid.uuid4()}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    def wallet(self) -> bytes:
        token = self.tokens[self.turn % len(self.tokens)]
        self.turn += 1
        return f"GET /api/v1/me/wallet HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Token {token}\r\n\r\n".encode()

    def write(self, path: Path, count: int, phase: str) -> None:
        with path.open("wb") as out:
            for _ in range(count):
                raw = self.wallet() if phase == "wallet" else self.hold("coffee" if phase == "hold" else "mug")
                out.write(b"%d\n" % len(raw))
                out.write(raw)


@dataclass
class PhaseResult:
    phase: str
    repeat: int  # 0 = warm-up
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    completed: int
    issued: int
    non_2xx: int
    socket_errors: int
    created: int = 0
    cut_off: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def unexplained(self) -> int:
        """For hold phases: acknowledged holds missing, or redemptions beyond what cut-off requests explain."""
        if self.phase not in ("hold", "stocked"):
            return 0
        acknowledged = self.completed - self.non_2xx
        return max(0, acknowledged - self.created) + max(0, self.created - acknowledged - self.cut_off)


class Bench:
    def __init__(self, args: argparse.Namespace, tokens: list[str], server_pid: int, work_dir: Path) -> None:
        self.args = args
        self.maker = RequestMaker(tokens, f"127.0.0.1:{args.port}")
        self.meter = CpuMeter(server_pid, args.db_name)
        self.work_dir = work_dir
        self.estimate = {"wallet": 1500.0, "hold": 800.0, "stocked": 800.0}

    def run_phase(self, phase: str, repeat: int, duration: float) -> PhaseResult:
        for _attempt in range(4):
            target = "GET:/bench/bare"
            if phase != "bare":
                path = self.work_dir / f"{phase}.requests"
                self.maker.write(path, int(self.estimate[phase] * duration * 1.5) + 8 * self.args.clients, phase)
                target = str(path)
            before = redemptions_count()
            cpu_before = self.meter.sample()
            raw = run_wrk(self.args, target, duration)
            cpu = CpuMeter.delta(cpu_before, self.meter.sample())
            seconds = raw["duration_us"] / 1e6
            if phase != "bare":
                self.estimate[phase] = max(self.estimate[phase], raw["completed"] / seconds)
                if raw["exhausted"]:
                    self.estimate[phase] *= 2
                    print(f"  {phase}: ran out of prepared requests; retrying with more", flush=True)
                    continue
            break
        else:
            raise SystemExit(f"{phase}: could not prepare enough requests")
        latency = raw["latency_us"]
        errors = raw["errors"]
        result = PhaseResult(
            phase=phase,
            repeat=repeat,
            requests_per_s=raw["completed"] / seconds,
            p50_ms=latency["p50"] / 1000,
            p90_ms=latency["p90"] / 1000,
            p99_ms=latency["p99"] / 1000,
            max_ms=latency["max"] / 1000,
            completed=raw["completed"],
            issued=raw["issued"],
            non_2xx=errors["status"],
            socket_errors=errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
            created=redemptions_count() - before,
            cut_off=max(0, raw["issued"] - raw["completed"]),
            cpu_s=cpu,
        )
        label = "warm-up" if repeat == 0 else f"run {repeat}"
        per_request = ", ".join(f"{k} {1e6 * v / max(result.completed, 1):.0f}" for k, v in cpu.items())
        print(
            f"  {phase:7} {label:7} {result.requests_per_s:7.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
            f"p99 {result.p99_ms:6.2f} ms  CPU µs/req: {per_request}"
            + (f"  | created {result.created}" if phase in ("hold", "stocked") else "")
            + (f"  !! non-2xx {result.non_2xx}, socket errors {result.socket_errors}" if result.non_2xx else ""),
            flush=True,
        )
        return result


# --- Report ---------------------------------------------------------------------------------------------


def summarize(results: list[PhaseResult]) -> dict[str, Any]:
    measured = [r for r in results if r.repeat > 0]
    summary: dict[str, Any] = {}
    for phase in PHASES:
        rows = [r for r in measured if r.phase == phase]
        if not rows:
            continue
        summary[phase] = {
            "requests_per_s": statistics.median(r.requests_per_s for r in rows),
            "p50_ms": statistics.median(r.p50_ms for r in rows),
            "p99_ms": statistics.median(r.p99_ms for r in rows),
            "web_cpu_us": statistics.median(1e6 * r.cpu_s.get("web", 0) / max(r.completed, 1) for r in rows),
            "db_cpu_us": statistics.median(1e6 * r.cpu_s.get("postgres", 0) / max(r.completed, 1) for r in rows),
            "runs": len(rows),
        }
    by_repeat = {(r.phase, r.repeat): r for r in measured}
    for phase in ("hold", "stocked"):
        ratios = [
            r.requests_per_s / by_repeat[("wallet", r.repeat)].requests_per_s
            for r in measured
            if r.phase == phase and ("wallet", r.repeat) in by_repeat
        ]
        if ratios:
            summary[f"{phase}_vs_wallet"] = statistics.median(ratios)
    summary["non_2xx"] = sum(r.non_2xx for r in results if r.phase != "bare")
    summary["unexplained"] = sum(r.unexplained for r in results)
    return summary


def verdicts(summary: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    out = []
    if "hold" in summary:
        rate, p99 = summary["hold"]["requests_per_s"], summary["hold"]["p99_ms"]
        out.append(
            (
                "holds/s (distinct wallets)",
                f">= {TARGETS['holds_per_s']:.0f}",
                f"{rate:,.0f}",
                rate >= TARGETS["holds_per_s"],
            )
        )
        out.append(("hold p99", f"< {TARGETS['hold_p99_ms']:.0f} ms", f"{p99:.1f} ms", p99 < TARGETS["hold_p99_ms"]))
    clean = not summary["unexplained"] and not summary["non_2xx"]
    out.append(("every 201 made exactly one redemption; no error answers", "yes", "yes" if clean else "no", clean))
    return out


NAMES = {
    "bare": "bare Django view (server ceiling)",
    "wallet": "baseline: `GET /me/wallet` (token auth, person, lots read)",
    "hold": "`POST /me/redemptions`, reward without stock",
    "stocked": "`POST /me/redemptions`, one stocked reward (hot row)",
}


def render(
    args: argparse.Namespace,
    results: list[PhaseResult],
    summary: dict[str, Any],
    command: str,
    started: datetime,
    machine: str,
    invariants: str,
) -> str:
    lines = [
        MARK_START,
        "",
        f"Command (from the repository root): `{command}`",
        "",
        f"Run {started:%Y-%m-%d %H:%M} UTC. Machine: {machine}",
        "",
        f"Server: gunicorn `--worker-class {args.worker_class} --workers {args.workers} --threads {args.threads} "
        f"--keep-alive 30`, `DJANGO_DEBUG=0`; {args.clients} connections from one `wrk` process; {args.persons:,} "
        f"persons with {args.lots} lots each, holds taking {REWARD_POINTS} points from each person in turn; "
        f"{args.duration:g} s per run after a {args.warmup:g} s warm-up, {args.repeats} runs per phase interleaved; "
        "medians below."
        + (" Server-side binding with prepared plans (`--server-side-binding`)." if args.server_side_binding else "")
        + (f" Note: {args.label}." if args.label else ""),
        "",
        "| phase | requests/s | p50 ms | p99 ms | web CPU µs/req | PostgreSQL CPU µs/req |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for phase in PHASES:
        if phase in summary:
            s = summary[phase]
            lines.append(
                f"| {NAMES[phase]} | {s['requests_per_s']:,.0f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} "
                f"| {s['web_cpu_us']:,.0f} | {s['db_cpu_us']:,.0f} |"
            )
    lines += ["", "| target | required | measured (median) | |", "|---|---|---|---|"]
    for name, required, measured, passed in verdicts(summary):
        lines.append(f"| {name} | {required} | {measured} | {'met' if passed else '**missed**'} |")
    ratios = [
        f"{p} / wallet {summary[f'{p}_vs_wallet']:.0%}" for p in ("hold", "stocked") if f"{p}_vs_wallet" in summary
    ]
    lines += [
        "",
        f"Ratios (median of per-run ratios): {'; '.join(ratios) or 'n/a'}. Ledger check afterwards: {invariants}.",
    ]
    lines += [
        "",
        "<details><summary>Every run</summary>",
        "",
        "| phase | run | requests/s | p50 ms | p99 ms | max ms | redemptions made | non-2xx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        run = "warm-up" if r.repeat == 0 else str(r.repeat)
        made = f"{r.created:,}" if r.phase in ("hold", "stocked") else ""
        lines.append(
            f"| {r.phase} | {run} | {r.requests_per_s:,.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.max_ms:.1f} "
            f"| {made} | {r.non_2xx} |"
        )
    lines += ["", "</details>", "", MARK_END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is required (Debian/Ubuntu: apt-get install -y wrk).")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", args.db_name):
        raise SystemExit(f"--db-name {args.db_name!r}: use a plain lower-case identifier")
    started = datetime.now(UTC)
    command = shlex.join([".venv/bin/python", "bench/redeem.py", *(sys.argv[1:] if argv is None else argv)])
    work_dir = Path(tempfile.mkdtemp(prefix="bench-redeem-"))
    os.environ.update(bench_env(args, work_dir))
    recreate_database(args.pg_admin_url, args.db_name)
    flush_redis(args.redis_url)
    import django

    django.setup()
    from ledger.selectors import ledger_check

    server = None
    try:
        print(f"Populating {args.persons:,} persons with {args.lots} lots each ...", flush=True)
        tokens = populate(args)
        machine = machine_note(args)
        print(f"Machine: {machine}", flush=True)
        server = start_server(args, dict(os.environ), work_dir / "gunicorn.log")
        bench = Bench(args, tokens, server.pid, work_dir)
        results = phases_interleaved(bench.run_phase, args)
        stop_server(server)
        server = None
        problems = ledger_check()
        invariants = "all hold" if not problems else "; ".join(str(p) for p in problems[:3])
    finally:
        scratch_cleanup(args, server, work_dir)

    summary = summarize(results)
    summary["ledger_check"] = invariants
    block = render(args, results, summary, command, started, machine, invariants)
    print()
    print(block)
    raw = {"command": command, "started": started.isoformat(), "machine": machine, "args": vars(args)}
    raw_path = raw_results_write("redeem", started, {**raw, "summary": summary, "runs": [asdict(r) for r in results]})
    if not args.no_docs:
        docs_block_write(block, start=MARK_START, end=MARK_END, heading="Redemption holds")
        print(f"\nWrote {DOCS_FILE.relative_to(ROOT)} and {raw_path.relative_to(ROOT)}")
    if summary["unexplained"] or problems:
        print("ERROR: redemptions do not match the answers, or the ledger check failed", file=sys.stderr)
        return 2
    failed = [name for name, _, _, passed in verdicts(summary) if not passed]
    if failed:
        print(f"Targets missed: {', '.join(failed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
