"""``ledger`` is the lowest app: no module of it imports another app (tasks and management commands
included: the hub's signing key comes through ``clearinghouse.keys``). tests/test_layers.py checks the
floors of every app; this keeps the ledger's own promise spelled out beside its tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from clearinghouse import keys

LEDGER = Path(__file__).resolve().parents[2] / "ledger"
OTHER_APPS = {"institutions", "methodology", "wallets", "settlement"}


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
    [p for p in sorted(LEDGER.rglob("*.py")) if "migrations" not in p.parts],
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


def test_without_a_keeper_of_the_hubs_keys_signing_says_so(monkeypatch):
    monkeypatch.setattr(keys, "_keeper", None)
    with pytest.raises(ImproperlyConfigured, match="keeper"):
        keys.hub_signer()
