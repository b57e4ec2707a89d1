"""Outbound webhook delivery throughput: ``deliveries_send`` to a local receiver, one worker process.

    .venv/bin/python bench/delivery.py [--messages 5000] [--batch 500] [--concurrency 32]

Creates a scratch PostgreSQL database ``bench_delivery``, an institution whose endpoint is a small
asyncio HTTP/1.1 receiver running in a separate process on 127.0.0.1 (keep-alive, answers 204),
enqueues the messages (not timed), then times draining them: claim, sign (v1a Ed25519 + v1 HMAC),
POST, and record every attempt, commits included. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multiprocessing.synchronize import Event

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ADMIN_URL = os.environ.get("BENCH_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres")
DB_NAME = "bench_delivery"


def _serve(port: int, ready: Event) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        ready.set()
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    import psycopg

    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DB_NAME}")
    os.environ["DATABASE_URL"] = ADMIN_URL.rsplit("/", 1)[0] + "/" + DB_NAME
    os.environ.pop("REDIS_URL", None)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "clearinghouse.settings")
    os.environ["DJANGO_DEBUG"] = "0"
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-only-secret-key-not-for-production-use-0123456789")
    os.environ.setdefault("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost")  # required with DJANGO_DEBUG=0
    os.environ["HUB_ALLOW_PRIVATE_ENDPOINTS"] = "1"
    os.environ["HUB_DELIVERY_CONCURRENCY"] = str(args.concurrency)
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import transaction

    call_command("migrate", verbosity=0)
    from institutions import outbox
    from institutions.models import DeliveryAttempt, Institution, OutboxMessage
    from institutions.services import institution_register

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=_serve, args=(port, ready), daemon=True)
    server.start()
    ready.wait(10)
    try:
        institution_register(code="bench-shop", name="Bench shop", hmac=True, is_provider=True)
        Institution.objects.filter(code="bench-shop").update(endpoint_url=f"http://127.0.0.1:{port}/hooks")
        institution = Institution.objects.get(code="bench-shop")
        from institutions import kicks

        kick, kicks.deliveries_kick = kicks.deliveries_kick, lambda: None  # the embedded hub would send on commit
        with transaction.atomic():
            for i in range(args.messages):
                outbox.outbox_enqueue(
                    institution=institution,
                    type="carbon.redemption.requested",
                    data={"redemption_id": f"r-{i}", "reward": "coffee", "points": 100, "quantity": 1, "subject": None},
                )
        kicks.deliveries_kick = kick
        started = time.perf_counter()
        tally = outbox.deliveries_drain(limit=args.batch, budget_seconds=600)
        elapsed = time.perf_counter() - started
    finally:
        server.terminate()
    delivered = OutboxMessage.objects.filter(status="delivered").count()
    assert delivered == args.messages == tally["delivered"], (delivered, tally)
    assert DeliveryAttempt.objects.count() == args.messages

    print(f"\n{args.messages} messages, batch {args.batch}, {args.concurrency} concurrent requests, one process\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| delivered | {delivered} |")
    print(f"| seconds | {elapsed:.2f} |")
    print(f"| deliveries per second | {delivered / elapsed:,.0f} |")


if __name__ == "__main__":
    main()
