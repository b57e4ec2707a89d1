from django.apps import AppConfig


class SettlementConfig(AppConfig):
    name = "settlement"

    def ready(self) -> None:
        from settlement import handlers, privacy  # noqa: F401  (register the event handlers, the privacy parts)
