"""Normalization throughput: recorded activities measured in batches through the real dispatcher
and handler on PostgreSQL, one worker process.

    .venv/bin/python bench/normalize.py [--events 50000] [--batch 1000] [--repeats 3]

Creates a scratch database ``bench_normalize`` (``$BENCH_NORMALIZE_DB`` to name another; dropped and
recreated each repeat), stores signed-off events through the real intake service (not timed), then
times the handler alone, first with the ledger crediting replaced by a no-op (normalization itself),
then as registered (normalize + credit), and claim + handler + status writes until the inbox is
empty. Reports the median of the repeats and, as the in-session baseline, the time to claim and mark
the same rows processed with a no-op handler (the dispatcher's own cost).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ADMIN_URL = os.environ.get("BENCH_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres")
DB_NAME = os.environ.get("BENCH_NORMALIZE_DB", "bench_normalize")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=1000, help="inbox rows claimed per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--subjects", type=int, default=5_000, help="distinct unlinked subjects")
    parser.add_argument(
        "--profile", default="", help="write a pyinstrument text profile of the first normalize run here"
    )
    args = parser.parse_args()

    import psycopg

    def recreate() -> None:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {DB_NAME}")

    recreate()
    os.environ["DATABASE_URL"] = ADMIN_URL.rsplit("/", 1)[0] + "/" + DB_NAME
    os.environ.pop("REDIS_URL", None)
    os.environ["HUB_INBOX_BATCH_SIZE"] = str(args.batch)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "clearinghouse.settings")
    os.environ["DJANGO_DEBUG"] = "0"
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-secret-key-not-for-production-use-0123456789")
    os.environ.setdefault("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost")  # required with DJANGO_DEBUG=0
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection, transaction

    from institutions import inbox, intake
    from institutions.handlers import Outcome, handler_for, register, unregister
    from institutions.models import InboxEvent
    from institutions.selectors import institution_verifier
    from institutions.services import institution_register
    from ledger.models import Transfer
    from methodology import services, standard
    from methodology.models import ActFingerprint, CapUsage, NormalizedActivity

    actions = [
        ("transit.metro", "km", lambda r: f"{r.randint(1, 400) / 10}"),
        ("mobility.walking", "step", lambda r: str(r.randint(500, 12000))),
        ("paper.e_bill", "bill", lambda r: "1"),
        ("food.clean_plate", "checkin", lambda r: "1"),
        ("transit.bus", "trip", lambda r: "1"),
        ("energy.electricity_saved", "Wh", lambda r: str(r.randint(100, 5000))),
    ]

    def load() -> None:
        connection.close()
        recreate()
        call_command("migrate", "--noinput", verbosity=0)
        standard._cached = None  # a new database: forget the previous one's registry
        institution_register(code="bench-bank", name="Bench bank", hmac=True)
        verifier = institution_verifier("bench-bank")
        rng = random.Random(7)
        original = intake._kick_processing
        intake._kick_processing = lambda: None  # store only; the timed loop below processes
        try:
            for start in range(0, args.events, 1000):
                events = []
                for n in range(start, min(start + 1000, args.events)):
                    action, unit, quantity = rng.choice(actions)
                    data = {"action": action, "quantity": quantity(rng), "unit": unit}
                    if rng.random() < 0.2:
                        data["fingerprint"] = f"fp-{rng.randint(0, args.events // 4)}"
                    events.append(
                        {
                            "specversion": "1.0",
                            "id": f"e{n}",
                            "source": "/bench",
                            "type": "carbon.activity.recorded",
                            "subject": f"s{rng.randint(0, args.subjects)}",
                            "time": "2026-11-24T08:00:00Z",
                            "data": data,
                        }
                    )
                assert verifier is not None
                intake.events_store(verifier=verifier, webhook_id=f"w{start}", events=events)
        finally:
            intake._kick_processing = original

    def drain() -> float:
        started = time.perf_counter()
        while ids := inbox.inbox_claim():
            inbox.inbox_process(ids)
        return time.perf_counter() - started

    def handler_alone(*, credit: bool = True) -> float:
        """Time only the registered handler with its own writes, one transaction per batch, on
        inbox rows loaded beforehand: normalization without the dispatcher's claim and status writes.
        With ``credit=False`` the ledger crediting (``credits_post``) is replaced by a no-op: the cost
        of normalization itself."""
        handler = handler_for("carbon.activity.recorded")
        assert handler is not None
        original_credits_post = services.credits_post
        if not credit:
            services.credits_post = lambda credits, *, validity_months: None
        ids = list(InboxEvent.objects.order_by("id").values_list("id", flat=True))
        batches = [
            list(InboxEvent.objects.filter(pk__in=ids[i : i + args.batch]).order_by("id"))
            for i in range(0, len(ids), args.batch)
        ]
        elapsed = 0.0
        try:
            for batch in batches:
                started = time.perf_counter()
                with transaction.atomic():
                    outcomes = handler(batch)
                elapsed += time.perf_counter() - started
                assert all(o.status == "processed" for o in outcomes)
        finally:
            services.credits_post = original_credits_post
        return elapsed

    def forget_normalization() -> None:
        """Empty what the handler wrote (not timed), so the same stored events can be measured again."""
        tables = ", ".join(m._meta.db_table for m in (NormalizedActivity, ActFingerprint, CapUsage))
        with connection.cursor() as cursor:
            cursor.execute(f"TRUNCATE {tables}")
        assert not Transfer.objects.exists(), "normalization without crediting posted transfers"

    bare, alone, full, baseline = [], [], [], []
    for repeat in range(args.repeats):
        load()
        if args.profile and repeat == 0:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0002)
            with profiler:
                bare.append(args.events / handler_alone(credit=False))
            Path(args.profile).write_text(profiler.output_text(unicode=True, show_all=False))
        else:
            bare.append(args.events / handler_alone(credit=False))
        assert NormalizedActivity.objects.count() == args.events
        forget_normalization()
        alone.append(args.events / handler_alone())
        assert NormalizedActivity.objects.count() == args.events
        assert Transfer.objects.exists()

        load()
        full.append(args.events / drain())
        processed = InboxEvent.objects.filter(status="processed").count()
        assert processed == args.events, f"only {processed} of {args.events} processed"
        assert NormalizedActivity.objects.count() == args.events

        load()
        handler = handler_for("carbon.activity.recorded")
        unregister("carbon.activity.recorded")
        register("carbon.activity.recorded")(lambda events: [Outcome.processed() for _ in events])
        try:
            baseline.append(args.events / drain())
        finally:
            unregister("carbon.activity.recorded")
            assert handler is not None
            register("carbon.activity.recorded")(handler)
        print(
            f"repeat {repeat + 1}: normalize {bare[-1]:,.0f}/s, normalize + credit {alone[-1]:,.0f}/s, "
            f"through the dispatcher {full[-1]:,.0f}/s, "
            f"dispatcher with a no-op handler {baseline[-1]:,.0f}/s",
            file=sys.stderr,
        )

    connection.close()
    n, a = statistics.median(bare), statistics.median(alone)
    f, b = statistics.median(full), statistics.median(baseline)
    print(f"events: {args.events:,}, batches of {args.batch}, medians of {args.repeats} runs")
    print("| measurement | activities/s |")
    print("|---|---|")
    print(f"| normalize: handler alone, crediting replaced by a no-op (measure, caps, fingerprints, COPY) | {n:,.0f} |")
    print(f"| normalize + credit: handler alone with its ledger transfers | {a:,.0f} |")
    print(f"| through the dispatcher (claim, handler, status writes) | {f:,.0f} |")
    print(f"| baseline: dispatcher with a no-op handler | {b:,.0f} |")
    print(f"| ratio: dispatcher path / no-op baseline | {f / b:.2f} |")


if __name__ == "__main__":
    main()
