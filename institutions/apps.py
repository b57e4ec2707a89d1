from django.apps import AppConfig

from clearinghouse import keys


class InstitutionsConfig(AppConfig):
    name = "institutions"
    verbose_name = "Institutions and intake"

    def ready(self) -> None:
        # Imported here, once the models are loaded (the app's own modules; nothing of another app).
        from institutions import tasks  # noqa: F401  (registers the tasks the wake-ups enqueue by name)
        from institutions.services import hub_signer, hub_trusted_keys

        # The edge keeps the hub's keys; the floors below sign and verify through clearinghouse.keys.
        keys.register(keys.Keeper(signer=hub_signer, trusted=hub_trusted_keys))
