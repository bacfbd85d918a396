"""The delivery stage's modules import one way: delivery -> attempt -> decision, holds, pacing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RELAY = Path(__file__).resolve().parent.parent / "relay"

#: module -> the delivery-stage modules it may import (the rest of relay/ is not this test's business)
ALLOWED = {
    "delivery": {"attempt", "holds", "pacing"},
    "attempt": {"decision", "holds", "pacing"},
    "holds": {"pacing"},
    "decision": set(),
    "pacing": set(),
}


def relay_imports(module: str) -> set[str]:
    """The relay modules ``relay/<module>.py`` imports, at any level (also under TYPE_CHECKING)."""
    tree = ast.parse((RELAY / f"{module}.py").read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("relay."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("relay.")}
    return found


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_delivery_stage_imports_flow_one_way(module: str) -> None:
    stage = relay_imports(module) & set(ALLOWED)
    assert stage <= ALLOWED[module], f"relay/{module}.py imports {sorted(stage - ALLOWED[module])} against the flow"


def test_nothing_in_relay_but_service_imports_delivery() -> None:
    importers = {p.stem for p in RELAY.glob("*.py") if "delivery" in relay_imports(p.stem)}
    assert importers <= {"service"}, f"only service may import relay.delivery, not {sorted(importers - {'service'})}"
