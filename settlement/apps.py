from django.apps import AppConfig


class SettlementConfig(AppConfig):
    name = "settlement"

    def ready(self) -> None:
        from settlement import handlers  # noqa: F401  (registers the event handlers)
