"""The portal is the top floor: no app below it imports it (DESIGN.md, apps)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BELOW = ("clearinghouse", "institutions", "ledger", "methodology", "wallets", "settlement")


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def test_no_app_below_imports_the_portal():
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.split(".")[0] == "portal")
        for app in BELOW
        for path in (ROOT / app).rglob("*.py")
    }
    assert not {path: modules for path, modules in offenders.items() if modules}


def test_the_check_sees_an_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\nfrom portal.forms import SignInForm\n")
    assert "portal.forms" in imported_modules(module)
