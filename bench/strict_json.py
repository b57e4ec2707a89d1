"""What strict JSON costs the intake: the parse of an intake body before and after the hub's rules.

    .venv/bin/python bench/strict_json.py [--repeats 7]

Compares, on the same bodies (one event, and batches of 100 and 500 activity events as
``bench/intake.py`` sends them), ``json.loads(body, parse_float=Decimal)`` (what the intake used
before: lenient about encodings, duplicate keys and NaN) with ``clearinghouse.strict_json.loads`` as
the intake calls it. Prints the best-of-repeats time per body and per event, and the difference.
Pure CPU in one process: no server, no database.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import timeit
import uuid
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "clearinghouse.settings")


def event(n: int) -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": f"evt-{uuid.uuid4().hex}",
        "source": "/bench/app",
        "type": "carbon.activity.recorded",
        "subject": f"cust-{n}",
        "time": "2026-11-24T08:00:00Z",
        "data": {"action": "transit.metro", "quantity": "12.5", "unit": "km"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import django

    django.setup()
    from clearinghouse import strict_json

    print("| body | events | lenient µs | strict µs | difference µs | per event µs |")
    print("|---|---:|---:|---:|---:|---:|")
    for events in (1, 100, 500):
        document = event(0) if events == 1 else [event(n) for n in range(events)]
        body = json.dumps(document, separators=(",", ":")).encode()
        number = max(10, 20_000 // events)

        def lenient(body: bytes = body) -> object:
            return json.loads(body, parse_float=Decimal)

        def strict(body: bytes = body) -> object:
            return strict_json.loads(body, parse_float=Decimal, allow_lone_surrogates=True)

        assert lenient() == strict()
        # Interleaved, best of the repeats: the least disturbed run of each.
        before, after = [], []
        for _ in range(args.repeats):
            before.append(timeit.timeit(lenient, number=number) / number)
            after.append(timeit.timeit(strict, number=number) / number)
        lenient_us, strict_us = min(before) * 1e6, min(after) * 1e6
        print(
            f"| {len(body):,} bytes | {events} | {lenient_us:,.1f} | {strict_us:,.1f} | "
            f"{strict_us - lenient_us:+,.1f} | {(strict_us - lenient_us) / events:+.2f} |"
        )


if __name__ == "__main__":
    main()
