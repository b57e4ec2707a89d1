"""Netting throughput: 1,000,000 gross obligations among 200 institutions, target under 10 s.

    .venv/bin/python bench/netting.py [--obligations 1000000] [--institutions 200] [--repeats 3] [--no-db]

Three measurements, generation never timed:

- in memory, per obligation: ``settlement.netting.net_positions`` + ``instructions`` over 1,000,000 tuples;
- in memory, aggregated: the same obligations summed per (debtor, creditor) pair first (what the database
  hands over), then netted: the aggregation and the netting are both timed;
- PostgreSQL: a scratch database ``bench_netting`` (dropped and recreated), 200 institutions, the
  obligations loaded with COPY (not timed), then ``cycle_cut`` (one UPDATE assigning them all) and
  ``cycle_net`` (one ``GROUP BY debtor, creditor`` aggregate, netting, positions and carries stored,
  commit included) timed separately.

Prints the median of the repeats as a markdown table.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ADMIN_URL = os.environ.get("BENCH_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres")
DB_NAME = "bench_netting"
MINIMUM_MINOR = 100


def generate(count: int, institutions: int, seed: int = 7) -> list[tuple[int, int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        debtor = rng.randrange(institutions)
        creditor = rng.randrange(institutions - 1)
        creditor += creditor >= debtor  # never the debtor itself
        out.append((debtor + 1, creditor + 1, rng.randrange(1, 5_000)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--obligations", type=int, default=1_000_000)
    parser.add_argument("--institutions", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-db", action="store_true", help="skip the PostgreSQL measurement")
    args = parser.parse_args()

    from settlement import netting

    obligations = generate(args.obligations, args.institutions)
    expected = netting.net_positions(obligations)
    rows: list[tuple[str, float]] = []

    def in_memory() -> float:
        started = time.perf_counter()
        positions = netting.net_positions(obligations)
        netting.instructions(positions, MINIMUM_MINOR)
        elapsed = time.perf_counter() - started
        assert positions == expected
        return elapsed

    def aggregated() -> float:
        started = time.perf_counter()
        pairs: dict[tuple[int, int], int] = defaultdict(int)
        for debtor, creditor, amount in obligations:
            pairs[debtor, creditor] += amount
        positions = netting.net_positions((d, c, a) for (d, c), a in pairs.items())
        netting.instructions(positions, MINIMUM_MINOR)
        elapsed = time.perf_counter() - started
        assert positions == expected
        return elapsed

    rows.append(
        ("in memory, per obligation (net + instructions)", statistics.median(in_memory() for _ in range(args.repeats)))
    )
    rows.append(
        ("in memory, aggregate per pair then net", statistics.median(aggregated() for _ in range(args.repeats)))
    )

    if not args.no_db:
        cut, net = database(args, obligations, expected)
        rows.append(("PostgreSQL `cycle_cut` (assign all to the cycle, one UPDATE)", cut))
        rows.append(("PostgreSQL `cycle_net` (GROUP BY debtor, creditor + store)", net))

    print(f"\n{args.obligations:,} obligations among {args.institutions} institutions, median of {args.repeats}:\n")
    print("| path | seconds | obligations/s |")
    print("|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {args.obligations / seconds:,.0f} |")


def database(args: argparse.Namespace, obligations: list[tuple[int, int, int]], expected: dict) -> tuple[float, float]:
    import psycopg

    def recreate() -> None:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {DB_NAME}")

    recreate()
    os.environ["DATABASE_URL"] = ADMIN_URL.rsplit("/", 1)[0] + "/" + DB_NAME
    os.environ.pop("REDIS_URL", None)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "clearinghouse.settings")
    os.environ["DJANGO_DEBUG"] = "0"
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-secret-key-not-for-production-use-0123456789")
    os.environ.setdefault("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost")  # required with DJANGO_DEBUG=0
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from institutions.models import Institution
    from settlement.models import NetPosition
    from settlement.services import cycle_cut, cycle_net

    cuts, nets = [], []
    start = datetime(2030, 1, 1, tzinfo=UTC)
    for repeat in range(args.repeats):
        connection.close()
        recreate()
        call_command("migrate", "--noinput", verbosity=0)
        Institution.objects.bulk_create(
            Institution(id=n, code=f"inst-{n}", name=f"Institution {n}") for n in range(1, args.institutions + 1)
        )
        with connection.cursor() as cursor:
            raw = cursor.connection
            with raw.cursor().copy(
                "COPY settlement_obligation (key, debtor_id, creditor_id, amount_minor, currency, points_mg, source,"
                " created_at) FROM STDIN"
            ) as copy:
                for n, (debtor, creditor, amount) in enumerate(obligations):
                    copy.write_row(
                        (f"bench:{n}:{debtor}>{creditor}", debtor, creditor, amount, "CNY", 0, f"bench:{n}", start)
                    )
            raw.commit()
            cursor.execute("VACUUM ANALYZE settlement_obligation")
        started = time.perf_counter()
        cycle = cycle_cut(now=start + timedelta(hours=1 + repeat))
        cuts.append(time.perf_counter() - started)
        assert cycle is not None, "the bench recorded obligations, so the cut makes a cycle"
        started = time.perf_counter()
        cycle_net(cycle=cycle, minimum_minor=MINIMUM_MINOR)
        nets.append(time.perf_counter() - started)
        stored = dict(NetPosition.objects.filter(cycle=cycle).values_list("institution_id", "net_minor"))
        assert stored == expected, "database netting disagrees with the in-memory figure"
    return statistics.median(cuts), statistics.median(nets)


if __name__ == "__main__":
    main()
