"""``ledger`` is the base app: its models, services, selectors and admin import no other app. Only the
Celery tasks and the management commands reach ``institutions``, for the hub's signing key."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LEDGER = Path(__file__).resolve().parents[2] / "ledger"
OTHER_APPS = {"institutions", "methodology", "wallets", "settlement"}
ALLOWED = {"tasks.py"}


def imported_apps(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & OTHER_APPS


@pytest.mark.parametrize(
    "path",
    [p for p in sorted(LEDGER.rglob("*.py")) if p.name not in ALLOWED and "management" not in p.parts],
    ids=lambda p: str(p.relative_to(LEDGER)),
)
def test_ledger_imports_no_other_app(path):
    assert imported_apps(path) == set()


def test_ledger_models_have_no_foreign_keys_to_other_apps():
    from django.apps import apps

    for model in apps.get_app_config("ledger").get_models():
        for field in model._meta.get_fields():
            if field.is_relation and field.related_model is not None:
                assert field.related_model._meta.app_label == "ledger", (model, field)
