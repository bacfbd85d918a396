"""The import graph of relay/, derived from the source with ast (imports under ``if TYPE_CHECKING:``
count too), for the tests that check the package's shape."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

RELAY = Path(__file__).resolve().parent.parent / "relay"


def module_name(path: Path) -> str:
    parts = path.relative_to(RELAY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The relay modules ``path`` imports (``from relay import x`` names module relay.x)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules}


@functools.cache
def import_graph() -> dict[str, set[str]]:
    paths = sorted(RELAY.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph = {module_name(p): _imports(p, modules) for p in paths}
    for name, deps in graph.items():
        # A package's own __init__ is not a dependency edge of its modules; nor is a module of itself.
        deps.discard(name)
        deps.difference_update([parent for parent in deps if name.startswith(parent + ".")])
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a path (first module repeated at the end), or [] when there is none."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        colour[node] = GREY
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if colour.get(dep, BLACK) == GREY:
                return [*stack[stack.index(dep):], dep]
            if colour.get(dep) == WHITE and (cycle := visit(dep)):
                return cycle
        stack.pop()
        colour[node] = BLACK
        return []

    for start in sorted(graph):
        if colour[start] == WHITE and (cycle := visit(start)):
            return cycle
    return []
