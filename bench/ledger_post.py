"""Ledger posting throughput on PostgreSQL: ``transfers_post`` in batches, one worker process.

    .venv/bin/python bench/ledger_post.py [--transfers 20000] [--batch 1000] [--repeats 3]

Creates a scratch database ``bench_ledger`` (``$BENCH_LEDGER_DB`` to name another; dropped and recreated
for every measurement), creates the accounts (not timed), then times posting credit transfers of two
postings each (issuer outstanding to a wallet lot), commit included, so the deferred sum-to-zero
trigger and the balance CHECKs are paid:

- batches, distinct issuers: every transfer of a batch debits a different issuer's outstanding account;
- batches, one hot issuer: every transfer debits the same issuer account (netting makes that one row
  update per batch);
- baseline: the hot-issuer transfers posted one per database transaction (the same service, batch of 1);
- and, after the hot-issuer run, sealing those postings into signed blocks of 10,000 and verifying them.

Prints the median of the repeats as a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ADMIN_URL = os.environ.get("BENCH_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres")
DB_NAME = os.environ.get("BENCH_LEDGER_DB", "bench_ledger")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transfers", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1000, help="transfers per transfers_post call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--persons", type=int, default=10_000, help="distinct persons (wallet lots)")
    parser.add_argument(
        "--baseline-transfers", type=int, default=None, help="transfers in the one-per-transaction run (default all)"
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
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "clearinghouse.settings")
    os.environ["DJANGO_DEBUG"] = "0"
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-secret-key-not-for-production-use-0123456789")
    os.environ.setdefault("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost")  # required with DJANGO_DEBUG=0
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from clearinghouse.keys import hub_signer
    from ledger.models import Account, Posting, Transfer
    from ledger.selectors import blocks_verify, ledger_check
    from ledger.services import AccountKey, TransferSpec, accounts_ensure, blocks_seal, transfers_post

    expires_on = date(2028, 11, 30)

    def prepare(count: int, hot: bool) -> list[TransferSpec]:
        """A fresh database and the accounts; returns the transfers to post."""
        connection.close()
        recreate()
        call_command("migrate", "--noinput", verbosity=0)
        issuers = [1 if hot else 1 + n % args.batch for n in range(count)]
        persons = [n % args.persons for n in range(count)]
        outstanding = accounts_ensure(keys={AccountKey.issuer_outstanding(issuer_id=i) for i in set(issuers)})
        lots = accounts_ensure(
            keys={
                AccountKey.wallet_lot(person_id=p, issuer_id=i, expires_on=expires_on)
                for p, i in zip(persons, issuers, strict=True)
            }
        )
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE ledger_account")
        return [
            TransferSpec(
                idempotency_key=f"activity:{n}",
                kind="credit",
                legs=[
                    (outstanding[AccountKey.issuer_outstanding(issuer_id=i)], -(1000 + n % 997)),
                    (lots[AccountKey.wallet_lot(person_id=p, issuer_id=i, expires_on=expires_on)], 1000 + n % 997),
                ],
                metadata={"inbox_id": n},
            )
            for n, (i, p) in enumerate(zip(issuers, persons, strict=True))
        ]

    def post(specs: list[TransferSpec], batch: int) -> float:
        started = time.perf_counter()
        for start in range(0, len(specs), batch):
            transfers_post(transfers=specs[start : start + batch])  # its own transaction, commit included
        elapsed = time.perf_counter() - started
        assert Transfer.objects.count() == len(specs)
        assert Posting.objects.count() == 2 * len(specs)
        return len(specs) / elapsed

    def checked() -> None:
        problems = ledger_check()
        assert not problems, problems
        assert Account.objects.filter(balance__lt=0, kind="wallet_lot").count() == 0

    def seal_and_verify() -> tuple[float, float]:
        signer = hub_signer()
        started = time.perf_counter()
        while blocks_seal(signer=signer) is not None:
            pass
        sealed = time.perf_counter() - started
        started = time.perf_counter()
        report = blocks_verify()
        verified = time.perf_counter() - started
        assert not report.problems and report.postings == Posting.objects.count(), report
        return report.postings / sealed, report.postings / verified

    baseline_count = args.baseline_transfers or args.transfers
    distinct, hot, single, seal, verify = [], [], [], [], []
    for repeat in range(args.repeats):
        distinct.append(post(prepare(args.transfers, hot=False), args.batch))
        checked()
        hot.append(post(prepare(args.transfers, hot=True), args.batch))
        checked()
        sealing, verifying = seal_and_verify()
        seal.append(sealing)
        verify.append(verifying)
        single.append(post(prepare(baseline_count, hot=True), 1))
        checked()
        print(
            f"repeat {repeat + 1}: distinct issuers {distinct[-1]:,.0f}/s, one hot issuer {hot[-1]:,.0f}/s, "
            f"one per transaction {single[-1]:,.0f}/s; sealing {seal[-1]:,.0f} postings/s, "
            f"verifying {verify[-1]:,.0f} postings/s",
            file=sys.stderr,
        )

    connection.close()
    d, h, s = statistics.median(distinct), statistics.median(hot), statistics.median(single)
    print(
        f"transfers: {args.transfers:,} of 2 postings each, batches of {args.batch}, medians of {args.repeats} runs "
        f"(baseline: {baseline_count:,} transfers), PostgreSQL, one process"
    )
    print("| measurement | transfers/s |")
    print("|---|---|")
    print(f"| batches of {args.batch}, distinct issuers (2 accounts per transfer) | {d:,.0f} |")
    print(f"| batches of {args.batch}, one hot issuer account | {h:,.0f} |")
    print(f"| baseline: one transfer per transaction, one hot issuer | {s:,.0f} |")
    print(f"| ratio: hot-issuer batches / baseline | {h / s:.1f} |")
    print()
    print("| sealed blocks (10,000 postings each) | postings/s |")
    print("|---|---|")
    print(f"| blocks_seal: Merkle root, hash, Ed25519 signature | {statistics.median(seal):,.0f} |")
    print(f"| blocks_verify: recompute every block from the postings | {statistics.median(verify):,.0f} |")


if __name__ == "__main__":
    main()
