"""``docker-compose.yml`` read as compose reads it: services, commands, and environments interpolated.

Tests that need the production environment take it from here, so they run what compose would run.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
# ${NAME}, ${NAME:-default}, ${NAME:?message}, and $$ for a literal $ (compose's interpolation).
_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?:(?P<op>:[-?])(?P<arg>[^}]*))?\}")


def load_services() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def command_of(service: Mapping[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else command


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    """The service's environment as written, ``${...}`` left in place."""
    environment = service.get("environment", {})
    if isinstance(environment, list):  # the KEY=value form
        return dict(item.split("=", 1) for item in environment)
    return {name: str(value) for name, value in environment.items()}


def interpolate(value: str, dotenv: Mapping[str, str]) -> str:
    """``value`` with compose's variables replaced from ``dotenv`` (what a .env file would set)."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name", "op", "arg")
        given = dotenv.get(name, "")
        if op == ":?" and not given:
            raise KeyError(f"compose would refuse to start: {name} is required ({arg})")
        if op == ":-" and not given:
            return arg
        return given

    return _VARIABLE.sub(replace, value)


def service_environment(name: str, dotenv: Mapping[str, str]) -> dict[str, str]:
    """What the process of service ``name`` finds in its environment, given a .env of ``dotenv``."""
    return {key: interpolate(value, dotenv) for key, value in environment_of(load_services()[name]).items()}


def gunicorn_settings(environment: Mapping[str, str]) -> Any:
    """gunicorn.conf.py as gunicorn itself reads it in a process with ``environment``: its Config.

    Every public name the file sets must be one of gunicorn's settings: gunicorn ignores the others, so a
    misspelt one (``keep_alive``) would silently leave the default in force.
    """
    import os
    import runpy
    from unittest import mock

    from gunicorn.config import Config

    with mock.patch.dict(os.environ, environment, clear=True):
        namespace = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    config = Config()
    values = {name: value for name, value in namespace.items() if not name.startswith("_") and name != "os"}
    unknown = sorted(set(values) - set(config.settings))
    assert not unknown, f"gunicorn.conf.py sets names gunicorn does not know: {unknown}"
    for name, value in values.items():
        config.set(name, value)
    return config
