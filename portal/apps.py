from django.apps import AppConfig


class PortalConfig(AppConfig):
    """The persons' pages: server-rendered, in simplified Chinese and English, on top of every other app."""

    name = "portal"
    verbose_name = "Persons' pages"
