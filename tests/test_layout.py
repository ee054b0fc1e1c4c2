"""The house's layout rules, read from the code's own imports (every import statement, TYPE_CHECKING ones too):
no import circle in app/, the worker processes' package importing nothing of the gateway's side, and the lower
floors never importing the upper ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parent.parent / "app"

# What a worker process may import of app/: its own package, and the error types.
WORKER_MAY_IMPORT = ("app.worker", "app.errors")
# Lower floors, and what they must never import.
NEVER_UPWARDS = {
    ("app.compute", "app.upstream", "app.security", "app.worker", "app.db"): (
        "app.lifecycle",
        "app.middleware",
        "app.observability",
        "app.routes",
        "app.main",
        "app.state",
    ),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(APP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The app modules ``path`` imports (``from app.x import y`` counts app.x.y when that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("app"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("app") and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in APP.rglob("*.py")}
    return {name: {imp for imp in _imports(path) if imp in modules and imp != name} for name, path in modules.items()}


def _under(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_graph_is_read() -> None:
    graph = _graph()
    assert "app.compute.pool" in graph["app.compute.jsonwork"]
    assert "app.worker.spec" in graph["app.worker.registry"]


def test_no_import_circle_in_app() -> None:
    graph = _graph()
    # Packages import their own __init__ implicitly; an __init__ that imports a submodule is not a circle by that.
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_worker_processes_import_only_their_own_package() -> None:
    graph = _graph()
    wrong = {
        module: sorted(imp for imp in imports if not _under(imp, WORKER_MAY_IMPORT))
        for module, imports in graph.items()
        if _under(module, ("app.worker",))
    }
    assert not {m: w for m, w in wrong.items() if w}


@pytest.mark.parametrize(("lower", "upper"), list(NEVER_UPWARDS.items()))
def test_lower_floors_never_import_upper_ones(lower: tuple[str, ...], upper: tuple[str, ...]) -> None:
    graph = _graph()
    wrong = sorted(
        f"{module} -> {imp}"
        for module, imports in graph.items()
        if _under(module, lower)
        for imp in imports
        if _under(imp, upper)
    )
    assert not wrong
