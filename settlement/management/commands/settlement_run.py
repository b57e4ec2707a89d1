from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from settlement.management.options import instant_option
from settlement.selectors import cycle_positions
from settlement.services import cycle_run


class Command(BaseCommand):
    help = (
        "Cut a settlement cycle now (every obligation not yet in a cycle joins it), net it through the hub and "
        "write its instructions (each sent as a signed carbon.settlement.instruction webhook), all in one "
        "transaction, as the daily beat task does. Prints each institution's gross in, gross out, net, "
        "carried-forward amount and instruction. Prints 'Nothing to settle.' when no obligation is waiting."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--now", help="Cut-off instant as ISO 8601 with offset (default: the current time).")
        parser.add_argument(
            "--minimum-minor",
            type=int,
            default=None,
            help="Nets under this many minor units roll forward (default: HUB_SETTLEMENT_MIN_MINOR).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        run = cycle_run(now=instant_option(options["now"], "--now"), minimum_minor=options["minimum_minor"])
        if run is None:
            self.stdout.write("Nothing to settle.")
            return
        cycle = run.cycle
        positions = cycle_positions(cycle=cycle)
        width = max([11, *(len(p.institution.code) for p in positions)])
        by_institution = {i.institution_id: i for i in run.instructions}
        self.stdout.write(f"Cycle {cycle.pk}, cut off {cycle.cut_off_at.isoformat()}, {cycle.currency} minor units:")
        header = (
            f"  {'institution':<{width}} {'gross in':>12} {'gross out':>12} {'net':>12} {'carried':>10}  instruction"
        )
        self.stdout.write(header)
        for p in positions:
            instruction = by_institution.get(p.institution_id)
            what = (
                "-"
                if instruction is None
                else f"{instruction.direction} {instruction.amount_minor} {instruction.instruction_id}"
            )
            self.stdout.write(
                f"  {p.institution.code:<{width}} {p.gross_in:>12} {p.gross_out:>12} "
                f"{p.net_minor:>+12} {p.carried_forward_minor:>+10}  {what}"
            )
        hub = -sum(p.net_minor for p in positions)
        self.stdout.write(f"  {'hub':<{width}} {'':>12} {'':>12} {hub:>+12}")
        value_date = run.instructions[0].value_date.isoformat() if run.instructions else "-"
        self.stdout.write(
            self.style.SUCCESS(
                f"Cycle {cycle.pk} {cycle.state}: {len(run.instructions)} instruction(s), value date {value_date}."
            )
        )
