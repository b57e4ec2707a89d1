"""What an install holds: the declared runtime dependencies, and the image's install line that uses them.

Issue 11: with only the declared dependencies, a worker on Redis died at start (kombu's Redis transport
imports ``packaging``, which ``celery[redis]`` brings and a plain ``celery`` does not; pytest brought it
into dev installs and hid it). CI builds such an install for real and runs a worker on it
(.ci/fresh_install.py); these tests read the files where Docker is not at hand.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# The hub's code as the image runs it (the rest of the tree, tests and bench, is never imported there).
RUNTIME_CODE = ["clearinghouse", "institutions", "ledger", "methodology", "wallets", "settlement", "portal", "demo"]
RUNTIME_FILES = ["manage.py", "gunicorn.conf.py"]
# Developers' commands inside the runtime code, importing dev dependencies only when run: portal_messages
# compiles the catalogues with polib (the hub reads the committed .mo).
DEV_COMMANDS = ["portal/management/commands/portal_messages.py"]


def declared() -> list[Requirement]:
    return [Requirement(line) for line in PYPROJECT["project"]["dependencies"]]


def installed_closure(requirements: list[Requirement]) -> set[str]:
    """Every distribution that installing ``requirements`` brings in (with their extras), by canonical name,
    as this environment's metadata says."""
    found: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    queue = [(requirement, frozenset(requirement.extras)) for requirement in requirements]
    while queue:
        requirement, extras = queue.pop()
        name = canonicalize_name(requirement.name)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        found.add(name)
        for line in importlib.metadata.requires(requirement.name) or []:
            child = Requirement(line)
            wanted = child.marker is None or any(child.marker.evaluate({"extra": extra}) for extra in extras or {""})
            if wanted:
                queue.append((child, frozenset(child.extras)))
    return found


def third_party_imports(paths: list[Path]) -> set[str]:
    """Top-level names of the modules the files import, less the standard library and the hub's own."""
    local = set(RUNTIME_CODE) | {"bench", "tests"}
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - local - {"__future__"}


def distributions_of(modules: set[str]) -> dict[str, set[str]]:
    providers = importlib.metadata.packages_distributions()
    return {module: {canonicalize_name(dist) for dist in providers.get(module, [])} for module in modules}


def runtime_paths() -> list[Path]:
    paths = [ROOT / name for name in RUNTIME_FILES]
    for package in RUNTIME_CODE:
        paths += sorted((ROOT / package).rglob("*.py"))
    return [path for path in paths if str(path.relative_to(ROOT)) not in DEV_COMMANDS]


# --- The declared dependencies ------------------------------------------------------------------------


def test_celery_is_declared_with_the_redis_transport():
    (celery,) = [requirement for requirement in declared() if canonicalize_name(requirement.name) == "celery"]
    assert "redis" in celery.extras


def test_every_module_the_hub_imports_comes_with_the_declared_dependencies():
    closure = installed_closure(declared())
    modules = third_party_imports(runtime_paths())
    assert {"django", "celery", "rest_framework", "psycopg", "redis"} <= modules  # the scan sees imports
    missing = {module: dists for module, dists in distributions_of(modules).items() if not dists & closure}
    assert not missing, f"imported at runtime but installed only by dev tools (or not at all): {missing}"


def test_what_the_workers_broker_transport_imports_comes_with_them():
    """The import that killed the worker: kombu's Redis transport and its own third-party imports."""
    import kombu.transport.redis

    closure = installed_closure(declared())
    modules = third_party_imports([Path(kombu.transport.redis.__file__)]) - {"kombu"}
    assert "packaging" in modules  # what issue 11 found missing
    missing = {module: dists for module, dists in distributions_of(modules).items() if not dists & closure}
    assert not missing, missing


def test_without_the_extra_the_transport_would_miss_what_it_imports():
    """The check above can fail: with a plain ``celery`` the closure lacks ``packaging``."""
    # django-csp (the persons' pages' policy) needs packaging too: left out here, nothing else brings it.
    plain = [
        Requirement("celery") if canonicalize_name(r.name) == "celery" else r
        for r in declared()
        if canonicalize_name(r.name) != "django-csp"
    ]
    assert "packaging" not in installed_closure(plain)
    assert "packaging" in installed_closure(declared())


def test_dev_tools_stay_out_of_the_runtime_dependencies():
    closure = installed_closure(declared())
    for tool in ("pytest", "pytest-django", "hypothesis", "ruff", "mypy", "django-stubs"):
        assert tool not in closure, tool


# --- The image ----------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [
        (match.group(1).upper(), match.group(2).strip())
        for match in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)
        if not match.group(0).lstrip().startswith("#")
    ]


def is_exact_install(line: str) -> bool:
    """``pip install .``: the project itself (pip reads its dependencies from pyproject.toml), with no
    extras ([dev]), no requirements file, no editable install, no other index; --no-cache-dir allowed."""
    argv = shlex.split(line)
    options = [arg for arg in argv[2:] if arg.startswith("-")]
    targets = [arg for arg in argv[2:] if not arg.startswith("-")]
    return argv[:2] == ["pip", "install"] and targets == ["."] and set(options) <= {"--no-cache-dir"}


def test_the_image_installs_exactly_the_declared_dependencies():
    """One install line, of the project's metadata alone, before the code is copied."""
    instructions = dockerfile_instructions()
    installs = [(i, arguments) for i, (op, arguments) in enumerate(instructions) if op == "RUN" and "pip" in arguments]
    assert len(installs) == 1, installs
    index, line = installs[0]
    assert is_exact_install(line), line
    workdir = [arguments for op, arguments in instructions[:index] if op == "WORKDIR"][-1]
    copied = [shlex.split(arguments) for op, arguments in instructions[:index] if op == "COPY"]
    assert workdir == "/app"
    assert copied == [["pyproject.toml", PYPROJECT["project"]["readme"], "./"]], copied
    assert ("COPY", ". .") in instructions[index:]  # the code comes after, as the hub's tree


@pytest.mark.parametrize(
    "line",
    [
        "pip install --no-cache-dir -e .",
        "pip install --no-cache-dir '.[dev]'",
        "pip install -r requirements.txt .",
        "pip install . pytest",
    ],
)
def test_a_wider_install_line_is_not_taken_for_the_declared_one(line):
    """The check above can fail."""
    assert not is_exact_install(line)


def test_the_build_context_leaves_local_environments_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for name in (".venv", "var", ".git", ".env"):
        assert name in ignored
