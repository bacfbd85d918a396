"""Who owns the spool: the daemon's exclusive ``flock`` on ``spool.lock``, and what the daemon
publishes for the ``queue`` command, which runs as another process and cannot see its memory
(``holds.json``: the holds and pauses in force).

Only the owner recovers the spool at start (see :mod:`relay.queue.recovery`); the queue command opens
the database without the lock and asks :func:`daemon_running` whether ``holds.json`` is current.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from relay.errors import SpoolError
from relay.queue.bodies import FILE_MODE
from relay.queue.problems import os_error

__all__ = ["daemon_running", "publish_holds", "read_holds", "take_lock"]


def take_lock(lock_path: Path, spool_path: Path) -> int:
    """Take the exclusive lock on ``lock_path`` without waiting; the open file descriptor (closing it
    drops the lock). Raises SpoolError if another process (a running daemon) holds it."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise os_error(exc, "open lock file") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise SpoolError(
            f"spool {spool_path} is in use by another relay process (spool.lock is held)"
        ) from None
    return fd


def daemon_running(lock_path: Path) -> bool:
    """Does another process (the daemon) hold the exclusive lock on ``lock_path``?"""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True  # the daemon's exclusive lock
    finally:
        os.close(fd)  # closing drops our shared lock, if we got it
    return False


def publish_holds(holds_path: Path, holds: Sequence[Mapping[str, Any]]) -> None:
    """(daemon) Write the current holds to ``holds_path``. Advisory, not fsync'd: replaced atomically
    (through a temporary file beside it), removed when there are none."""
    if not holds:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(holds_path)
        return
    tmp = holds_path.parent / f".holds-{os.getpid()}.tmp"
    data = json.dumps({"pid": os.getpid(), "holds": list(holds)}, default=str)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)
    os.replace(tmp, holds_path)


def read_holds(holds_path: Path) -> list[dict[str, Any]] | None:
    """(queue command) The holds in ``holds_path``: [] if there is no file, None if it is unreadable."""
    try:
        data = json.loads(holds_path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        return None
    holds = data.get("holds") if isinstance(data, dict) else None
    return [h for h in holds if isinstance(h, dict)] if isinstance(holds, list) else None
