"""The wallet read: ``GET /api/v1/me/wallet`` for a person with 200 lots and 50,000 activities.

    .venv/bin/python bench/wallet.py [--calls 1000] [--lots-issuers 10] [--lots-months 20] [--activities 50000]

Builds, in a scratch database ``bench_wallet`` (dropped and recreated; not timed):

- ``--lots-issuers`` institutions (registered through ``institution_register``) and one person signed
  up through ``person_signup`` (with their API token), linked at each institution (memberships);
- ``--activities`` inbox rows and as many ``NormalizedActivity`` rows of that person (both by ``COPY``),
  each credited by its own ``activity:<inbox id>`` transfer through ``transfers_post`` (batches of
  1,000) into one of the person's ``issuers x months`` wallet lots (200 by default: 10 issuers x 20
  expiry months, from this month on), so balances equal postings;
- ``--others`` transfers crediting other persons' lots (the ledger is not the person's alone).

Then times ``--calls`` rounds, after ``--warmup`` untimed rounds, each round making these calls in
turn through ``django.test.Client`` (the full middleware stack and DRF, in process, no network):

- the wallet: ``GET /api/v1/me/wallet`` with the person's token;
- baseline 1: ``GET /bench/bare`` (``bench/urls.py``), a Django view that answers 200 (no auth);
- baseline 2: ``GET /api/v1/me/links``, the same token authentication and one small query;
- and ``wallets.selectors.wallet_summary(person)`` called directly (no HTTP).

Reports p50, p99 and max per call and the ratio of the wallet's p99 to the baselines' p99, as a
markdown table. The target: wallet p99 under 20 ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ADMIN_URL = os.environ.get("BENCH_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres")
DB_NAME = "bench_wallet"
PASSWORD = "bench-Wallet-password-8317"  # noqa: S105 (a scratch database's person)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=50, help="untimed rounds first")
    parser.add_argument("--lots-issuers", type=int, default=10)
    parser.add_argument("--lots-months", type=int, default=20)
    parser.add_argument("--activities", type=int, default=50_000)
    parser.add_argument("--others", type=int, default=100_000, help="transfers to other persons' lots")
    parser.add_argument("--keep-db", action="store_true")
    args = parser.parse_args()

    import psycopg

    def admin(statement: str) -> None:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(statement)

    admin(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
    admin(f"CREATE DATABASE {DB_NAME}")
    os.environ["DATABASE_URL"] = ADMIN_URL.rsplit("/", 1)[0] + "/" + DB_NAME
    os.environ.pop("REDIS_URL", None)
    os.environ["DJANGO_SETTINGS_MODULE"] = "bench.settings_bench"
    os.environ["DJANGO_DEBUG"] = "0"
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-secret-key-not-for-production-use-0123456789")
    os.environ.setdefault("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost")  # required with DJANGO_DEBUG=0
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client
    from psycopg.types.json import Jsonb

    from clearinghouse.db import copy_rows
    from institutions import crypto
    from institutions.models import InboxEvent, Institution
    from institutions.services import institution_register
    from ledger.books import add_months
    from ledger.services import AccountKey, TransferSpec, accounts_ensure, lot_expiry, transfers_post
    from ledger.units import standard_today
    from methodology.models import FactorVersion, NormalizedActivity, Scenario
    from methodology.services import _ACTIVITY_COLUMNS
    from wallets.models import Membership
    from wallets.selectors import wallet_summary
    from wallets.services import person_signup

    try:
        started_build = time.perf_counter()
        call_command("migrate", "--noinput", verbosity=0)
        issuers = []
        for i in range(args.lots_issuers):
            institution_register(code=f"bench-bank-{i + 1}", name=f"Bench bank {i + 1}", hmac=True)
            issuers.append(Institution.objects.get(code=f"bench-bank-{i + 1}"))
        signed_up = person_signup(username="bench-person", password=PASSWORD)
        person, token = signed_up.person, signed_up.token
        refs = {inst.pk: crypto.subject_ref(inst.code, "bench-person") for inst in issuers}
        Membership.objects.bulk_create(
            [
                Membership(
                    institution=inst,
                    person=person,
                    subject_ref=refs[inst.pk],
                    subject_sealed=crypto.seal("bench-person"),
                )
                for inst in issuers
            ]
        )
        today = standard_today()
        months = [lot_expiry(add_months(today, m)) for m in range(args.lots_months)]
        lots = accounts_ensure(
            keys={
                AccountKey.wallet_lot(person_id=person.pk, issuer_id=inst.pk, expires_on=e)
                for inst in issuers
                for e in months
            }
        )
        outstanding = accounts_ensure(keys={AccountKey.issuer_outstanding(issuer_id=inst.pk) for inst in issuers})

        # Inbox rows, then activities, by COPY; then one credit transfer per activity.
        now = datetime.now(UTC)
        inbox_rows = []
        for n in range(args.activities):
            inst = issuers[n % len(issuers)]
            inbox_rows.append(
                (
                    inst.pk,
                    f"bench-{n}",
                    "carbon.activity.recorded",
                    "/bench",
                    refs[inst.pk],
                    "",
                    now - timedelta(minutes=n),
                    Jsonb({"action": "transit.metro", "quantity": "5", "unit": "km"}),
                    "0" * 64,
                    f"w{n // 500}",
                    now,
                    "processed",
                    1,
                    now,
                    "",
                    None,
                    now,
                )
            )
        copy_rows(
            InboxEvent,
            (
                "institution_id",
                "event_id",
                "type",
                "source",
                "subject_ref",
                "subject_sealed",
                "time",
                "data",
                "content_hash",
                "webhook_id",
                "received_at",
                "status",
                "attempts",
                "available_at",
                "last_error",
                "outcome",
                "processed_at",
            ),
            inbox_rows,
        )
        inbox_ids = dict(InboxEvent.objects.values_list("event_id", "id"))
        scenario = Scenario.objects.get(code="transit.metro")
        factor = FactorVersion.objects.filter(scenario=scenario).order_by("-valid_from").first()
        assert factor is not None
        activity_rows, specs, total_mg = [], [], 0
        for n in range(args.activities):
            inst = issuers[n % len(issuers)]
            inbox_id = inbox_ids[f"bench-{n}"]
            mg = 1000 + n % 5000
            total_mg += mg
            grams = Decimal(5) * factor.grams_per_unit
            activity_rows.append(
                (
                    inbox_id,
                    inst.pk,
                    person.pk,
                    refs[inst.pk],
                    f"p:{person.pk}",
                    scenario.pk,
                    factor.pk,
                    Decimal(5),
                    Decimal(5),
                    grams,
                    mg,
                    None,
                    "automatic",
                    "",
                    now - timedelta(minutes=n),
                    "credited",
                    "",
                    now,
                )
            )
            lot = lots[
                AccountKey.wallet_lot(
                    person_id=person.pk, issuer_id=inst.pk, expires_on=months[(n // len(issuers)) % len(months)]
                )
            ]
            specs.append(
                TransferSpec(
                    idempotency_key=f"activity:{inbox_id}",
                    kind="credit",
                    legs=[(outstanding[AccountKey.issuer_outstanding(issuer_id=inst.pk)], -mg), (lot, mg)],
                    metadata={"inbox_event": inbox_id},
                )
            )
        copy_rows(NormalizedActivity, _ACTIVITY_COLUMNS, activity_rows)
        for start in range(0, len(specs), 1000):
            transfers_post(transfers=specs[start : start + 1000])

        # Other persons' lots (person ids far above the real ones; the ledger keeps plain integers).
        other_lots = accounts_ensure(
            keys={
                AccountKey.wallet_lot(
                    person_id=10_000_000 + n % (args.others // 2 or 1),
                    issuer_id=issuers[n % len(issuers)].pk,
                    expires_on=months[n % len(months)],
                )
                for n in range(args.others)
            }
        )
        other_specs = [
            TransferSpec(
                idempotency_key=f"other:{n}",
                kind="credit",
                legs=[
                    (outstanding[AccountKey.issuer_outstanding(issuer_id=issuers[n % len(issuers)].pk)], -1234),
                    (
                        other_lots[
                            AccountKey.wallet_lot(
                                person_id=10_000_000 + n % (args.others // 2 or 1),
                                issuer_id=issuers[n % len(issuers)].pk,
                                expires_on=months[n % len(months)],
                            )
                        ],
                        1234,
                    ),
                ],
            )
            for n in range(args.others)
        ]
        for start in range(0, len(other_specs), 1000):
            transfers_post(transfers=other_specs[start : start + 1000])
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE")
        built = time.perf_counter() - started_build

        # What the wallet must show.
        summary = wallet_summary(person)
        assert summary.milligrams == total_mg, (summary.milligrams, total_mg)
        assert len(summary.by_institution) == len(issuers)
        lot_count = len(lots)
        activity_count = NormalizedActivity.objects.filter(person=person).count()

        client = Client()
        headers = {"Authorization": f"Token {token}"}
        expected_points = total_mg // 1000

        def wallet() -> None:
            response = client.get("/api/v1/me/wallet", headers=headers)
            assert response.status_code == 200, response.content
            assert response.json()["points"] == expected_points

        def bare() -> None:
            assert client.get("/bench/bare").status_code == 200

        def links() -> None:
            response = client.get("/api/v1/me/links", headers=headers)
            assert response.status_code == 200, response.content

        def selector() -> None:
            wallet_summary(person)

        calls = {"wallet": wallet, "bare": bare, "links": links, "selector": selector}
        times: dict[str, list[float]] = {name: [] for name in calls}
        for round_ in range(args.warmup + args.calls):
            for name, call in calls.items():
                started = time.perf_counter()
                call()
                elapsed = time.perf_counter() - started
                if round_ >= args.warmup:
                    times[name].append(elapsed * 1000)
    finally:
        connection.close()
        if not args.keep_db:
            admin(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")

    def row(name: str, label: str) -> str:
        t = times[name]
        return (
            f"| {label} | {statistics.median(t):.2f} | {percentile(t, 0.99):.2f} | {max(t):.2f} | "
            f"{percentile(times['wallet'], 0.99) / percentile(t, 0.99):.1f} |"
        )

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"a person with {lot_count} wallet lots ({args.lots_issuers} issuers x {args.lots_months} months) and "
        f"{activity_count:,} activities ({args.activities:,} credit transfers), plus {args.others:,} transfers "
        f"to other persons; {args.calls:,} timed rounds after {args.warmup} warm-up rounds, calls interleaved, "
        f"django.test.Client in process (DEBUG off); data built in {built:.0f} s; load average at the end {load}"
    )
    print()
    print("| call | p50 ms | p99 ms | max ms | wallet p99 / this p99 |")
    print("|---|---:|---:|---:|---:|")
    print(row("wallet", "`GET /api/v1/me/wallet` (token auth, `wallet_summary`, JSON)"))
    print(row("selector", "`wallet_summary(person)` alone (two queries)"))
    print(row("links", "baseline: `GET /api/v1/me/links` (token auth, one small query)"))
    print(row("bare", "baseline: `GET /bench/bare` (a Django view that answers 200)"))
    p99 = percentile(times["wallet"], 0.99)
    print()
    print(
        f"| target | required | measured | |\n|---|---|---|---|\n| wallet p99 | < 20 ms | {p99:.2f} ms "
        f"| {'met' if p99 < 20 else '**missed**'} |"
    )


if __name__ == "__main__":
    main()
