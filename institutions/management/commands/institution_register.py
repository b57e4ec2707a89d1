import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from clearinghouse.errors import HubError
from institutions.services import hub_public_keys, institution_register


class Command(BaseCommand):
    help = (
        "Register an institution and print its credentials as one JSON object. "
        "The HMAC secret and API token are shown this once; the hub keeps only what verifies them."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("code", help="Unique code, [a-z0-9-]{2,40}; it appears in the intake URL.")
        parser.add_argument("--name", required=True, help="Display name.")
        parser.add_argument("--hmac", action="store_true", help="Issue a whsec_ HMAC secret (v1 signatures).")
        parser.add_argument(
            "--ed25519-public-key", metavar="whpk_...", help="Register the institution's Ed25519 key (v1a)."
        )
        parser.add_argument("--endpoint", default="", help="URL where the hub sends the institution's webhooks.")
        parser.add_argument("--provider", action="store_true", help="The institution offers rewards.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            issued = institution_register(
                code=options["code"],
                name=options["name"],
                hmac=options["hmac"],
                ed25519_public_key=options["ed25519_public_key"],
                endpoint_url=options["endpoint"],
                is_provider=options["provider"],
            )
        except HubError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(
            json.dumps(
                {
                    "code": issued.code,
                    "hmac_secret": issued.hmac_secret,
                    "api_token": issued.api_token,
                    "hub_public_keys": [key.public_key for key in hub_public_keys()],
                }
            )
        )
