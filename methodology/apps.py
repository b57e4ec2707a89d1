from django.apps import AppConfig


class MethodologyConfig(AppConfig):
    name = "methodology"
    verbose_name = "Unified carbon standard"

    def ready(self) -> None:
        from methodology import handlers  # noqa: F401  (registers the event handlers)
