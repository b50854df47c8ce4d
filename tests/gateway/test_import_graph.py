"""The gateway's import graph has no cycles and routers depend only on the container.

Read from the source with `ast`, counting imports inside functions too: a cycle hidden in a
function-level import still couples the modules, it only moves the failure to run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "services.gateway"
ROUTERS = f"{PACKAGE}.routers"
# What a router must never import: the app and worker (they import the routers) and other
# routers (shared route helpers belong in `deps`).
NOT_FOR_ROUTERS = (f"{PACKAGE}.app", f"{PACKAGE}.worker", f"{PACKAGE}.__main__")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def gateway_modules() -> dict[str, Path]:
    return {module_name(p): p for p in (ROOT / "services" / "gateway").rglob("*.py")}


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module name imported anywhere in `tree` (module level, functions, classes),
    except under `if TYPE_CHECKING:`, which never runs. `from P import x` counts as `P.x`
    too, so a submodule imported by its package name is seen."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph() -> dict[str, set[str]]:
    """Gateway module -> the gateway modules it imports (packages' `__init__` excluded as
    targets: importing `services.gateway.x` runs them, but they import nothing)."""
    modules = gateway_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        found = imported_names(tree, name, path.name == "__init__.py")
        graph[name] = {
            m for m in found if m in modules and m != name and modules[m].name != "__init__.py"
        }
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path `[a, b, ..., a]`, or None."""
    done: set[str] = set()

    def walk(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            cycle = walk(nxt, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = walk(start, [])
        if cycle:
            return cycle
    return None


def test_the_checker_sees_function_level_and_relative_imports():
    source = (
        "from __future__ import annotations\n"
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "if TYPE_CHECKING:\n"
        "    from services.gateway.config import GatewaySettings\n"
        "def f():\n"
        "    from services.gateway.app import create_app\n"
        "    import services.gateway.worker\n"
    )
    names = imported_names(ast.parse(source), "services.gateway.routers.x", False)
    assert {
        "services.gateway.routers.sibling",
        "services.gateway.app",
        "services.gateway.worker",
    } <= names
    assert "services.gateway.config" not in names
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_gateway_has_no_import_cycle():
    graph = import_graph()
    assert f"{PACKAGE}.app" in graph and f"{ROUTERS}.analyses" in graph  # the walk saw them
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())


@pytest.mark.parametrize(
    "router", sorted(m for m in gateway_modules() if m.startswith(f"{ROUTERS}."))
)
def test_routers_import_no_app_worker_or_other_router(router: str):
    imports = import_graph()[router]
    assert f"{PACKAGE}.deps" in imports
    forbidden = {m for m in imports if m.startswith(NOT_FOR_ROUTERS) or m.startswith(ROUTERS)}
    assert not forbidden, f"{router} imports {sorted(forbidden)}"
