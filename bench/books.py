"""Crediting measured activities into the books: ``ledger.books.credits_post`` on PostgreSQL,
against the same credits one per transaction and against django-hordak's ``transfer_to``.

    .venv/bin/python bench/books.py [--credits 20000] [--batch 1000] [--repeats 3] [--owners 10000]

What one repeat measures (timed: the calls and their commits; not timed: creating the databases):

- **(a) batches, a few issuers**: ``credits_post`` on batches of ``--batch`` credits, one
  transaction per batch (``transaction.atomic()`` around the call, as the dispatcher does). Credit
  ``n`` belongs to owner ``n % owners`` (distinct owners within a batch); one owner in five is an
  unlinked subject (a holding lot), the others persons (wallet lots); owner ``o`` is a customer of
  issuer ``1 + o % issuers``. Measured twice: **new lots** (a fresh ledger: the first credit of each
  owner creates its lot, so half of the 20,000 credits create an account) and **existing lots** (the
  same accounts created beforehand, not timed: every later credit of the month);
- **(a') one hot issuer**: the same, every credit from issuer 1 (one ``issuer_outstanding`` row
  debited by every transfer of every batch);
- **(b) baseline, one per transaction**: the (a) credits, ``credits_post([credit])`` in its own
  transaction each (new lots);
- **(c) the outside peer**: django-hordak 2.0's ``Account.transfer_to`` (its own transaction per
  call, as hordak does it) for the same number of two-leg transfers, from ``--issuers`` issuer
  accounts to one account per owner (all created beforehand, not timed), in a separate scratch
  database ``bench_hordak`` on the same server, run in a child process with ``bench/settings_hordak.py``.

Every repeat starts from a fresh copy of a migrated template database (``bench_books``); after each
run the ledger is checked (``ledger_check``: balances equal postings, transfers balance). Prints the
medians of the repeats and the medians of the per-repeat ratios as markdown tables.

django-hordak is not a dependency of the project; install it into the virtualenv for this benchmark
only (it pulls django-mptt, django-money, py-moneyed, django-import-export, django-extensions):

    .venv/bin/pip install 'django-hordak==2.0.0'

(2.0.0 declares ``django>=4``, is tested upstream on 4.2-5.1, and migrates and runs on Django 5.2.)
``--no-hordak`` skips (c). ``--profile PATH`` writes a pyinstrument profile of one (a) run (new lots).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ADMIN_URL = os.environ.get("BENCH_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres")
DB_NAME = "bench_books"
TEMPLATE_NAME = "bench_books_template"
HORDAK_DB = "bench_hordak"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--credits", type=int, default=20_000, help="credits (transfers) per run")
    parser.add_argument("--batch", type=int, default=1000, help="credits per transaction in (a) and (a')")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--owners", type=int, default=10_000, help="distinct persons and subjects")
    parser.add_argument("--issuers", type=int, default=5, help="issuers in (a) and (b)")
    parser.add_argument("--baseline-credits", type=int, default=None, help="credits in (b) (default: all)")
    parser.add_argument("--hordak-transfers", type=int, default=None, help="transfers in (c) (default: all)")
    parser.add_argument("--no-hordak", action="store_true", help="skip (c)")
    parser.add_argument("--profile", default="", help="write a pyinstrument text profile of one (a) run here")
    parser.add_argument(
        "--disable-triggers",
        choices=("balance", "all"),
        default=None,
        help="diagnostic only, to see what they cost: disable the deferred sum-to-zero trigger on "
        "postings (balance), or every trigger on postings and transfers, foreign-key checks "
        "included (all)",
    )
    parser.add_argument("--hordak-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.owners < args.batch:
        parser.error("--owners must be at least --batch (owners are distinct within a batch)")
    return args


def admin_execute(*statements: str) -> None:
    import psycopg

    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def owner_issuer(owner: int, issuers: int) -> int:
    return 1 + owner % issuers


def amount_mg(n: int) -> int:
    return 1000 + n % 997


@dataclass
class Measurement:
    rate: float  # transfers/s, wall clock, commits included
    outside_share: float  # of the wall time: outside the call (BEGIN and COMMIT, where deferred triggers run)
    client_cpu_us: float  # this process's CPU per transfer
    db_cpu_us: float  # the PostgreSQL backend's CPU per transfer (from /proc)

    def describe(self) -> str:
        return (
            f"{self.rate:,.0f}/s (client {self.client_cpu_us:.0f} µs, db {self.db_cpu_us:.0f} µs, "
            f"outside {self.outside_share:.0%})"
        )


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a local process (the PostgreSQL backend serving a connection)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


# --- (c) the peer, in its own process ---------------------------------------------------------------


def hordak_child(args: argparse.Namespace) -> None:
    """Runs under bench.settings_hordak: a fresh ``bench_hordak``, accounts, then timed transfer_to calls."""
    admin_execute(f"DROP DATABASE IF EXISTS {HORDAK_DB} WITH (FORCE)", f"CREATE DATABASE {HORDAK_DB}")
    import django

    django.setup()
    from decimal import Decimal

    from django.core.management import call_command
    from django.db import connection
    from hordak.models import Account, Leg, Transaction
    from moneyed import Money

    call_command("migrate", "--noinput", verbosity=0)
    issuers = [
        Account.objects.create(name=f"issuer {i} outstanding", type=Account.TYPES.liability, currencies=["EUR"])
        for i in range(1, args.issuers + 1)
    ]
    top = max(a.tree_id for a in issuers)
    # One root account per owner; MPTT fields set directly (a root is lft 1, rght 2, its own tree):
    # Account.objects.create would search the next tree id per account, which takes minutes for 10,000.
    Account.objects.bulk_create(
        [
            Account(
                name=f"lot {o}",
                type=Account.TYPES.asset,
                currencies=["EUR"],
                lft=1,
                rght=2,
                level=0,
                tree_id=top + 1 + o,
            )
            for o in range(args.owners)
        ],
        batch_size=2000,
    )
    lots = dict(Account.objects.filter(type=Account.TYPES.asset).values_list("name", "pk"))
    lot_accounts = {o: Account.objects.get(pk=lots[f"lot {o}"]) for o in range(args.owners)}
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")
        cursor.execute("SELECT pg_backend_pid()")
        backend = cursor.fetchone()[0]
    count = args.hordak_transfers or args.credits
    plan = [
        (
            issuers[owner_issuer(n % args.owners, args.issuers) - 1],
            lot_accounts[n % args.owners],
            Money(Decimal(amount_mg(n)).scaleb(-3), "EUR"),
        )
        for n in range(count)
    ]
    db_before, cpu_before = proc_cpu_seconds(backend), time.process_time()
    started = time.perf_counter()
    for n, (issuer, lot, money) in enumerate(plan):
        issuer.transfer_to(lot, money, description=f"activity:{n + 1}")  # atomic: one transaction each
    elapsed = time.perf_counter() - started
    cpu, db = time.process_time() - cpu_before, proc_cpu_seconds(backend) - db_before
    assert Transaction.objects.count() == count
    assert Leg.objects.count() == 2 * count
    print("RESULT " + json.dumps({"transfers": count, "seconds": elapsed, "cpu": cpu, "db": db}), flush=True)
    connection.close()


def hordak_run(args: argparse.Namespace) -> Measurement:
    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "bench.settings_hordak"
    env["BENCH_HORDAK_URL"] = ADMIN_URL.rsplit("/", 1)[0] + "/" + HORDAK_DB
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--hordak-child",
        "--credits",
        str(args.credits),
        "--owners",
        str(args.owners),
        "--issuers",
        str(args.issuers),
        "--batch",
        str(args.batch),
    ]
    if args.hordak_transfers:
        command += ["--hordak-transfers", str(args.hordak_transfers)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, check=False, cwd=ROOT)
    for line in completed.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT ") :])
            n = r["transfers"]
            return Measurement(n / r["seconds"], float("nan"), 1e6 * r["cpu"] / n, 1e6 * r["db"] / n)
    raise SystemExit(f"hordak run failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}")


# --- (a), (a'), (b) ---------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    if args.hordak_child:
        hordak_child(args)
        return
    if not args.no_hordak:
        try:
            import hordak  # noqa: F401
        except ImportError:
            raise SystemExit(
                "django-hordak is not installed: .venv/bin/pip install 'django-hordak==2.0.0' (or pass --no-hordak)"
            ) from None

    admin_execute(
        f"DROP DATABASE IF EXISTS {TEMPLATE_NAME} WITH (FORCE)",
        f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)",
        f"CREATE DATABASE {DB_NAME}",
    )
    os.environ["DATABASE_URL"] = ADMIN_URL.rsplit("/", 1)[0] + "/" + DB_NAME
    os.environ.pop("REDIS_URL", None)
    os.environ["DJANGO_SETTINGS_MODULE"] = "clearinghouse.settings"
    os.environ["DJANGO_DEBUG"] = "0"
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-secret-key-not-for-production-use-0123456789")
    os.environ.setdefault("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost")  # required with DJANGO_DEBUG=0
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection, transaction

    from institutions.selectors import points_validity_months
    from institutions.services import institution_register
    from ledger.books import Credit, credits_post, lot_expiries
    from ledger.models import Account, Posting, Transfer
    from ledger.selectors import ledger_check
    from ledger.services import AccountKey, accounts_ensure

    # The template: migrated, with the issuers registered. Every run starts from a copy of it.
    call_command("migrate", "--noinput", verbosity=0)
    for i in range(1, args.issuers + 1):
        institution_register(code=f"bench-issuer-{i}", name=f"Bench issuer {i}", hmac=True)
    connection.close()
    admin_execute(f"CREATE DATABASE {TEMPLATE_NAME} TEMPLATE {DB_NAME}")

    def fresh() -> None:
        connection.close()
        admin_execute(
            f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)", f"CREATE DATABASE {DB_NAME} TEMPLATE {TEMPLATE_NAME}"
        )

    def credits_for(hot: bool) -> list[Credit]:
        out = []
        for n in range(args.credits):
            owner = n % args.owners
            issuer = 1 if hot else owner_issuer(owner, args.issuers)
            unlinked = owner % 5 == 4
            out.append(
                Credit(
                    inbox_event_id=n + 1,
                    issuer_id=issuer,
                    person_id=None if unlinked else owner + 1,
                    subject_ref=hashlib.sha256(f"subject-{owner}".encode()).hexdigest() if unlinked else "",
                    local_day=date(2026, 11, 1 + n % 28),
                    milligrams=amount_mg(n),
                )
            )
        return out

    def accounts_create(credits: list[Credit]) -> None:
        """The accounts credits_post will use, created beforehand (the 'existing lots' runs)."""
        days: dict[int, set[date]] = {}
        for c in credits:
            days.setdefault(c.issuer_id, set()).add(c.local_day)
        expiries = lot_expiries(days, points_validity_months(days))
        keys = {AccountKey.issuer_outstanding(issuer_id=i) for i in days}
        for c in credits:
            expires_on = expiries[(c.issuer_id, c.local_day)]
            if c.person_id is not None:
                keys.add(AccountKey.wallet_lot(person_id=c.person_id, issuer_id=c.issuer_id, expires_on=expires_on))
            else:
                keys.add(
                    AccountKey.holding_lot(
                        issuer_id=c.issuer_id,
                        holder_institution_id=c.issuer_id,
                        subject_ref=c.subject_ref,
                        expires_on=expires_on,
                    )
                )
        accounts_ensure(keys=keys)

    def run(credits: list[Credit], batch: int, *, existing: bool, profile: str = "") -> Measurement:
        fresh()
        if existing:
            accounts_create(credits)
        with connection.cursor() as cursor:
            if args.disable_triggers == "balance":
                cursor.execute("ALTER TABLE ledger_posting DISABLE TRIGGER ledger_posting_transfer_balanced")
            elif args.disable_triggers == "all":
                cursor.execute("ALTER TABLE ledger_posting DISABLE TRIGGER ALL")
                cursor.execute("ALTER TABLE ledger_transfer DISABLE TRIGGER ALL")
            cursor.execute("VACUUM ANALYZE")
            cursor.execute("SELECT pg_backend_pid()")
            backend = cursor.fetchone()[0]
        profiler = None
        if profile:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005)
            profiler.start()
        inside = 0.0
        db_before, cpu_before = proc_cpu_seconds(backend), time.process_time()
        started = time.perf_counter()
        for start in range(0, len(credits), batch):
            with transaction.atomic():
                entered = time.perf_counter()
                # The issuers' validity is read per batch, as normalization reads it.
                chunk = credits[start : start + batch]
                credits_post(chunk, validity_months=points_validity_months({c.issuer_id for c in chunk}))
                inside += time.perf_counter() - entered
        elapsed = time.perf_counter() - started
        cpu, db = time.process_time() - cpu_before, proc_cpu_seconds(backend) - db_before
        if profiler is not None:
            profiler.stop()
            Path(profile).write_text(profiler.output_text(unicode=True, color=False, show_all=False))
        assert Transfer.objects.count() == len(credits), Transfer.objects.count()
        assert Posting.objects.count() == 2 * len(credits)
        problems = ledger_check()
        assert not problems, problems
        assert not Account.objects.filter(kind__in=["wallet_lot", "holding_lot"], balance__lt=0).exists()
        n = len(credits)
        return Measurement(n / elapsed, (elapsed - inside) / elapsed, 1e6 * cpu / n, 1e6 * db / n)

    distinct_credits = credits_for(hot=False)
    hot_credits = credits_for(hot=True)
    baseline_credits = distinct_credits[: args.baseline_credits or args.credits]
    rows: dict[str, list[Measurement]] = {k: [] for k in KINDS}
    try:
        if args.profile:
            run(distinct_credits, args.batch, existing=False, profile=args.profile)
            print(f"profile written to {args.profile}", file=sys.stderr)
        for repeat in range(args.repeats):
            rows["a_new"].append(run(distinct_credits, args.batch, existing=False))
            rows["hot_new"].append(run(hot_credits, args.batch, existing=False))
            rows["a_existing"].append(run(distinct_credits, args.batch, existing=True))
            rows["hot_existing"].append(run(hot_credits, args.batch, existing=True))
            rows["b"].append(run(baseline_credits, 1, existing=False))
            if not args.no_hordak:
                rows["c"].append(hordak_run(args))
            print(
                f"repeat {repeat + 1}: " + "; ".join(f"{k} {v[-1].describe()}" for k, v in rows.items() if v),
                file=sys.stderr,
                flush=True,
            )
    finally:
        connection.close()
        admin_execute(
            f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)",
            f"DROP DATABASE IF EXISTS {TEMPLATE_NAME} WITH (FORCE)",
            f"DROP DATABASE IF EXISTS {HORDAK_DB} WITH (FORCE)",
        )
    report(args, rows, len(baseline_credits))


KINDS = ("a_new", "a_existing", "hot_new", "hot_existing", "b", "c")


def report(args: argparse.Namespace, rows: dict[str, list[Measurement]], baseline_count: int) -> None:
    def med(kind: str, attribute: str = "rate") -> float:
        return statistics.median(getattr(m, attribute) for m in rows[kind])

    def ratio(a: str, b: str) -> float:
        return statistics.median(x.rate / y.rate for x, y in zip(rows[a], rows[b], strict=True))

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    hordak = bool(rows["c"])
    print(
        f"credits: {args.credits:,} per run (two postings each), {args.owners:,} owners (one in five an "
        f"unlinked subject), {args.issuers} issuers, batches of {args.batch}; (b): {baseline_count:,} credits"
        f"{'' if not hordak else f'; (c): {args.hordak_transfers or args.credits:,} transfers'}; "
        f"medians of {args.repeats} repeats; PostgreSQL, one process; load average at the end {load}"
    )
    print()
    print(
        "| measurement | transfers/s | client CPU µs/transfer | PostgreSQL backend CPU µs/transfer "
        "| time outside the call (BEGIN, COMMIT) | target |"
    )
    print("|---|---:|---:|---:|---:|---|")
    names = {
        "a_new": f"(a) `credits_post`, batches of {args.batch}, {args.issuers} issuers, new lots",
        "a_existing": "(a) the same, lots already exist",
        "hot_new": f"(a') batches of {args.batch}, one hot issuer, new lots",
        "hot_existing": "(a') the same, lots already exist",
        "b": "(b) baseline: `credits_post`, one credit per transaction, new lots",
        "c": "(c) django-hordak 2.0 `transfer_to`, one per transaction",
    }
    for kind in KINDS:
        if not rows[kind]:
            continue
        target = "≥ 10,000" if kind.startswith(("a_", "hot_")) else ""
        outside = "n/a (inside `transfer_to`)" if kind == "c" else f"{med(kind, 'outside_share'):.0%}"
        print(
            f"| {names[kind]} | {med(kind):,.0f} | {med(kind, 'client_cpu_us'):,.0f} "
            f"| {med(kind, 'db_cpu_us'):,.0f} | {outside} | {target} |"
        )
    print()
    print("| ratio (median of per-repeat ratios) | value | target |")
    print("|---|---:|---|")
    print(f"| (a) new lots / (b) one per transaction | {ratio('a_new', 'b'):.1f} | |")
    if hordak:
        print(f"| (a) new lots / (c) hordak | {ratio('a_new', 'c'):.1f} | ≥ 15 |")
        print(f"| (a) lots exist / (c) hordak | {ratio('a_existing', 'c'):.1f} | ≥ 15 |")
        print(f"| (a') hot issuer, new lots / (c) hordak | {ratio('hot_new', 'c'):.1f} | ≥ 15 |")
        print(f"| (b) one per transaction / (c) hordak | {ratio('b', 'c'):.2f} | |")


if __name__ == "__main__":
    main()
