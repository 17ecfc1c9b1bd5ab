"""The house: imports point one way, between modules and between rooms.

Every ``import`` in the package counts, those inside functions and under ``TYPE_CHECKING``
too: a lazy import is still a dependency. A room is a sub-package (``policy``, ``feed``,
...) or a top-level module (``config``, ``records``, ``cli``, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "autotune"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["autotune", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _imported(module: str, path: Path) -> set[str]:
    """The package's modules that ``module`` imports, anywhere in its body."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != module and target != "autotune":
                found.add(target)
    return found


def _room(module: str) -> str:
    return module.split(".")[1]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle in ``graph``, if there is any (depth-first, colouring the nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


GRAPH = {module: _imported(module, path) for module, path in MODULES.items()}


def test_the_parser_sees_lazy_and_type_checking_imports():
    assert "autotune.system.hardware" in GRAPH["autotune.feed.monitor"]  # inside a function
    assert "autotune.factory.factory" in GRAPH["autotune"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_itself_round_a_circle():
    assert _cycle(GRAPH) is None


def test_rooms_import_one_way():
    rooms: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        if module in ("autotune", "autotune.__main__"):
            continue  # the front door and the entry point sit above every room
        rooms.setdefault(_room(module), set()).update(
            _room(t) for t in targets if _room(t) != _room(module))
    assert _cycle(rooms) is None


@pytest.mark.parametrize("room", ["config", "records", "errors", "_worker_init", "_lifecycle"])
def test_the_ground_floor_builds_nothing(room):
    """Data types and errors import no room that reads the machine or builds a loader."""
    below = {"errors", "_check", "_warn", "_bounded", "_worker_init", "config", "records"}
    for module, targets in GRAPH.items():
        if module != "autotune" and _room(module) == room:
            assert {_room(t) for t in targets} <= below, module
