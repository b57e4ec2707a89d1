from datetime import date
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ledger.services import lots_expire
from ledger.units import standard_today


class Command(BaseCommand):
    help = (
        "Move the points of every lot that lapsed before TODAY (expires_on < today) to the issuer's expired "
        "account, one transfer per lot. Idempotent: a second run finds nothing left to move."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--today", metavar="YYYY-MM-DD", help="Run as of this date (default: today in HUB_STANDARD_TIMEZONE)."
        )
        parser.add_argument("--batch-size", type=int, default=1000, help="Lots per transaction (default 1000).")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            today = date.fromisoformat(options["today"]) if options["today"] else standard_today()
        except ValueError as exc:
            raise CommandError(f"--today: {exc}") from exc

        def progress(done: int, made: int) -> None:
            self.stdout.write(f"  {done} lots looked at, {made} expired so far")

        self.stdout.write(f"Expiring lots that lapsed before {today.isoformat()}")
        made = lots_expire(today=today, batch_size=options["batch_size"], progress=progress)
        self.stdout.write(self.style.SUCCESS(f"Expired {made} lots as of {today.isoformat()}."))
