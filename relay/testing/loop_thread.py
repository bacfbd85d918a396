"""A private asyncio event loop in a daemon thread: how the simulated servers run beside the code
under test (which has its own loop, or none)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: seconds any start, call or stop may take before it is an error of the test set-up
DEADLINE = 10.0


class LoopThread:
    """``start()`` runs a new event loop in a daemon thread; ``call(coro)`` runs a coroutine there and
    waits (bounded) for its result; ``stop(shutdown)`` runs the owner's shutdown coroutine, ends the
    loop, joins the thread (bounded) and closes the loop."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> asyncio.AbstractEventLoop:
        if self.loop is not None:
            return self.loop
        loop = asyncio.new_event_loop()
        self.loop = loop
        self._thread = threading.Thread(target=self._run, args=(loop,), name=self.name, daemon=True)
        self._thread.start()
        return loop

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = DEADLINE) -> T:
        assert self.loop is not None, f"{self.name} is not started"
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def stop(self, shutdown: Callable[[], Coroutine[Any, Any, None]] | None = None) -> None:
        loop, thread = self.loop, self._thread
        if loop is None or thread is None:
            return
        if shutdown is not None:
            self.call(shutdown())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=DEADLINE)
        self.loop = self._thread = None

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()
