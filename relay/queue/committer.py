"""Group commit: one thread makes the daemon's new and delivered messages durable, in groups.

With many clients at once, each message's own transaction (and its own fsyncs) would queue behind
the others' on the spool's one connection. Here the event loop hands each change to one thread
through a queue; the thread takes whatever has piled up meanwhile (up to ``max_group``), makes all of
it durable with :meth:`Spool.commit_group` (one directory fsync and one WAL fsync for the group)
and settles the waiting futures with one wake-up of the loop. Under no load a group is one change
and costs what :meth:`Spool.store` costs; under load the fsyncs and the hand-offs are shared.

Invariant 1 is untouched: a store's future resolves only after its body, its directory entry and
its row are on disk. A caller that stops waiting (its client went away) does not undo the change;
``on_orphan`` is told about a message stored for nobody so that it is delivered anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from relay.errors import SpoolError
from relay.queue.spool import Entry, Spool, StoreRequest

__all__ = ["GroupCommitter"]

log = logging.getLogger("relay.spool")

MAX_GROUP = 64
CLOSE_TIMEOUT = 30.0


@dataclass
class _Change:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Entry | None]
    store: StoreRequest | None = None
    delivered: str = ""
    orphan: Callable[[Entry], None] | None = None


_STOP = object()


class GroupCommitter:
    """Feeds :meth:`Spool.commit_group` from one thread; started on first use, stopped by :meth:`close`."""

    def __init__(self, spool: Spool, *, max_group: int = MAX_GROUP) -> None:
        self.spool = spool
        self.max_group = max_group
        self._queue: queue.SimpleQueue[_Change | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._start_lock = threading.Lock()
        self._current: list[_Change] = []  # the group being committed (failed if the thread dies)
        #: groups committed and changes in them (for tests and the benchmark)
        self.groups = 0
        self.changes = 0

    # ------------------------------------------------------------------ the event loop's side

    async def store(self, request: StoreRequest, *, on_orphan: Callable[[Entry], None] | None = None) -> Entry:
        """Make a received message durable (see :meth:`Spool.store`). ``on_orphan`` is called (on the
        loop) with the entry if it was stored after the caller stopped waiting."""
        loop = asyncio.get_running_loop()
        future = self._submit(_Change(loop, loop.create_future(), store=request, orphan=on_orphan))
        entry = await future  # cancelling this wait leaves the change to _settle, which sees the orphan
        assert entry is not None
        return entry

    async def mark_delivered(self, id: str) -> None:
        """Forget a delivered message (see :meth:`Spool.mark_delivered`)."""
        loop = asyncio.get_running_loop()
        await self._submit(_Change(loop, loop.create_future(), delivered=id))

    def _submit(self, change: _Change) -> asyncio.Future[Entry | None]:
        if self._closed:
            raise SpoolError("spool: the relay is stopping")
        self._ensure_thread()
        self._queue.put(change)
        return change.future

    def _ensure_thread(self) -> None:
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="spool-commit", daemon=True)
                thread.start()
                self._thread = thread

    async def close(self) -> None:
        """Commit what is queued, then stop the thread. Later changes raise SpoolError."""
        self._closed = True
        thread = self._thread
        if thread is None:
            return
        self._queue.put(_STOP)
        await asyncio.to_thread(thread.join, CLOSE_TIMEOUT)
        if thread.is_alive():
            log.error("spool commit thread did not stop in time", extra={"event": "commit_stuck"})

    # ------------------------------------------------------------------ the thread's side

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # never leave a waiter hanging: fail what is queued, refuse what comes
            self._closed = True
            log.critical("spool commit thread stopped: %s", type(exc).__name__,
                         extra={"event": "commit_thread_died", "error_type": type(exc).__name__})
            error: Entry | BaseException | None = SpoolError("spool: commit thread stopped")
            stranded = list(self._current)
            while True:
                try:
                    change = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(change, _Change):
                    stranded.append(change)
            for change in stranded:
                with contextlib.suppress(RuntimeError):
                    change.loop.call_soon_threadsafe(_settle, [(change, error)])
            raise

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            group: list[_Change] = [first]  # type: ignore[list-item]
            while len(group) < self.max_group:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stopping = True
                    break
                group.append(more)  # type: ignore[arg-type]
            self._current = group
            self._commit(group)
            self._current = []

    def _commit(self, group: list[_Change]) -> None:
        stores = [c for c in group if c.store is not None]
        deliveries = [c for c in group if c.store is None]
        ordered = stores + deliveries
        try:
            results: list[Entry | BaseException | None] = list(self.spool.commit_group(
                [c.store for c in stores if c.store is not None], [c.delivered for c in deliveries]))
        except Exception as exc:  # a bug or an unexpected error: every waiter hears about it
            log.exception("group commit failed", extra={"event": "commit_error", "error_type": type(exc).__name__})
            results = [exc] * len(ordered)
        self.groups += 1
        self.changes += len(ordered)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Change, Entry | BaseException | None]]] = {}
        for change, result in zip(ordered, results, strict=True):
            by_loop.setdefault(change.loop, []).append((change, result))
        for loop, settled in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting
                loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[tuple[_Change, Entry | BaseException | None]]) -> None:
    """(event loop) Resolve the futures of one group; report messages stored for nobody."""
    for change, result in settled:
        future = change.future
        if future.cancelled():
            if isinstance(result, Entry) and change.orphan is not None:
                try:
                    change.orphan(result)
                except Exception as exc:
                    log.error("orphaned message not handed over: %s", type(exc).__name__,
                              extra={"event": "orphan_error", "queue_id": result.id})
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
