"""The shape of relay/: its import graph, derived from the source with ast, has no cycle, and the
simulated Microsoft 365 (relay.testing) is imported only by the demo and the CLI.

Imports under ``if TYPE_CHECKING:`` count too: a cycle that only the type checker sees is still two
modules that cannot be understood one without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.import_graph import find_cycle, import_graph, module_name

RELAY = Path(__file__).resolve().parent.parent / "relay"
#: The only modules outside relay.testing that may import it.
MAY_IMPORT_TESTING = {"relay.demo", "relay.cli"}


def test_the_graph_is_derived_from_the_source() -> None:
    graph = import_graph()
    # Known edges, so that a broken derivation (an empty graph has no cycle either) fails here.
    assert "relay.delivery.classify" in graph["relay.microsoft.upstream"]
    assert "relay.queue.spool" in graph["relay.service"]
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
    found: list[str] = []
    for path in sorted(RELAY.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("relay"):
                names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                found.extend(f"{module_name(path)}: from {node.module} import {n}" for n in names)
    return found


def test_no_private_name_is_imported_across_modules() -> None:
    assert private_imports() == []


def reply_constants() -> dict[str, str]:
    import relay.intake.replies

    return {name: value for name, value in vars(relay.intake.replies).items()
            if name.isupper() and not name.startswith("_") and isinstance(value, str)}


def test_reply_constants_carry_enhanced_codes_and_pass_the_sanitiser_unchanged() -> None:
    import relay.intake.replies

    constants = reply_constants()
    assert len(constants) > 20
    for name, text in constants.items():
        assert relay.intake.replies.normalise_reply(text) == text, name


@pytest.mark.parametrize("name", sorted(n for n, text in reply_constants().items() if text[0] in "45"))
def test_each_refusal_text_exists_once(name: str) -> None:
    text = reply_constants()[name]
    elsewhere = [str(p.relative_to(RELAY.parent)) for p in sorted(RELAY.rglob("*.py"))
                 if p.name != "replies.py" and "testing" not in p.parts and text in p.read_text(encoding="utf-8")]
    assert elsewhere == [], f"{text!r} is written out again in {elsewhere}: import relay.intake.replies.{name}"


def imported_names(path: Path) -> set[str]:
    """Every module name ``path`` imports (``from a.b import c`` gives a.b and a.b.c)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_bench_imports_nothing_from_the_tests() -> None:
    """What the bench shares with the tests lives in relay/testing/ (or bench/ itself)."""
    bench = sorted((RELAY.parent / "bench").glob("*.py"))
    assert any("relay.testing.harness" in imported_names(p) for p in bench)  # the derivation sees imports
    found = sorted(f"{p.name}: {name}" for p in bench for name in imported_names(p)
                   if name == "tests" or name.startswith("tests."))
    assert found == [], f"bench/ imports from tests/: {found}"


# ---------------------------------------------------------------------------------------- layers
#: Shared by every stage; imports only its own kind.
FOUNDATION = {"relay.config", "relay.envelope", "relay.errors", "relay.observability", "relay.text",
              "relay.blocking", "relay.fleet", "relay.fleet.client", "relay.fleet.link", "relay.fleet.scripts",
              "relay.fleet.status"}
#: The config package, one module per job (``relay.config`` re-exports what the stages import).
FOUNDATION |= {f"relay.config.{name}" for name in (
    "values", "clouds", "apps", "sections", "networks", "settings", "resolve", "problems", "loading")}
#: The stages in the order mail flows through them. A stage may import the foundation, itself and the
#: stages before it (the shapes they produce), never a later one: hand-offs forward go through
#: protocols that the service wires (docs/architecture.md, "Layout").
STAGES = ("relay.intake", "relay.queue", "relay.delivery", "relay.microsoft")
#: The wiring and the commands: may import anything (the simulator only from demo and cli).
APPLICATION = {"relay", "relay.__main__", "relay.cli", "relay.service", "relay.demo", "relay.check",
               "relay.fleet_cli"}


def layer(module: str) -> int:
    """0 the foundation, 1.. the stages in flow order, 99 the application; KeyError: unplaced."""
    if module in FOUNDATION:
        return 0
    for rank, stage in enumerate(STAGES, start=1):
        if module == stage or module.startswith(stage + "."):
            return rank
    if module in APPLICATION:
        return 99
    raise KeyError(module)


def against_the_flow(graph: dict[str, set[str]]) -> list[str]:
    """``importer -> imported`` for every import that points forward along the flow."""
    found = []
    for module, deps in sorted(graph.items()):
        if module.startswith("relay.testing"):
            continue
        for dep in sorted(deps):
            if not dep.startswith("relay.testing") and layer(dep) > layer(module):
                found.append(f"{module} -> {dep}")
    return found


def test_every_module_has_a_place_in_the_layout() -> None:
    unplaced = []
    for module in import_graph():
        if not module.startswith("relay.testing"):
            try:
                layer(module)
            except KeyError:
                unplaced.append(module)
    assert unplaced == [], f"put these in a stage or in FOUNDATION/APPLICATION (and docs/architecture.md): {unplaced}"


def test_against_the_flow_finds_a_forward_import() -> None:
    graph = {"relay.intake.data": {"relay.queue.spool", "relay.text"},
             "relay.delivery.scheduler": {"relay.queue.spool", "relay.microsoft.upstream"},
             "relay.config": {"relay.errors", "relay.intake.policy"}}
    assert against_the_flow(graph) == ["relay.config -> relay.intake.policy",
                                       "relay.delivery.scheduler -> relay.microsoft.upstream",
                                       "relay.intake.data -> relay.queue.spool"]


def test_imports_follow_the_flow() -> None:
    assert against_the_flow(import_graph()) == []


# ---------------------------------------------------------------------------------------- sizes
MAX_LINES = 500
MAX_METHODS = 25
DECISIONS = RELAY.parent / "docs" / "decisions.md"


def size_exceptions() -> set[str]:
    """The paths (relay/...) that docs/decisions.md's size entry names in its bullet list, with a reason."""
    text = DECISIONS.read_text(encoding="utf-8")
    marker = "Modules over 500 lines, classes over 25 methods"
    assert marker in text, f"docs/decisions.md has no entry titled {marker!r}"
    entry = text.split(marker, 1)[1].split("\n## ", 1)[0]
    return {line.split("`")[1] for line in entry.splitlines() if line.startswith("- `relay/")}


def oversized() -> dict[str, str]:
    """relay path -> what is over the limit, for every module outside relay/testing."""
    found: dict[str, str] = {}
    for path in sorted(RELAY.rglob("*.py")):
        if "testing" in path.parts:
            continue
        source = path.read_text(encoding="utf-8")
        rel = str(path.relative_to(RELAY.parent))
        over = []
        if (lines := len(source.splitlines())) > MAX_LINES:
            over.append(f"{lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                methods = sum(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) for n in node.body)
                if methods > MAX_METHODS:
                    over.append(f"class {node.name}: {methods} methods")
        if over:
            found[rel] = ", ".join(over)
    return found


def test_big_modules_and_classes_are_explained_in_the_decisions() -> None:
    unexplained = {path: why for path, why in oversized().items() if path not in size_exceptions()}
    assert unexplained == {}, f"split these, or say why in docs/decisions.md: {unexplained}"


def test_the_size_exceptions_are_still_needed() -> None:
    stale = size_exceptions() - set(oversized())
    assert stale == set(), f"no longer over the limits: take them out of docs/decisions.md's list: {stale}"
