from django.apps import AppConfig


class WalletsConfig(AppConfig):
    name = "wallets"
    verbose_name = "Persons and links"

    def ready(self) -> None:
        from methodology import persons
        from wallets import handlers  # noqa: F401  (registers the event handlers)
        from wallets.selectors import persons_for_subjects

        # Methodology, on the floor below, learns a subject's person through this lookup.
        persons.register(persons_for_subjects)
