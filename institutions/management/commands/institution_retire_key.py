from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from clearinghouse.errors import HubError
from institutions.models import Credential
from institutions.services import credential_retire


class Command(BaseCommand):
    help = "Retire one credential of an institution (rotation step two). Lists credentials without an id."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("code")
        parser.add_argument("credential_id", nargs="?", type=int, help="Id from the listing; omit to list.")

    def handle(self, *args: Any, **options: Any) -> None:
        credentials = Credential.objects.filter(institution__code=options["code"])
        if not credentials.exists():
            raise CommandError(f"No institution with code {options['code']!r}, or it has no credentials.")
        if options["credential_id"] is None:
            for c in credentials:
                self.stdout.write(f"{c.pk}\t{c.kind}\t{c.status}\t{c.hint}\t{c.created_at:%Y-%m-%d %H:%M}")
            return
        credential = credentials.filter(pk=options["credential_id"]).first()
        if credential is None:
            raise CommandError(f"Credential {options['credential_id']} does not belong to {options['code']}.")
        try:
            credential_retire(credential=credential)
        except HubError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(f"retired {credential.pk} ({credential.kind} {credential.hint})")
