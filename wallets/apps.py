from django.apps import AppConfig

from methodology import persons


class WalletsConfig(AppConfig):
    name = "wallets"
    verbose_name = "Persons and links"

    def ready(self) -> None:
        # Imported here, once the models are loaded (the app's own modules; nothing of another app).
        from wallets import handlers  # noqa: F401  (registers the event handlers)
        from wallets.selectors import persons_for_subjects

        # Methodology, on the floor below, learns a subject's person through this lookup.
        persons.register(persons_for_subjects)
