from django.apps import AppConfig


class WalletsConfig(AppConfig):
    name = "wallets"
    verbose_name = "Persons and links"

    def ready(self) -> None:
        from wallets import handlers  # noqa: F401  (registers the event handlers)
