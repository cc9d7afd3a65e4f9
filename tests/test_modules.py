"""The package's shape: no two modules import each other, however indirectly.

Every import counts, also one inside a function, under TYPE_CHECKING or through
importlib.import_module: a cycle hidden that way still means neither module can be read,
changed or tested without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import procqueue

PACKAGE = Path(procqueue.__file__).parent


def module_name(path: Path) -> str:
    """procqueue/contrib/django/wiring.py -> procqueue.contrib.django.wiring"""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> Set[str]:
    """The procqueue modules a module imports (as `procqueue.x` names)."""
    names = set()
    package = module_name(path).split(".") if path.stem == "__init__" else module_name(path).split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from ... import x
                base = ".".join(package[:len(package) - node.level + 1])
                if node.module:
                    names.add(f"{base}.{node.module}")
                else:
                    names.update(f"{base}.{alias.name}" for alias in node.names)
            elif (node.module or "").startswith("procqueue"):
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)  # from procqueue import cli
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("procqueue."))
        elif isinstance(node, ast.Call) and _called_name(node.func) == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            target = node.args[0].value  # importlib.import_module("procqueue.cli") or (".x", package)
            names.add(f"procqueue{target}" if target.startswith(".") else target)
    return names


def _called_name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def package_modules() -> List[Path]:
    """Every module of the package, its subpackages' (procqueue.contrib.django) too."""
    return sorted(path for path in PACKAGE.rglob("*.py") if path.stem != "__init__")


def import_graph() -> Dict[str, Set[str]]:
    modules = {module_name(path): path for path in package_modules()}
    return {name: imported_modules(path) & set(modules) for name, path in modules.items()}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One path per cycle found by a depth-first walk."""
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(node: str, path: List[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_module_imports_one_that_imports_it_back():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_the_readme_says_where_every_module_belongs():
    readme = (PACKAGE.parent / "README.md").read_text()
    development = readme[readme.index("## Development"):]
    modules = [str(path.relative_to(PACKAGE)) for path in package_modules() if path.stem != "__main__"]
    assert [name for name in modules if f"`{name}`" not in development] == []


def test_the_import_graph_sees_imports_of_subpackages():
    graph = import_graph()
    assert {"procqueue.client", "procqueue.contrib.django.settings"} <= graph["procqueue.contrib.django.wiring"]
    assert "procqueue.contrib.django.commands" in graph["procqueue.contrib.django.management.commands.runprocessor"]


def test_the_supervisors_database_work_does_not_depend_on_the_worker_loop():
    """What both record (a schedule disabled by a run's failure) is logged by a helper
    they share (logs.py), not borrowed from the worker's module."""
    assert "procqueue.worker" not in import_graph()["procqueue.supervisor_database"]
