"""Shared fixtures: the simulated Microsoft 365 and the real relay running against it."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

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


class RelayFactory(Protocol):
    def __call__(self, *, build: Callable[[Path], Mapping[str, Any]] | None = None,
                 clock: Callable[[], float] | None = None, prepare: Callable[[RelayThread], None] | None = None,
                 **overrides: Any) -> RelayThread: ...


@pytest.fixture
def relay_factory(m365: SimulatedM365, tmp_path: Path) -> Iterator[RelayFactory]:
    """The one way a test starts a relay in a thread; every relay it started is stopped at the end.

    ``relay_factory(section=overrides, ...)`` runs against ``m365`` with :func:`relay_config` and the
    overrides; ``build(workdir)`` gives a config of the test's own instead. ``clock`` replaces the wall
    clock; ``prepare(relay)`` sets a knob before the relay starts.
    """
    started: list[RelayThread] = []

    def make(*, build: Callable[[Path], Mapping[str, Any]] | None = None,
             clock: Callable[[], float] | None = None, prepare: Callable[[RelayThread], None] | None = None,
             **overrides: Any) -> RelayThread:
        workdir = tmp_path / f"relay{len(started)}"
        workdir.mkdir()
        if build is not None:
            assert not overrides, "give the overrides to build()"
            config = build(workdir)
        else:
            config = relay_config(m365, workdir, overrides=overrides)
        relay = RelayThread.from_dict(config) if clock is None else RelayThread.from_dict(config, clock=clock)
        if prepare is not None:
            prepare(relay)
        relay.start()
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
