import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from clearinghouse.errors import HubError
from institutions.models import Institution
from institutions.services import credential_add


class Command(BaseCommand):
    help = (
        "Add a credential to an institution beside its active ones (rotation step one) and print "
        "the new secrets as JSON. Retire the old credential afterwards with institution_retire_key."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("code")
        parser.add_argument("--hmac", action="store_true", help="Issue a new whsec_ HMAC secret.")
        parser.add_argument("--ed25519-public-key", metavar="whpk_...", help="Add an Ed25519 public key.")
        parser.add_argument("--api-token", action="store_true", help="Issue a new API token.")

    def handle(self, *args: Any, **options: Any) -> None:
        institution = Institution.objects.filter(code=options["code"]).first()
        if institution is None:
            raise CommandError(f"No institution with code {options['code']!r}.")
        try:
            issued = credential_add(
                institution=institution,
                hmac=options["hmac"],
                ed25519_public_key=options["ed25519_public_key"],
                api_token=options["api_token"],
            )
        except HubError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(
            json.dumps(
                {
                    "code": issued.code,
                    "hmac_secret": issued.hmac_secret,
                    "api_token": issued.api_token,
                    "ed25519_public_key": issued.ed25519_public_key,
                    "credential_ids": issued.credential_ids,
                }
            )
        )
