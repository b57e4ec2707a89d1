"""The layering of DESIGN.md ("Apps", floors from the base up), checked over the import graph.

Every module of the project's apps (migrations aside) is parsed with ``ast``; every import counts,
the ones inside functions too, so no arrow can hide in a function body. Three rules:

1. an app imports only apps on floors below its own;
2. no module imports itself back through others (a file-level circle), within an app or across;
3. an import of another app sits at the top of the module, never inside a function, where a reader
   would not look for an arrow (an app's own modules may still be imported in ``AppConfig.ready``).

The failure message prints the graph (app -> the apps it imports, and the modules behind each arrow).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from django.apps import apps

ROOT = Path(__file__).resolve().parents[1]
# From the base up. An app may import only the apps listed before it.
FLOORS = ("clearinghouse", "ledger", "institutions", "methodology", "wallets", "settlement", "portal", "demo")
FLOOR = {app: level for level, app in enumerate(FLOORS)}


@dataclass(frozen=True, slots=True)
class Arrow:
    module: str  # the importing module
    target: str  # the module (or package) imported
    line: int
    in_function: bool

    def __str__(self) -> str:
        where = " (inside a function)" if self.in_function else ""
        return f"{self.module}:{self.line} -> {self.target}{where}"


def project_modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the apps on the floors, migrations left out."""
    modules: dict[str, Path] = {}
    for app in FLOORS:
        for path in sorted((ROOT / app).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if "migrations" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _function_nodes(tree: ast.AST) -> set[int]:
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            inside.update(id(child) for child in ast.walk(node) if child is not node)
    return inside


def arrows(module: str, path: Path) -> Iterator[Arrow]:
    """Every import of ``module``, as the dotted names it may load (``from a import b`` may load ``a.b``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    inside = _function_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [origin] + [f"{origin}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            yield Arrow(module, target, node.lineno, id(node) in inside)


def import_graph() -> tuple[dict[str, dict[str, list[Arrow]]], dict[str, set[str]]]:
    """(app -> imported app -> the arrows behind it, module -> project modules it imports)."""
    modules = project_modules()
    apps_graph: dict[str, dict[str, list[Arrow]]] = defaultdict(lambda: defaultdict(list))
    module_graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        app = name.split(".")[0]
        # One arrow per import statement and app, naming the module it loads (``from a import b``: a.b
        # when b is a module, else a).
        named: dict[tuple[str, int], Arrow] = {}
        for arrow in arrows(name, path):
            target_app = arrow.target.split(".")[0]
            if target_app in FLOOR and target_app != app:
                key = (target_app, arrow.line)
                if key not in named or arrow.target in modules:
                    named[key] = arrow
            if arrow.target in modules and arrow.target != name:
                module_graph[name].add(arrow.target)
        for (target_app, _), arrow in sorted(named.items(), key=lambda item: item[1].line):
            apps_graph[app][target_app].append(arrow)
    return apps_graph, module_graph


def graph_text(apps_graph: dict[str, dict[str, list[Arrow]]]) -> str:
    lines = []
    for app in sorted(apps_graph, key=FLOOR.__getitem__):
        lines.append(f"{app} -> {', '.join(sorted(apps_graph[app], key=FLOOR.__getitem__))}")
    for app in sorted(apps_graph, key=FLOOR.__getitem__):
        for target in sorted(apps_graph[app], key=FLOOR.__getitem__):
            lines.extend(f"    {arrow}" for arrow in apps_graph[app][target])
    return "\n".join(lines)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_app_of_the_project_has_a_floor():
    ours = [config.name for config in apps.get_app_configs() if Path(config.path).parent == ROOT]
    assert ours, "no app of the project is installed?"
    missing = sorted(set(ours) - set(FLOORS))
    assert not missing, f"give each app a floor in FLOORS (and in DESIGN.md): {missing}"


def test_each_app_imports_only_apps_on_floors_below_its_own():
    apps_graph, _ = import_graph()
    upward = [
        arrow
        for app, targets in apps_graph.items()
        for target, found in targets.items()
        if FLOOR[target] >= FLOOR[app]
        for arrow in found
    ]
    assert not upward, (
        "imports on the importer's own floor or above (DESIGN.md, floors):\n"
        + "\n".join(f"  {arrow}" for arrow in upward)
        + "\n\nThe import graph:\n"
        + graph_text(apps_graph)
    )


def test_no_import_of_another_app_hides_in_a_function():
    apps_graph, _ = import_graph()
    hidden = [
        arrow for targets in apps_graph.values() for found in targets.values() for arrow in found if arrow.in_function
    ]
    assert not hidden, (
        "imports of another app inside functions (move them to the top of the module):\n"
        + "\n".join(f"  {arrow}" for arrow in hidden)
        + "\n\nThe import graph:\n"
        + graph_text(apps_graph)
    )


def test_no_module_imports_itself_back():
    apps_graph, module_graph = import_graph()
    found = circles(module_graph)
    assert not found, (
        "file-level import circles:\n"
        + "\n".join(f"  {' <-> '.join(component)}" for component in found)
        + "\n\nThe import graph:\n"
        + graph_text(apps_graph)
    )


def test_the_check_sees_imports_inside_functions_and_circles(tmp_path):
    """The checker itself: a function-level import is an arrow, and a circle through it is found."""
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from settlement import services\n")
    (arrow,) = [a for a in arrows("ledger.probe", path) if a.target == "settlement"]
    assert arrow.in_function
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
