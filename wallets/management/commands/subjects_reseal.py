from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from institutions.crypto import MalformedKey
from wallets.services import subjects_reseal


class Command(BaseCommand):
    help = (
        "Re-encrypt every sealed subject id (memberships' and outbox messages') under the newest key of "
        "HUB_ENCRYPTION_KEYS. "
        "Run after putting a new key first; retire the old key once this has finished. Safe to re-run."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--batch-size", type=int, default=500, help="Rows per transaction (default 500).")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be at least 1.")

        def progress(done: int, total: int) -> None:
            self.stdout.write(f"resealed {done} of {total}")

        try:
            done = subjects_reseal(batch_size=options["batch_size"], progress=progress)
        except MalformedKey as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(self.style.SUCCESS(f"Done: {done} sealed subject(s) now under the newest key."))
