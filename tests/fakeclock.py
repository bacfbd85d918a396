"""A fake clock for time-dependent tests: time moves only when the test says so.

``FakeClock()`` is a ``clock`` callable (like ``time.time``) and its :meth:`sleep` is an injectable
``sleep`` (like ``asyncio.sleep``): a sleeper wakes when :meth:`advance` moves the time past its
deadline. Thread-safe, so the test thread can drive a relay running on its own event loop.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

#: 2026-01-05 09:00:00 UTC: a plausible "now" so tokens, Date headers and reply tails look real.
START = 1_767_603_600.0


@dataclass
class _Sleeper:
    deadline: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]


class FakeClock:
    def __init__(self, start: float = START) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._sleepers: list[_Sleeper] = []

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> asyncio.Future[None]:
        """An awaitable done once the fake time has moved ``seconds`` on (registered at once)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            sleeper = _Sleeper(self._now + max(seconds, 0.0), loop, future)
            if sleeper.deadline <= self._now:
                future.set_result(None)
                return future
            self._sleepers.append(sleeper)
        future.add_done_callback(lambda _: self._forget(sleeper))
        return future

    def _forget(self, sleeper: _Sleeper) -> None:
        with self._lock:
            if sleeper in self._sleepers:
                self._sleepers.remove(sleeper)

    @property
    def sleepers(self) -> int:
        """Sleepers still waiting (a cancelled one may linger in the list for a loop iteration)."""
        with self._lock:
            return sum(not s.future.done() for s in self._sleepers)

    def next_deadline(self) -> float | None:
        with self._lock:
            return min((s.deadline for s in self._sleepers if not s.future.done()), default=None)

    def advance(self, seconds: float) -> float:
        """Move the time on and wake the sleepers whose deadline has come. Returns the new time."""
        with self._lock:
            self._now += seconds
            now = self._now
            due = [s for s in self._sleepers if s.deadline <= now]
        for sleeper in due:
            sleeper.loop.call_soon_threadsafe(_wake, sleeper.future)
        return now

    def set(self, when: float) -> None:
        with self._lock:
            delta = when - self._now
        if delta > 0:
            self.advance(delta)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
