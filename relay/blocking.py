"""Blocking network calls (MSAL, requests) run off the event loop, with a deadline on the loop's side.

``asyncio.to_thread`` runs a call in the loop's default executor, whose threads are not daemons:
the interpreter joins them at exit, so one call stuck in a socket read (a firewall that accepts and
never answers, a proxy that swallows the tunnel) keeps a stopped relay alive for as long as the
socket stays silent. :func:`call_with_deadline` runs the call in a daemon thread of its own and
stops waiting for it after ``deadline`` seconds: the caller gets :class:`TimeoutError` (a transient
failure of its step), the event loop and shutdown never wait for the thread, and the thread ends by
itself when its own socket timeout fires (every HTTP request also carries a timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def call_with_deadline(fn: Callable[[], T], deadline: float, *, name: str = "blocking-call") -> T:
    """``fn()`` in a daemon thread; its result, its exception, or :class:`TimeoutError` after ``deadline`` s.

    Cancelling the caller stops the wait at once (the thread is left to finish on its own)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: object) -> None:
        if future.done():  # the caller stopped waiting (deadline, cancellation)
            return
        if ok:
            future.set_result(value)  # type: ignore[arg-type]
        else:
            assert isinstance(value, BaseException)
            future.set_exception(value)

    def run() -> None:
        try:
            result: object = fn()
            ok = True
        except BaseException as exc:  # handed to the caller, whatever it is
            result, ok = exc, False
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, ok, result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await asyncio.wait_for(future, deadline)
