import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from clearinghouse.errors import HubError
from institutions.models import Institution
from settlement.management.options import instant_option
from settlement.services import reward_create


class Command(BaseCommand):
    help = (
        "Add a reward offered by a provider institution and print it as one JSON object: "
        '{"code", "provider", "title", "points", "stock"} (stock null: unlimited).'
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("provider_code", help="The providing institution (registered with --provider).")
        parser.add_argument("reward_code", help="[a-z0-9-]{2,40}, unique across providers; persons redeem by it.")
        parser.add_argument("--title", required=True)
        parser.add_argument("--points", type=int, required=True, help="Points per unit (1 point = 1 g CO2e).")
        parser.add_argument("--stock", type=int, default=None, help="Units available (default: unlimited).")
        parser.add_argument("--per-person-limit", type=int, default=None, help="Units per person (default: none).")
        parser.add_argument("--active-from", default=None, help="ISO 8601 with offset (default: now).")
        parser.add_argument("--active-until", default=None, help="ISO 8601 with offset (default: open-ended).")

    def handle(self, *args: Any, **options: Any) -> None:
        provider = Institution.objects.filter(code=options["provider_code"]).first()
        if provider is None:
            raise CommandError(f"No institution {options['provider_code']!r}.")
        try:
            reward = reward_create(
                provider=provider,
                code=options["reward_code"],
                title=options["title"],
                points=options["points"],
                stock=options["stock"],
                per_person_limit=options["per_person_limit"],
                active_from=instant_option(options["active_from"], "--active-from"),
                active_until=instant_option(options["active_until"], "--active-until"),
            )
        except HubError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(
            json.dumps(
                {
                    "code": reward.code,
                    "provider": provider.code,
                    "title": reward.title,
                    "points": reward.points,
                    "stock": reward.stock,
                }
            )
        )
