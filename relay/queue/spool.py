"""The durable queue: :class:`Spool` is the one way into the spool directory.

Layout under the spool path::

    spool.db    SQLite (WAL, synchronous=FULL): one row per message, the truth about state
    spool.lock  flock()ed by the process that owns the queue (the daemon); only the owner recovers
    tmp/        bodies being received (removed at recovery: no 2xx was given for them)
    bodies/     committed bodies, one file per message, named by queue id

A message is durable once :meth:`Spool.store` returns: the body file is fsync'd, renamed into
``bodies/`` and that directory fsync'd, *then* the row is committed (SQLite fsyncs its WAL on every
commit with ``synchronous=FULL``). A crash between the rename and the commit leaves a body without a
row, which recovery removes: the client never got a 2xx for it. The reverse (a row without a body) can
only come from outside interference and is moved to ``dead`` with reason ``body missing``.

:meth:`Spool.commit_group` does the same for several new messages and several delivered ones at
once (group commit: one directory fsync and one WAL fsync between them); the daemon feeds it from one
thread (:mod:`relay.queue.committer`) so that concurrent clients share those fsyncs.

Every state change is one short ``BEGIN IMMEDIATE`` transaction, so the daemon and the
``oauth-smtp-relay queue`` CLI (another process) can share the database; WAL lets readers go on while
one writes and ``busy_timeout`` makes a writer wait for the other instead of failing.

All methods block; the daemon calls them from worker threads. One connection per :class:`Spool`,
guarded by a lock: SQLite serialises writers anyway and every transaction is short, so a pool would
buy nothing but complexity. File I/O (writing and fsyncing bodies) happens outside the lock.

The rooms behind this facade, each with one job: :mod:`~relay.queue.entries` (ids, states, entries),
:mod:`~relay.queue.schema` (the database, its rows), :mod:`~relay.queue.table` (reads and the state
changes that touch rows only; :class:`Spool` extends it), :mod:`~relay.queue.bodies` (the files),
:mod:`~relay.queue.recovery` (the clean-up at start), :mod:`~relay.queue.owner` (the lock and
``holds.json``), :mod:`~relay.queue.problems` (errors that name the fix). This module keeps what
needs rows and files together: storing, forgetting, opening and closing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from relay.envelope import Envelope, Route
from relay.errors import SpoolError, SpoolFull
from relay.queue import bodies, owner, recovery
from relay.queue.bodies import BodyWriter
from relay.queue.entries import Entry, State, new_queue_id, valid_queue_id
from relay.queue.problems import os_error
from relay.queue.recovery import RecoveryReport
from relay.queue.schema import DELETE, INSERT, entry_to_row
from relay.queue.table import MessageTable

__all__ = [
    "BodyWriter",
    "Entry",
    "Spool",
    "State",
    "StoreRequest",
    "benchmark_store",
]


@dataclass(frozen=True)
class StoreRequest:
    """A received message for :meth:`Spool.commit_group`: its envelope, route and written body."""

    envelope: Envelope
    route: Route
    body: BodyWriter
    message_id: str = ""
    client: str = ""
    state: State = State.QUEUED
    next_attempt_at: float | None = None


class Spool(MessageTable):
    """The durable queue. See the module docstring for layout and guarantees; reads and the row-only
    state changes (claim, defer, kill, unclaim, hold, release, retry, requeue) are
    :class:`~relay.queue.table.MessageTable`'s."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time, fsync: bool = True,
                 min_free: int = 0) -> None:
        self.path = Path(path)
        super().__init__(self.path / "spool.db", clock=clock, fsync=fsync)
        #: new messages are refused (SpoolFull) while the filesystem has less free space than this,
        #: so that recording deliveries, deferrals and admin actions always has room (Postfix's
        #: queue_minfree): a full disk must not stop the queue from draining.
        self.min_free = min_free
        self.tmp_dir = self.path / "tmp"
        self.bodies_dir = self.path / "bodies"
        self.lock_path = self.path / "spool.lock"
        self.holds_path = self.path / "holds.json"
        self._lock_fd: int | None = None

    # ----------------------------------------------------------------- lifecycle

    def open(self, *, recover: bool = True) -> RecoveryReport:
        """Create the directories and schema, then (``recover=True``, the daemon) recover.

        Recovery needs to own the queue: it takes an exclusive ``flock`` on ``spool.lock`` and raises
        SpoolError if another process (a running daemon) holds it. The queue CLI opens with
        ``recover=False``: no lock, no clean-up, just the database, so it never touches a body that a
        running daemon is receiving or a message it is delivering.
        """
        try:
            bodies.make_directories((self.path, self.tmp_dir, self.bodies_dir), fsync=self._fsync)
        except OSError as exc:
            raise os_error(exc, "create spool directory") from None
        if recover:
            self._lock_fd = owner.take_lock(self.lock_path, self.path)
        try:
            self._connect()
        except BaseException:
            self._release_lock()
            raise
        if not recover:
            return RecoveryReport(recovered=False)
        return recovery.recover(self._tx, self.tmp_dir, self.bodies_dir, clock=self._clock, fsync=self._fsync)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)  # closing drops the flock

    def close(self) -> None:
        with self._lock:
            self._disconnect()
            self._release_lock()

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def publish_holds(self, holds: Sequence[Mapping[str, Any]]) -> None:
        """(daemon) Write the daemon's current holds to ``holds.json`` for the queue CLI, which cannot
        see the daemon's memory. Advisory, not fsync'd: replaced atomically, removed when empty."""
        owner.publish_holds(self.holds_path, holds)

    def daemon_holds(self) -> list[dict[str, Any]] | None:
        """(queue CLI) The running daemon's holds; None when no daemon holds the spool (then any
        ``holds.json`` left by a crash says nothing about the present)."""
        if not owner.daemon_running(self.lock_path):
            return None
        return owner.read_holds(self.holds_path)

    # ----------------------------------------------------------------- bodies

    def body_path(self, id: str) -> Path:
        if not valid_queue_id(id):
            raise ValueError(f"not a queue id: {id!r}")
        return self.bodies_dir / id

    def free_bytes(self) -> int:
        """Free space for an unprivileged writer on the spool's filesystem."""
        return bodies.free_bytes(self.path)

    def writable(self) -> bool:
        """For readiness: can we create, write, fsync and remove a small file in ``tmp/``?"""
        return bodies.can_write(self.tmp_dir)

    def writer(self, keep: int = 0) -> BodyWriter:
        """A writer for a new body in ``tmp/``; its id becomes the queue id. It keeps a copy of a
        body of at most ``keep`` bytes in memory (:meth:`BodyWriter.kept`).

        Raises SpoolFull while free space is below ``min_free``."""
        if self.min_free:
            try:
                free = self.free_bytes()
            except OSError as exc:
                raise os_error(exc, "check free space on", self.path) from None
            if free < self.min_free:
                raise SpoolFull(f"spool: only {free} bytes free on {self.path}, below min_free {self.min_free}")
        id = new_queue_id(self._clock())
        return BodyWriter(self, id, self.tmp_dir / id, keep)

    # ----------------------------------------------------------------- storing and forgetting

    def store(
        self,
        envelope: Envelope,
        route: Route,
        body: bytes | BodyWriter,
        *,
        message_id: str = "",
        client: str = "",
        state: State = State.QUEUED,
        next_attempt_at: float | None = None,
    ) -> Entry:
        """Make a message durable. When this returns, a 2xx may be given; on error nothing is left.

        Raises SpoolFull for no space/quota/read-only/permission trouble (the client gets a 4xx),
        SpoolError for anything else.
        """
        if isinstance(body, BodyWriter):
            writer = body
        else:
            writer = self.writer()
            writer.write(body)  # aborts itself on error
        request = StoreRequest(envelope, route, writer, message_id=message_id, client=client, state=state,
                               next_attempt_at=next_attempt_at)
        result = self.commit_group([request])[0]
        if isinstance(result, SpoolError):
            raise result
        assert isinstance(result, Entry)
        return result

    def commit_group(self, stores: Sequence[StoreRequest], delivered: Sequence[str] = ()
                     ) -> list[Entry | SpoolError | None]:
        """Group commit: make several new messages durable and forget several delivered ones with one
        directory fsync and one transaction (one WAL fsync) between them.

        Returns one result per store (its Entry, or the SpoolError that refused it, its body removed),
        then one per delivered id (None, or the SpoolError). Each store is durable exactly as with
        :meth:`store`: its body fsync'd and renamed into ``bodies/``, that directory fsync'd, then
        its row committed. If the shared transaction fails, every change is retried in a transaction
        of its own, so one bad change cannot refuse the others and every error is its own.
        """
        results: list[Entry | SpoolError | None] = [None] * (len(stores) + len(delivered))
        prepared: list[tuple[int, Entry, tuple[Any, ...]]] = []
        for i, request in enumerate(stores):
            try:
                prepared.append((i, *self._commit_body(request)))
            except SpoolError as exc:
                results[i] = exc
        if prepared and self._fsync:
            try:
                bodies.fsync_dir(self.bodies_dir)
            except OSError as exc:
                error = os_error(exc, "fsync bodies directory")
                for i, entry, _ in prepared:
                    bodies.unlink_body(self.bodies_dir, entry.id)
                    results[i] = error
                prepared = []
        changes: list[tuple[int, str, tuple[Any, ...]]] = [(i, INSERT, row) for i, _, row in prepared]
        changes += [(len(stores) + j, DELETE, (id,)) for j, id in enumerate(delivered)]
        errors: dict[int, SpoolError] = {}
        try:
            if not changes:
                return results
            with self._tx("store") as conn:
                for _, sql, params in changes:
                    conn.execute(sql, params)
        except SpoolError as exc:
            if len(changes) == 1:
                errors[changes[0][0]] = exc
            else:
                for i, sql, params in changes:
                    try:
                        with self._tx("store" if sql is INSERT else "mark delivered") as conn:
                            conn.execute(sql, params)
                    except SpoolError as one:
                        errors[i] = one
        for i, entry, _ in prepared:
            if i in errors:
                bodies.unlink_body(self.bodies_dir, entry.id)
                results[i] = errors[i]
            else:
                results[i] = entry
                if entry.state is State.QUEUED:
                    self.queue_version += 1
        for j, id in enumerate(delivered):
            i = len(stores) + j
            if i in errors:
                results[i] = errors[i]
            else:
                bodies.unlink_body(self.bodies_dir, id)
        return results

    def _commit_body(self, request: StoreRequest) -> tuple[Entry, tuple[Any, ...]]:
        """fsync a received body and rename it into ``bodies/``; the Entry and its row to insert."""
        writer = request.body
        writer.commit(self, self.bodies_dir, fsync=self._fsync)
        now = self._clock()
        entry = Entry(
            id=writer.id,
            envelope=request.envelope,
            route=request.route,
            state=State(request.state),
            created_at=now,
            next_attempt_at=now if request.next_attempt_at is None else request.next_attempt_at,
            attempts=0,
            last_reply="",
            reason="",
            message_id=request.message_id,
            size=writer.size,
            client=request.client,
        )
        return entry, entry_to_row(entry, now)

    def mark_delivered(self, id: str, reply: str) -> None:
        """Every recipient is done: remove the row (committed = durable), then the body.

        Idempotent: an unknown id is not an error (the row is already gone).
        """
        result = self.commit_group((), (id,))[0]
        if isinstance(result, SpoolError):
            raise result

    def delete_active(self, id: str) -> bool:
        """Remove an ACTIVE message (row, then body): its claimer handed Exchange's permanent
        refusal straight to the waiting client, so the spool keeps nothing. False if not ACTIVE.
        """
        with self._tx("delete") as conn:
            n = conn.execute("DELETE FROM messages WHERE id = ? AND state = ?", (id, State.ACTIVE)).rowcount
        if n != 1:
            return False
        bodies.unlink_body(self.bodies_dir, id)
        return True

    def delete(self, id: str) -> bool:
        """Remove a message in any state but ACTIVE (row first, then body). False if absent/ACTIVE."""
        with self._tx("delete") as conn:
            n = conn.execute("DELETE FROM messages WHERE id = ? AND state != ?", (id, State.ACTIVE)).rowcount
        if n != 1:
            return False
        if valid_queue_id(id):
            bodies.unlink_body(self.bodies_dir, id)
        return True


def benchmark_store(path: Path, count: int = 1000, size: int = 10_240, *, fsync: bool = True) -> float:
    """Stores per second of ``count`` messages of ``size`` bytes into a fresh spool at ``path``."""
    spool = Spool(path, fsync=fsync)
    spool.open()
    body = os.urandom(size)
    env = Envelope("app@contoso.com", ("user@example.com",))
    route = Route(app="contoso", mailbox="noreply@contoso.com", sender="noreply@contoso.com")
    try:
        start = time.perf_counter()
        for _ in range(count):
            spool.store(env, route, body)
        elapsed = time.perf_counter() - start
    finally:
        spool.close()
    return count / elapsed

