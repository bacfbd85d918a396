"""Shared fixtures: the simulated Microsoft 365 and the real relay running against it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.testing.harness import RelayThread, relay_config
from relay.testing.m365 import SimulatedM365


@pytest.fixture
def m365(tmp_path: Path) -> Iterator[SimulatedM365]:
    sim = SimulatedM365.standard(tmp_path / "m365").start()
    try:
        yield sim
    finally:
        sim.stop()


RelayFactory = Callable[..., RelayThread]


@pytest.fixture
def relay_factory(m365: SimulatedM365, tmp_path: Path) -> Iterator[RelayFactory]:
    """``relay_factory(section=overrides, ...)`` starts a relay (in a thread) against ``m365``."""
    started: list[RelayThread] = []

    def make(**overrides: Any) -> RelayThread:
        workdir = tmp_path / f"relay{len(started)}"
        workdir.mkdir()
        relay = RelayThread.from_dict(relay_config(m365, workdir, overrides=overrides)).start()
        started.append(relay)
        return relay

    try:
        yield make
    finally:
        for relay in started:
            relay.stop()


@pytest.fixture
def relay(relay_factory: RelayFactory) -> RelayThread:
    return relay_factory()
