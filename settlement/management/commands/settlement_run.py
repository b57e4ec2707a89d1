from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.utils.dateparse import parse_datetime

from settlement.services import cycle_cut, cycle_net


class Command(BaseCommand):
    help = (
        "Cut a settlement cycle now (every obligation not yet in a cycle joins it), net it through the hub, "
        "and print each institution's gross in, gross out, net, carried-forward amount and instruction. "
        "Prints 'Nothing to settle.' when no obligation is waiting."
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
        now = parse_datetime(options["now"]) if options["now"] else None
        cycle = cycle_cut(now=now)
        if cycle is None:
            self.stdout.write("Nothing to settle.")
            return
        positions = cycle_net(cycle=cycle, minimum_minor=options["minimum_minor"])
        self.stdout.write(f"Cycle {cycle.pk}, cut off {cycle.cut_off_at.isoformat()}, {cycle.currency} minor units:")
        header = f"  {'institution':>11} {'gross in':>12} {'gross out':>12} {'net':>12} {'carried':>10}  instruction"
        self.stdout.write(header)
        for p in positions:
            instructed = p.instructed_minor
            what = "-" if instructed == 0 else (f"pay {-instructed}" if instructed < 0 else f"receive {instructed}")
            self.stdout.write(
                f"  {p.institution_id:>11} {p.gross_in:>12} {p.gross_out:>12} {p.net_minor:>+12} "
                f"{p.carried_forward_minor:>+10}  {what}"
            )
        hub = -sum(p.net_minor for p in positions)
        self.stdout.write(f"  {'hub':>11} {'':>12} {'':>12} {hub:>+12}")
        self.stdout.write(self.style.SUCCESS(f"Cycle {cycle.pk} netted."))
