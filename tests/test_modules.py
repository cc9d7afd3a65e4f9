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


def imported_modules(path: Path) -> Set[str]:
    """The procqueue modules a module imports (as `procqueue.x` names)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                if node.module:
                    names.add(f"procqueue.{node.module}")
                else:
                    names.update(f"procqueue.{alias.name}" for alias in node.names)
            elif node.level == 0 and (node.module or "").startswith("procqueue"):
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("procqueue."))
        elif isinstance(node, ast.Call) and _called_name(node.func) == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            target = node.args[0].value  # importlib.import_module("procqueue.cli") or (".x", package)
            names.add(f"procqueue{target}" if target.startswith(".") else target)
    return names


def _called_name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def import_graph() -> Dict[str, Set[str]]:
    modules = {f"procqueue.{path.stem}": path for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
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
    modules = sorted(path.name for path in PACKAGE.glob("*.py") if path.stem not in ("__init__", "__main__"))
    assert [name for name in modules if f"`{name}`" not in development] == []
