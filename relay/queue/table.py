"""The messages table: one SQLite connection shared by the daemon's threads, short transactions, and
every state change of a message that touches its row only.

:class:`MessageTable` is the lower half of :class:`relay.queue.spool.Spool`, which adds the body
files, the lock and recovery. Every state change is one short ``BEGIN IMMEDIATE`` transaction, so the
daemon and the ``queue`` command (another process) can share the database; WAL lets readers go on
while one writes and ``busy_timeout`` makes a writer wait for the other instead of failing.

One connection, guarded by a lock: SQLite serialises writers anyway and every transaction is short, so
a pool would buy nothing but complexity. All methods block; the daemon calls them from worker threads.

State changes here::

    QUEUED -> ACTIVE    claim, claim_due
    ACTIVE -> QUEUED    defer (an attempt: attempts+1), unclaim (no attempt)
    any    -> DEAD      kill
    QUEUED -> HOLD      hold;    HOLD -> QUEUED  release
    DEAD   -> QUEUED    requeue; QUEUED due now  retry
"""

# SQL note: every f-string below interpolates only module constants or "?" placeholders (S608).

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from relay.errors import SpoolError
from relay.queue.entries import Entry, SpoolStats, State
from relay.queue.problems import db_error
from relay.queue.schema import COLUMNS, SELECT_BY_ID, connect, merge_results, row_to_entry

__all__ = ["MessageTable"]

EntryList = list[Entry]


class MessageTable:
    """The ``messages`` table of one spool database: reads and the row-only state changes."""

    def __init__(self, db_path: Path, *, clock: Callable[[], float], fsync: bool) -> None:
        self.db_path = db_path
        self._clock = clock
        self._fsync = fsync
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        #: Bumped by every change of this process that may make a QUEUED message due (store as
        #: QUEUED, defer, unclaim, release, retry, requeue): the scheduler need not look for due
        #: work while it is unchanged and nothing it knows of is due (it still polls for the CLI's
        #: changes, made by another process).
        self.queue_version = 0

    # ----------------------------------------------------------------- connection

    def _connect(self) -> None:
        self._conn = connect(self.db_path, fsync=self._fsync)

    def _disconnect(self) -> None:
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    @contextlib.contextmanager
    def _tx(self, what: str = "update") -> Iterator[sqlite3.Connection]:
        """One short write transaction (BEGIN IMMEDIATE takes the write lock up front)."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise SpoolError("spool is not open")
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise db_error(exc, what) from None
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise db_error(exc, what) from None
                raise

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise SpoolError("spool is not open")
            try:
                return conn.execute(sql, tuple(params)).fetchall()
            except sqlite3.Error as exc:
                raise db_error(exc, "read") from None

    @staticmethod
    def _fetch(conn: sqlite3.Connection, id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = conn.execute(SELECT_BY_ID, (id,)).fetchone()
        return row

    # ----------------------------------------------------------------- reading

    def get(self, id: str) -> Entry | None:
        rows = self._read(f"SELECT {COLUMNS} FROM messages WHERE id = ?", (id,))  # noqa: S608
        return row_to_entry(rows[0]) if rows else None

    def list(self, states: Collection[State] | None = None) -> EntryList:
        """Messages in the given states (all if None), oldest first."""
        if states is None:
            rows = self._read(f"SELECT {COLUMNS} FROM messages ORDER BY created_at, id")  # noqa: S608
        else:
            wanted = [str(State(s)) for s in states]
            if not wanted:
                return []
            marks = ",".join("?" * len(wanted))
            rows = self._read(
                f"SELECT {COLUMNS} FROM messages WHERE state IN ({marks}) ORDER BY created_at, id",  # noqa: S608
                wanted,
            )
        return [row_to_entry(r) for r in rows]

    def next_due_at(self) -> float | None:
        rows = self._read("SELECT MIN(next_attempt_at) FROM messages WHERE state = ?", (State.QUEUED,))
        value = rows[0][0] if rows else None
        return None if value is None else float(value)

    def stats(self) -> SpoolStats:
        rows = self._read("SELECT state, COUNT(*), COALESCE(SUM(size), 0) FROM messages GROUP BY state")
        counts = dict.fromkeys(State, 0)
        total = 0
        for state, count, size in rows:
            counts[State(state)] = count
            total += size
        oldest = self._read(
            "SELECT MIN(created_at) FROM messages WHERE state IN (?, ?)", (State.QUEUED, State.ACTIVE)
        )[0][0]
        return SpoolStats(counts=counts, oldest_created_at=oldest, total_bytes=total)

    # ----------------------------------------------------------------- the scheduler's changes

    def claim(self, id: str) -> Entry | None:
        """QUEUED -> ACTIVE (whatever its due time); None if it is not QUEUED (someone else has it)."""
        with self._tx("claim") as conn:
            cur = conn.execute(
                "UPDATE messages SET state = ?, updated_at = ? WHERE id = ? AND state = ?",
                (State.ACTIVE, self._clock(), id, State.QUEUED),
            )
            if cur.rowcount != 1:
                return None
            row = self._fetch(conn, id)
        return row_to_entry(row) if row is not None else None

    def claim_due(self, now: float, limit: int, *, skip_mailboxes: Collection[str] = ()) -> EntryList:
        """Claim up to ``limit`` QUEUED messages due at ``now``: longest-overdue first (then oldest).

        ``skip_mailboxes`` (compared case-insensitively) leaves out messages of mailboxes that are
        held or already at their connection/rate limit, so they do not block the others.
        """
        if limit <= 0:
            return []
        skip = sorted({m.lower() for m in skip_mailboxes})
        sql = f"SELECT {COLUMNS} FROM messages WHERE state = ? AND next_attempt_at <= ?"  # noqa: S608
        params: list[Any] = [State.QUEUED, now]
        if skip:
            sql += f" AND mailbox NOT IN ({','.join('?' * len(skip))})"
            params += skip
        sql += " ORDER BY next_attempt_at, created_at, id LIMIT ?"
        params.append(limit)
        with self._tx("claim") as conn:
            rows = conn.execute(sql, params).fetchall()
            if not rows:
                return []
            stamp = self._clock()
            conn.executemany(
                "UPDATE messages SET state = ?, updated_at = ? WHERE id = ?",
                [(State.ACTIVE, stamp, r["id"]) for r in rows],
            )
        return [dataclasses.replace(row_to_entry(r), state=State.ACTIVE) for r in rows]

    def defer(
        self,
        id: str,
        *,
        next_attempt_at: float,
        reply: str,
        delivered: Iterable[str] = (),
        failed: Mapping[str, str] | None = None,
        reason: str = "",
    ) -> Entry:
        """ACTIVE -> QUEUED after an attempt: attempts+1, record the reply and partial results.

        ``delivered`` recipients are never tried again; ``failed`` ones (rcpt -> reply) neither.
        ``reason`` may carry the verdict's token (e.g. ``auth_failed`` while a mailbox is held).
        Raises SpoolError if the message is unknown or not ACTIVE (only the claimer may defer).
        """
        with self._tx("defer") as conn:
            row = self._fetch(conn, id)
            if row is None:
                raise SpoolError(f"spool: no message {id}")
            if row["state"] != State.ACTIVE:
                raise SpoolError(f"spool: message {id} is {row['state']}, not active")
            done, bad = merge_results(row, delivered, failed)
            conn.execute(
                "UPDATE messages SET state = ?, next_attempt_at = ?, attempts = attempts + 1,"
                " last_reply = ?, reason = ?, recipients_done = ?, recipients_failed = ?, updated_at = ?"
                " WHERE id = ?",
                (
                    State.QUEUED,
                    next_attempt_at,
                    reply,
                    reason,
                    done,
                    bad,
                    self._clock(),
                    id,
                ),
            )
            new = self._fetch(conn, id)
        self.queue_version += 1
        assert new is not None
        return row_to_entry(new)

    def kill(
        self,
        id: str,
        reason: str,
        reply: str = "",
        *,
        delivered: Iterable[str] = (),
        failed: Mapping[str, str] | None = None,
        attempted: bool = False,
    ) -> Entry:
        """-> DEAD (dead letter, kept with its body for inspection, ``queue requeue`` or ``delete``).

        ``attempted``: the kill follows a delivery attempt, which counts like one deferred.

        Allowed from any state (the scheduler kills ACTIVE messages; expiry may kill QUEUED ones).
        ``reply`` replaces the last reply when given; ``delivered``/``failed`` record the last
        attempt's partial results as :meth:`defer` does (so a requeue never resends to them).
        Raises SpoolError for an unknown id.
        """
        with self._tx("kill") as conn:
            row = self._fetch(conn, id)
            if row is None:
                raise SpoolError(f"spool: no message {id}")
            done, bad = merge_results(row, delivered, failed)
            conn.execute(
                "UPDATE messages SET state = ?, reason = ?, last_reply = ?, recipients_done = ?,"
                " recipients_failed = ?, updated_at = ?, attempts = attempts + ? WHERE id = ?",
                (State.DEAD, reason, reply or row["last_reply"], done, bad, self._clock(), int(attempted), id),
            )
            new = self._fetch(conn, id)
        assert new is not None
        return row_to_entry(new)

    def unclaim(self, id: str, next_attempt_at: float, reason: str | None = None) -> bool:
        """ACTIVE -> QUEUED due at ``next_attempt_at`` without counting an attempt.

        For a message that was claimed but not tried (mailbox paused or held, pacing, shutdown);
        ``reason`` (e.g. the hold) is recorded so ``queue list`` says why it waits.
        False if it is not ACTIVE.
        """
        sets = "state = ?, next_attempt_at = ?"
        params: tuple[Any, ...] = (State.QUEUED, next_attempt_at)
        if reason is not None:
            sets += ", reason = ?"
            params += (reason,)
        return self._transition(id, State.ACTIVE, sets, params) == 1

    def _transition(self, id: str | None, from_state: State, sets: str, params: tuple[Any, ...]) -> int:
        sql = f"UPDATE messages SET {sets}, updated_at = ? WHERE state = ?"  # noqa: S608 (internal constants)
        args: tuple[Any, ...] = (*params, self._clock(), from_state)
        if id is not None:
            sql += " AND id = ?"
            args += (id,)
        with self._tx(f"change {from_state}") as conn:
            changed: int = conn.execute(sql, args).rowcount
        if changed and params[:1] != (State.HOLD,):
            self.queue_version += 1  # unclaim, release, retry, requeue: not hold
        return changed

    # ----------------------------------------------------------------- the admin's changes

    def hold(self, id: str, reason: str) -> bool:
        """QUEUED -> HOLD (admin hold). False if not QUEUED (ACTIVE: a worker has it; try later)."""
        return self._transition(id, State.QUEUED, "state = ?, reason = ?", (State.HOLD, reason)) == 1

    def release(self, id: str) -> bool:
        """HOLD -> QUEUED, due now."""
        now = self._clock()
        sets = "state = ?, reason = '', next_attempt_at = ?"
        return self._transition(id, State.HOLD, sets, (State.QUEUED, now)) == 1

    def retry(self, id: str | None = None) -> int:
        """Make one QUEUED message (or all) due now. Returns how many."""
        return self._transition(id, State.QUEUED, "next_attempt_at = ?", (self._clock(),))

    def requeue(self, id: str) -> bool:
        """DEAD -> QUEUED due now, for another full life.

        ``attempts`` is reset and ``created_at`` set to now, so ``delivery.max_age`` starts anew (else a
        dead letter would expire again at once). ``recipients_failed`` is cleared (the admin fixed the
        cause, so those are tried again); ``recipients_done`` is kept: nobody gets the message twice.
        """
        now = self._clock()
        sets = (
            "state = ?, attempts = 0, created_at = ?, next_attempt_at = ?, reason = '',"
            " recipients_failed = '{}'"
        )
        return self._transition(id, State.DEAD, sets, (State.QUEUED, now, now)) == 1
