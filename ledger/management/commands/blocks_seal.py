from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from clearinghouse.keys import hub_signer
from ledger.services import blocks_seal


class Command(BaseCommand):
    help = "Seal every posted transfer not yet in a block into signed blocks (what the beat task does)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--max-entries", type=int, default=10_000, help="Postings per block (default 10000).")

    def handle(self, *args: Any, **options: Any) -> None:
        signer = hub_signer()
        sealed = 0
        while block := blocks_seal(signer=signer, max_entries=options["max_entries"]):
            sealed += 1
            self.stdout.write(f"  block {block.height}: {block.entry_count} postings, root {block.merkle_root[:16]}…")
        self.stdout.write(self.style.SUCCESS(f"Sealed {sealed} blocks."))
