from django.apps import AppConfig


class MethodologyConfig(AppConfig):
    name = "methodology"
    verbose_name = "Unified carbon standard"

    def ready(self) -> None:
        from methodology import handlers, privacy  # noqa: F401  (register the event handlers, the export section)
