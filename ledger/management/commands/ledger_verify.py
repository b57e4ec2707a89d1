from typing import Any

from django.core.management.base import BaseCommand, CommandError

from clearinghouse.keys import hub_trusted_keys
from ledger.models import Block
from ledger.selectors import Problem, blocks_verify, ledger_check


class Command(BaseCommand):
    help = (
        "Recompute every sealed block from the postings as they are now (Merkle root, hash chain, Ed25519 "
        "signature by one of the hub's published keys), then check the ledger's invariants. Exits 0 only "
        "when everything holds; otherwise names the first broken block and the problem, and exits 1. "
        "Prints the chain's head (height:hash): record it outside the hub, and pass it back later with "
        "--expect-head to detect the newest blocks being deleted or rewritten, which the chain alone cannot."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--expect-head",
            metavar="HEIGHT:HASH",
            help="A head printed by an earlier run: fail unless the chain still holds that block, unchanged.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        expected = _head(options["expect_head"]) if options["expect_head"] else None
        # Every key the hub has published, retired ones included: blocks sealed before a rotation stay valid.
        trusted = hub_trusted_keys()
        verbose = options["verbosity"] >= 2

        def on_block(block: Block, problems: list[Problem]) -> None:
            for problem in problems:
                self.stdout.write(self.style.ERROR(f"  block {block.height}: BROKEN: {problem}"))
            if not problems and verbose:
                self.stdout.write(f"  block {block.height}: ok ({block.entry_count} postings)")

        report = blocks_verify(trusted_keys=trusted, on_block=on_block)
        invariants = ledger_check()
        for problem in invariants:
            self.stdout.write(self.style.ERROR(f"  invariant: {problem}"))

        self.stdout.write(
            f"Blocks checked: {report.blocks}; postings checked: {report.postings}; "
            f"transfers not yet sealed: {report.unsealed_transfers}; "
            f"problems: {len(report.problems) + len(invariants)}"
        )
        head = Block.objects.order_by("-height").values_list("height", "hash").first()
        if head is not None:
            self.stdout.write(f"Chain head: {head[0]}:{head[1]}")
        if expected is not None:
            height, block_hash = expected
            found = Block.objects.filter(height=height).values_list("hash", flat=True).first()
            if found != block_hash:
                what = "is missing" if found is None else f"has hash {found}"
                raise CommandError(
                    f"Ledger verification FAILED: the recorded head {height}:{block_hash} {what}; "
                    "blocks at or before it were deleted or rewritten.",
                    returncode=1,
                )
        if report.problems:
            first = min(report.problems, key=lambda p: p.detail.get("height", 0))
            raise CommandError(f"Ledger verification FAILED at block {first.detail['height']}: {first}", returncode=1)
        if invariants:
            raise CommandError(f"Ledger verification FAILED: {invariants[0]}", returncode=1)
        self.stdout.write(self.style.SUCCESS("Ledger verified: every block and every invariant holds."))


def _head(value: str) -> tuple[int, str]:
    height, _, block_hash = value.partition(":")
    if not height.isdigit() or len(block_hash) != 64 or any(c not in "0123456789abcdef" for c in block_hash):
        raise CommandError(
            f"--expect-head takes HEIGHT:HASH as printed by ledger_verify (64 hex digits), not {value!r}."
        )
    return int(height), block_hash
