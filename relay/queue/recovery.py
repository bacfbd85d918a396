"""Recovery at start: bring the body files and the rows back into agreement after a crash.

Run by the spool's owner only (the daemon, holding ``spool.lock``), before it accepts or delivers
anything:

- bodies in ``tmp/`` are removed: they were being received and no 2xx was given for them;
- a body in ``bodies/`` without a row is removed: the crash came between its rename and the row's
  commit, so its client got no 2xx either;
- a row without a body (only outside interference does that) is moved to DEAD, reason ``body missing``;
- ACTIVE rows go back to QUEUED, due now: their attempts were cut off by the crash.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relay.queue.bodies import fsync_dir
from relay.queue.entries import State
from relay.queue.problems import os_error

__all__ = ["RecoveryReport", "recover"]


@dataclass(frozen=True)
class RecoveryReport:
    """What :meth:`Spool.open` cleaned up. All zero after a clean shutdown."""

    tmp_removed: int = 0
    orphan_bodies_removed: int = 0
    missing_bodies: int = 0  # rows moved to DEAD with reason "body missing"
    active_requeued: int = 0
    recovered: bool = True  # False when opened with recover=False (the queue CLI)


def recover(
    transaction: Callable[[], contextlib.AbstractContextManager[sqlite3.Connection]],
    tmp_dir: Path,
    bodies_dir: Path,
    *,
    clock: Callable[[], float],
    fsync: bool,
) -> RecoveryReport:
    """Clean up as the module docstring says, the row changes in one ``transaction``. Raises
    SpoolFull/SpoolError for a file that cannot be removed (and whatever the transaction raises)."""
    tmp_removed = orphans = missing = requeued = 0
    try:
        for item in os.scandir(tmp_dir):
            if item.is_file(follow_symlinks=False) or item.is_symlink():
                os.unlink(item.path)
                tmp_removed += 1
        with transaction() as conn:
            rows = conn.execute("SELECT id, state FROM messages").fetchall()
            known = {r["id"]: State(r["state"]) for r in rows}
            present = set()
            for item in os.scandir(bodies_dir):
                if not item.is_file(follow_symlinks=False):
                    continue
                if item.name in known:
                    present.add(item.name)
                else:
                    os.unlink(item.path)
                    orphans += 1
            now = clock()
            for id, state in known.items():
                if id not in present and state is not State.DEAD:
                    conn.execute(
                        "UPDATE messages SET state = ?, reason = ?, updated_at = ? WHERE id = ?",
                        (State.DEAD, "body missing", now, id),
                    )
                    missing += 1
            requeued = conn.execute(
                "UPDATE messages SET state = ?, next_attempt_at = ?, updated_at = ? WHERE state = ?",
                (State.QUEUED, now, now, State.ACTIVE),
            ).rowcount
        if (tmp_removed or orphans) and fsync:
            fsync_dir(tmp_dir)
            fsync_dir(bodies_dir)
    except OSError as exc:
        raise os_error(exc, "recover") from None
    return RecoveryReport(tmp_removed, orphans, missing, requeued)
