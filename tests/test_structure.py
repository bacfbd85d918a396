"""The shape of relay/: its import graph, derived from the source with ast, has no cycle, and the
simulated Microsoft 365 (relay.testing) is imported only by the demo and the CLI.

Imports under ``if TYPE_CHECKING:`` count too: a cycle that only the type checker sees is still two
modules that cannot be understood one without the other.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

RELAY = Path(__file__).resolve().parent.parent / "relay"
#: The only modules outside relay.testing that may import it.
MAY_IMPORT_TESTING = {"relay.demo", "relay.cli"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(RELAY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The relay modules ``path`` imports (``from relay import x`` names module relay.x)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
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
    modules = {_module_name(p) for p in paths}
    graph = {_module_name(p): _imports(p, modules) for p in paths}
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


def test_the_graph_is_derived_from_the_source() -> None:
    graph = import_graph()
    # Known edges, so that a broken derivation (an empty graph has no cycle either) fails here.
    assert "relay.classify" in graph["relay.upstream"]
    assert "relay.spool" in graph["relay.service"]
    assert "relay.testing" in graph["relay.demo"] or any(
        dep.startswith("relay.testing.") for dep in graph["relay.demo"])


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_relay_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle in relay/: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    "module", sorted(n for n in import_graph() if not n.startswith("relay.testing") and n not in MAY_IMPORT_TESTING))
def test_only_demo_and_cli_import_the_simulator(module: str) -> None:
    testing = sorted(d for d in import_graph()[module] if d == "relay.testing" or d.startswith("relay.testing."))
    assert not testing, f"{module} imports the simulated Microsoft 365 ({', '.join(testing)})"


def private_imports() -> list[str]:
    """``module: from relay.x import _name`` for every private name one relay module takes from another."""
    found = []
    for path in sorted(RELAY.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("relay"):
                names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                found.extend(f"{_module_name(path)}: from {node.module} import {n}" for n in names)
    return found


def test_no_private_name_is_imported_across_modules() -> None:
    assert private_imports() == []


def reply_constants() -> dict[str, str]:
    import relay.replies

    return {name: value for name, value in vars(relay.replies).items()
            if name.isupper() and not name.startswith("_") and isinstance(value, str)}


def test_reply_constants_carry_enhanced_codes_and_pass_the_sanitiser_unchanged() -> None:
    import relay.replies

    constants = reply_constants()
    assert len(constants) > 20
    for name, text in constants.items():
        assert relay.replies.normalise_reply(text) == text, name


@pytest.mark.parametrize("name", sorted(n for n, text in reply_constants().items() if text[0] in "45"))
def test_each_refusal_text_exists_once(name: str) -> None:
    text = reply_constants()[name]
    elsewhere = [str(p.relative_to(RELAY.parent)) for p in sorted(RELAY.rglob("*.py"))
                 if p.name != "replies.py" and "testing" not in p.parts and text in p.read_text(encoding="utf-8")]
    assert elsewhere == [], f"{text!r} is written out again in {elsewhere}: import relay.replies.{name}"
