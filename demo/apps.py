from django.apps import AppConfig


class DemoConfig(AppConfig):
    """The demo (top floor, development only): ``demo_setup`` registers demo institutions and rewards,
    ``demo_traffic`` plays them and a person over HTTP against a running hub, with a receiver standing in
    for the institutions' endpoints. Nothing imports it."""

    name = "demo"
    verbose_name = "Demo"
