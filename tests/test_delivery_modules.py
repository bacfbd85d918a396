"""The delivery stage's modules import one way: scheduler -> attempt -> decision, holds, pacing."""

from __future__ import annotations

import pytest

from tests.import_graph import import_graph

STAGE = "relay.delivery."
#: module -> the delivery-stage modules it may import (the rest of relay/ is tests/test_structure.py's business)
ALLOWED = {
    "scheduler": {"attempt", "holds", "pacing"},
    "attempt": {"decision", "holds", "pacing", "classify"},
    "holds": {"pacing", "classify"},
    "decision": {"classify"},
    "pacing": set(),
}


def stage_imports(module: str) -> set[str]:
    """The relay.delivery modules ``relay.delivery.<module>`` imports (also under TYPE_CHECKING)."""
    return {dep.removeprefix(STAGE) for dep in import_graph()[STAGE + module] if dep.startswith(STAGE)}


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_delivery_stage_imports_flow_one_way(module: str) -> None:
    stage = stage_imports(module) & (set(ALLOWED) | {"classify"})
    wrong = sorted(stage - ALLOWED[module])
    assert not wrong, f"relay.delivery.{module} imports {wrong} against the flow"


def test_the_graph_sees_the_known_edges() -> None:
    assert stage_imports("scheduler") >= {"attempt", "holds"}


def test_nothing_in_relay_but_service_imports_the_scheduler() -> None:
    importers = {m for m, deps in import_graph().items() if STAGE + "scheduler" in deps}
    assert importers <= {"relay.service"}, f"only the service may import the scheduler, not {sorted(importers)}"
