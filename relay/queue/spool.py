"""The durable queue: the only module that touches the spool directory.

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
"""

# SQL note: every f-string below interpolates only module constants or "?" placeholders (S608).

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import pwd
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any

from relay.envelope import Envelope, Route
from relay.errors import SpoolError, SpoolFull

__all__ = [
    "BodyWriter",
    "Entry",
    "RecoveryReport",
    "Spool",
    "SpoolStats",
    "State",
    "StoreRequest",
    "benchmark_store",
    "new_queue_id",
]

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 10_000
DIR_MODE = 0o700
FILE_MODE = 0o600

#: errno values that mean "no room / may not write here": the client gets 452 4.3.1 and retries.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
#: SQLite result codes (primary) that mean the same.
_SQLITE_FULL_CODES = frozenset({13, 8, 3})  # SQLITE_FULL, SQLITE_READONLY, SQLITE_PERM

# Crockford base32, lower case: sortable in ASCII, no ambiguous letters, safe as a file name.
_B32 = "0123456789abcdefghjkmnpqrstvwxyz"
_id_lock = threading.Lock()
_id_last = 0


def new_queue_id(now: float | None = None) -> str:
    """A 16-character queue id: 48 bits of milliseconds, then 32 random bits, in base32.

    Sorts by creation time; within one process ids are strictly increasing (a collision inside the
    same millisecond bumps the value), across processes 32 random bits per millisecond make a clash
    practically impossible (and the store is the only writer of new ids).
    """
    global _id_last
    ms = int((time.time() if now is None else now) * 1000) & ((1 << 48) - 1)
    value = (ms << 32) | secrets.randbits(32)
    with _id_lock:
        if value <= _id_last:
            value = _id_last + 1
        _id_last = value
    out = []
    for _ in range(16):
        out.append(_B32[value & 31])
        value >>= 5
    return "".join(reversed(out))


def _valid_id(id: str) -> bool:
    return len(id) == 16 and all(c in _B32 for c in id)


class State(StrEnum):
    QUEUED = "queued"
    ACTIVE = "active"
    HOLD = "hold"
    DEAD = "dead"


@dataclass(frozen=True)
class Entry:
    """One message in the spool (a snapshot of its row; the body is at :meth:`Spool.body_path`)."""

    id: str
    envelope: Envelope
    route: Route
    state: State
    created_at: float
    next_attempt_at: float
    attempts: int
    last_reply: str
    reason: str
    message_id: str
    size: int
    client: str
    recipients_done: tuple[str, ...] = ()
    recipients_failed: dict[str, str] = field(default_factory=dict)

    @property
    def pending_recipients(self) -> tuple[str, ...]:
        """Envelope recipients neither accepted upstream nor refused permanently, in order."""
        done = set(self.recipients_done) | set(self.recipients_failed)
        seen: set[str] = set()
        out: list[str] = []
        for rcpt in self.envelope.rcpt_tos:
            if rcpt not in done and rcpt not in seen:
                seen.add(rcpt)
                out.append(rcpt)
        return tuple(out)


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


@dataclass(frozen=True)
class RecoveryReport:
    """What :meth:`Spool.open` cleaned up. All zero after a clean shutdown."""

    tmp_removed: int = 0
    orphan_bodies_removed: int = 0
    missing_bodies: int = 0  # rows moved to DEAD with reason "body missing"
    active_requeued: int = 0
    recovered: bool = True  # False when opened with recover=False (the queue CLI)


@dataclass(frozen=True)
class SpoolStats:
    counts: dict[State, int]
    oldest_created_at: float | None  # oldest QUEUED or ACTIVE message (for the queue-age alarm)
    total_bytes: int

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def running_user() -> str:
    """The name of the user this process runs as (spool errors name it: the usual fix is an owner)."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a dynamic or container user without a passwd entry
        return f"uid {uid}"


def os_error(exc: OSError, what: str, path: Path | str | None = None) -> SpoolError:
    """Map an OSError to SpoolFull (no room / not writable) or SpoolError.

    ``spool: cannot open lock file /var/spool/x/spool.lock as user nobody: permission denied (EACCES)``:
    the operation, the path and the user, so the fix (an owner, a mode, a mount) is obvious. The
    text goes to logs and the CLI, never into an SMTP reply."""
    name = errno.errorcode.get(exc.errno or 0, "EIO")
    where = exc.filename if exc.filename is not None else path
    target = f" {os.fsdecode(where)}" if where is not None else ""
    reason = (exc.strerror or name).lower()
    text = f"spool: cannot {what}{target} as user {running_user()}: {reason} ({name})"
    if exc.errno in FULL_ERRNOS:
        return SpoolFull(text)
    return SpoolError(text)


def _db_error(exc: sqlite3.Error, what: str, path: Path | None = None) -> SpoolError:
    code = getattr(exc, "sqlite_errorcode", None)
    text = (f"spool: cannot {what} {path} as user {running_user()}: database: {exc}" if path is not None
            else f"spool: {what}: database: {exc}")
    if code is not None and (code & 0xFF) in _SQLITE_FULL_CODES:
        return SpoolFull(text)
    return SpoolError(text)


def writable_problem(path: Path) -> str | None:
    """Could a relay running as this user use (or create) the spool at ``path``? None if so, else why not.

    For ``check --offline`` (the systemd unit's ExecStartPre): changes nothing, creates nothing."""
    user = running_user()
    path = Path(path)

    def denied(target: Path) -> str:
        try:
            readonly = bool(os.statvfs(target).f_flag & os.ST_RDONLY)
        except OSError:
            readonly = False
        return "read-only file system (EROFS)" if readonly else "permission denied (EACCES)"

    def may_write(target: Path) -> bool:
        mode = os.W_OK | (os.X_OK if target.is_dir() else 0)
        if os.access in os.supports_effective_ids:
            return os.access(target, mode, effective_ids=True)
        return os.access(target, mode)

    if not path.exists():
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            return f"spool: cannot create {path} as user {user}: {ancestor} is not a directory"
        if not may_write(ancestor):
            return f"spool: cannot create {path} as user {user}: {ancestor}: {denied(ancestor)}"
        return None
    if not path.is_dir():
        return f"spool: {path} is not a directory"
    names = ("", "tmp", "bodies", "spool.db", "spool.db-wal", "spool.db-shm", "spool.lock")
    for target in (path / name if name else path for name in names):
        if target.exists() and not may_write(target):
            return f"spool: cannot write {target} as user {user}: {denied(target)}"
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BodyWriter:
    """Streams one message body into ``tmp/`` while SMTP DATA arrives.

    Hand it to :meth:`Spool.store` to commit it, or call :meth:`abort`. As a context manager it
    aborts on leaving unless stored. Write errors are raised as SpoolFull/SpoolError after the tmp
    file has been removed, so a failed write leaves nothing behind.
    """

    def __init__(self, spool: Spool, id: str, path: Path, keep: int = 0) -> None:
        self._spool = spool
        self.id = id
        self.path = path
        self.size = 0
        #: A copy in memory while the body is at most ``keep`` bytes (see :meth:`kept`).
        self._keep = keep
        self._kept: list[bytes] | None = [] if keep > 0 else None
        self._hash = hashlib.sha256()
        self._fd: int | None = None
        self.closed = False
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            self.closed = True
            raise os_error(exc, "create body") from None

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def write(self, data: bytes) -> None:
        if self._fd is None:
            raise SpoolError("spool: write to a closed body writer")
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            self.abort()
            raise os_error(exc, "write body", self.path) from None
        self.size += len(data)
        self._hash.update(data)
        if self._kept is not None:
            if self.size <= self._keep:
                self._kept.append(bytes(data))
            else:
                self._kept = None

    def kept(self) -> bytes | None:
        """The whole body, if it was small enough to keep a copy (``keep``): the immediate attempt
        sends it from memory instead of reading the file back. None for a bigger body."""
        return b"".join(self._kept) if self._kept is not None else None

    def _finish(self, fsync: bool) -> None:
        """Flush the file to disk and close it (before the rename into bodies/)."""
        if self._fd is None:
            raise SpoolError("spool: body writer already closed")
        try:
            if fsync:
                os.fsync(self._fd)
        except OSError as exc:
            self.abort()
            raise os_error(exc, "fsync body", self.path) from None
        fd, self._fd = self._fd, None
        os.close(fd)

    def abort(self) -> None:
        """Forget the body: close and remove the tmp file. Safe to call twice."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def __enter__(self) -> BodyWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.closed:
            self.abort()


_COLUMNS = (
    "id, state, mail_from, rcpt_tos, mail_options, route, mailbox, created_at, next_attempt_at, attempts,"
    " last_reply, reason, message_id, size, client, recipients_done, recipients_failed"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    mail_from TEXT NOT NULL,
    rcpt_tos TEXT NOT NULL,            -- JSON list
    mail_options TEXT NOT NULL,        -- JSON list
    route TEXT NOT NULL,               -- JSON object (relay.envelope.Route)
    mailbox TEXT NOT NULL,             -- route.mailbox, lower case, for per-mailbox pacing
    created_at REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_reply TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    message_id TEXT NOT NULL DEFAULT '',
    size INTEGER NOT NULL,
    client TEXT NOT NULL DEFAULT '',
    recipients_done TEXT NOT NULL DEFAULT '[]',     -- JSON list
    recipients_failed TEXT NOT NULL DEFAULT '{}',   -- JSON object rcpt -> reply
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_due ON messages (state, next_attempt_at);
"""

EntryList = list[Entry]
_SELECT_BY_ID = f"SELECT {_COLUMNS} FROM messages WHERE id = ?"  # noqa: S608
_INSERT = f"INSERT INTO messages ({_COLUMNS}, updated_at) VALUES ({', '.join('?' * 18)})"  # noqa: S608
_DELETE = "DELETE FROM messages WHERE id = ?"


def _route_to_json(route: Route) -> str:
    return json.dumps(dataclasses.asdict(route), separators=(",", ":"))


def _route_from_json(text: str) -> Route:
    data: dict[str, Any] = json.loads(text)
    known = {f.name for f in dataclasses.fields(Route)}
    kwargs = {k: v for k, v in data.items() if k in known}
    if "notes" in kwargs:
        kwargs["notes"] = tuple(kwargs["notes"])
    return Route(**kwargs)


def _row_to_entry(row: sqlite3.Row) -> Entry:
    return Entry(
        id=row["id"],
        envelope=Envelope(
            mail_from=row["mail_from"],
            rcpt_tos=tuple(json.loads(row["rcpt_tos"])),
            mail_options=tuple(json.loads(row["mail_options"])),
        ),
        route=_route_from_json(row["route"]),
        state=State(row["state"]),
        created_at=row["created_at"],
        next_attempt_at=row["next_attempt_at"],
        attempts=row["attempts"],
        last_reply=row["last_reply"],
        reason=row["reason"],
        message_id=row["message_id"],
        size=row["size"],
        client=row["client"],
        recipients_done=tuple(json.loads(row["recipients_done"])),
        recipients_failed=dict(json.loads(row["recipients_failed"])),
    )


def _merge_results(
    row: sqlite3.Row, delivered: Iterable[str], failed: Mapping[str, str] | None
) -> tuple[str, str]:
    """The row's recipients_done/recipients_failed JSON with new partial results merged in."""
    done = list(json.loads(row["recipients_done"]))
    for rcpt in delivered:
        if rcpt not in done:
            done.append(rcpt)
    bad: dict[str, str] = dict(json.loads(row["recipients_failed"]))
    bad.update(failed or {})
    return json.dumps(done), json.dumps(bad)


class Spool:
    """The durable queue. See the module docstring for layout and guarantees."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time, fsync: bool = True,
                 min_free: int = 0) -> None:
        self.path = Path(path)
        #: new messages are refused (SpoolFull) while the filesystem has less free space than this,
        #: so that recording deliveries, deferrals and admin actions always has room (Postfix's
        #: queue_minfree): a full disk must not stop the queue from draining.
        self.min_free = min_free
        self.db_path = self.path / "spool.db"
        self.tmp_dir = self.path / "tmp"
        self.bodies_dir = self.path / "bodies"
        self.lock_path = self.path / "spool.lock"
        self.holds_path = self.path / "holds.json"
        self._clock = clock
        self._fsync = fsync
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        #: Bumped by every change of this process that may make a QUEUED message due (store as
        #: QUEUED, defer, unclaim, release, retry, requeue): the scheduler need not look for due
        #: work while it is unchanged and nothing it knows of is due (it still polls for the CLI's
        #: changes, made by another process).
        self.queue_version = 0
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
            for d in (self.path, self.tmp_dir, self.bodies_dir):
                if not d.is_dir():
                    d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
                    if self._fsync:
                        _fsync_dir(d.parent)
        except OSError as exc:
            raise os_error(exc, "create spool directory") from None
        if recover:
            self._take_lock()
        try:
            self._connect()
        except BaseException:
            self._release_lock()
            raise
        if not recover:
            return RecoveryReport(recovered=False)
        return self._recover()

    def _take_lock(self) -> None:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise os_error(exc, "open lock file") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SpoolError(
                f"spool {self.path} is in use by another relay process (spool.lock is held)"
            ) from None
        self._lock_fd = fd

    def publish_holds(self, holds: Sequence[Mapping[str, Any]]) -> None:
        """(daemon) Write the daemon's current holds to ``holds.json`` for the queue CLI, which cannot
        see the daemon's memory. Advisory, not fsync'd: replaced atomically, removed when empty."""
        if not holds:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.holds_path)
            return
        tmp = self.path / f".holds-{os.getpid()}.tmp"
        data = json.dumps({"pid": os.getpid(), "holds": list(holds)}, default=str)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)
        os.replace(tmp, self.holds_path)

    def daemon_holds(self) -> list[dict[str, Any]] | None:
        """(queue CLI) The running daemon's holds; None when no daemon holds the spool (then any
        ``holds.json`` left by a crash says nothing about the present)."""
        if not self._daemon_running():
            return None
        try:
            data = json.loads(self.holds_path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError):
            return None
        holds = data.get("holds") if isinstance(data, dict) else None
        return [h for h in holds if isinstance(h, dict)] if isinstance(holds, list) else None

    def _daemon_running(self) -> bool:
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True  # the daemon's exclusive lock
        finally:
            os.close(fd)  # closing drops our shared lock, if we got it
        return False

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)  # closing drops the flock

    def _connect(self) -> None:
        try:
            conn = sqlite3.connect(
                self.db_path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # guarded by self._lock
            )
        except sqlite3.Error as exc:
            raise _db_error(exc, "open database", self.db_path) from None
        conn.row_factory = sqlite3.Row
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise SpoolError(f"spool: database refuses WAL mode (got {mode!r})")
            conn.execute(f"PRAGMA synchronous = {'FULL' if self._fsync else 'OFF'}")
            with contextlib.suppress(OSError):
                os.chmod(self.db_path, FILE_MODE)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise SpoolError(
                    f"spool database schema {version} is newer than this relay understands ({SCHEMA_VERSION})"
                )
            if version < SCHEMA_VERSION:
                conn.execute("BEGIN IMMEDIATE")
                for statement in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.close()
            raise _db_error(exc, "prepare database", self.db_path) from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._release_lock()

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _recover(self) -> RecoveryReport:
        tmp_removed = orphans = missing = requeued = 0
        try:
            for item in os.scandir(self.tmp_dir):
                if item.is_file(follow_symlinks=False) or item.is_symlink():
                    os.unlink(item.path)
                    tmp_removed += 1
            with self._tx() as conn:
                rows = conn.execute("SELECT id, state FROM messages").fetchall()
                known = {r["id"]: State(r["state"]) for r in rows}
                present = set()
                for item in os.scandir(self.bodies_dir):
                    if not item.is_file(follow_symlinks=False):
                        continue
                    if item.name in known:
                        present.add(item.name)
                    else:
                        os.unlink(item.path)
                        orphans += 1
                now = self._clock()
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
            if (tmp_removed or orphans) and self._fsync:
                _fsync_dir(self.tmp_dir)
                _fsync_dir(self.bodies_dir)
        except OSError as exc:
            raise os_error(exc, "recover") from None
        return RecoveryReport(tmp_removed, orphans, missing, requeued)

    # ----------------------------------------------------------------- helpers

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
                raise _db_error(exc, what) from None
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise _db_error(exc, what) from None
                raise

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise SpoolError("spool is not open")
            try:
                return conn.execute(sql, tuple(params)).fetchall()
            except sqlite3.Error as exc:
                raise _db_error(exc, "read") from None

    @staticmethod
    def _fetch(conn: sqlite3.Connection, id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = conn.execute(_SELECT_BY_ID, (id,)).fetchone()
        return row

    def body_path(self, id: str) -> Path:
        if not _valid_id(id):
            raise ValueError(f"not a queue id: {id!r}")
        return self.bodies_dir / id

    def _unlink_body(self, id: str) -> None:
        # Not fsync'd: if the unlink is lost in a crash, recovery removes the body without a row.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.bodies_dir / id)

    # ----------------------------------------------------------------- storing

    def free_bytes(self) -> int:
        """Free space for an unprivileged writer on the spool's filesystem."""
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

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
                _fsync_dir(self.bodies_dir)
            except OSError as exc:
                error = os_error(exc, "fsync bodies directory")
                for i, entry, _ in prepared:
                    self._unlink_body(entry.id)
                    results[i] = error
                prepared = []
        changes: list[tuple[int, str, tuple[Any, ...]]] = [(i, _INSERT, row) for i, _, row in prepared]
        changes += [(len(stores) + j, _DELETE, (id,)) for j, id in enumerate(delivered)]
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
                        with self._tx("store" if sql is _INSERT else "mark delivered") as conn:
                            conn.execute(sql, params)
                    except SpoolError as one:
                        errors[i] = one
        for i, entry, _ in prepared:
            if i in errors:
                self._unlink_body(entry.id)
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
                self._unlink_body(id)
        return results

    def _commit_body(self, request: StoreRequest) -> tuple[Entry, tuple[Any, ...]]:
        """fsync a received body and rename it into ``bodies/``; the Entry and its row to insert."""
        writer = request.body
        if writer._spool is not self:
            raise SpoolError("spool: body writer belongs to another spool")
        if writer.closed or writer._fd is None:
            raise SpoolError("spool: body writer was aborted or already stored")
        writer._finish(self._fsync)
        id = writer.id
        try:
            os.rename(writer.path, self.bodies_dir / id)
        except OSError as exc:
            writer.abort()
            raise os_error(exc, "commit body") from None
        writer.closed = True
        now = self._clock()
        envelope, route = request.envelope, request.route
        entry = Entry(
            id=id,
            envelope=envelope,
            route=route,
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
        row = (
            id,
            entry.state,
            envelope.mail_from,
            json.dumps(list(envelope.rcpt_tos)),
            json.dumps(list(envelope.mail_options)),
            _route_to_json(route),
            route.mailbox.lower(),
            entry.created_at,
            entry.next_attempt_at,
            0,
            "",
            "",
            request.message_id,
            entry.size,
            request.client,
            "[]",
            "{}",
            now,
        )
        return entry, row

    # ----------------------------------------------------------------- reading

    def get(self, id: str) -> Entry | None:
        rows = self._read(f"SELECT {_COLUMNS} FROM messages WHERE id = ?", (id,))  # noqa: S608
        return _row_to_entry(rows[0]) if rows else None

    def list(self, states: Collection[State] | None = None) -> EntryList:
        """Messages in the given states (all if None), oldest first."""
        if states is None:
            rows = self._read(f"SELECT {_COLUMNS} FROM messages ORDER BY created_at, id")  # noqa: S608
        else:
            wanted = [str(State(s)) for s in states]
            if not wanted:
                return []
            marks = ",".join("?" * len(wanted))
            rows = self._read(
                f"SELECT {_COLUMNS} FROM messages WHERE state IN ({marks}) ORDER BY created_at, id",  # noqa: S608
                wanted,
            )
        return [_row_to_entry(r) for r in rows]

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

    def writable(self) -> bool:
        """For readiness: can we create, write, fsync and remove a small file in ``tmp/``?"""
        probe = self.tmp_dir / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            try:
                os.write(fd, b"probe\n")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError:
            return False
        return True

    # ----------------------------------------------------------------- state changes

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
        return _row_to_entry(row) if row is not None else None

    def claim_due(self, now: float, limit: int, *, skip_mailboxes: Collection[str] = ()) -> EntryList:
        """Claim up to ``limit`` QUEUED messages due at ``now``: longest-overdue first (then oldest).

        ``skip_mailboxes`` (compared case-insensitively) leaves out messages of mailboxes that are
        held or already at their connection/rate limit, so they do not block the others.
        """
        if limit <= 0:
            return []
        skip = sorted({m.lower() for m in skip_mailboxes})
        sql = f"SELECT {_COLUMNS} FROM messages WHERE state = ? AND next_attempt_at <= ?"  # noqa: S608
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
        return [dataclasses.replace(_row_to_entry(r), state=State.ACTIVE) for r in rows]

    def mark_delivered(self, id: str, reply: str) -> None:
        """Every recipient is done: remove the row (committed = durable), then the body.

        Idempotent: an unknown id is not an error (the row is already gone).
        """
        result = self.commit_group((), (id,))[0]
        if isinstance(result, SpoolError):
            raise result

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
            done, bad = _merge_results(row, delivered, failed)
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
        return _row_to_entry(new)

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
            done, bad = _merge_results(row, delivered, failed)
            conn.execute(
                "UPDATE messages SET state = ?, reason = ?, last_reply = ?, recipients_done = ?,"
                " recipients_failed = ?, updated_at = ?, attempts = attempts + ? WHERE id = ?",
                (State.DEAD, reason, reply or row["last_reply"], done, bad, self._clock(), int(attempted), id),
            )
            new = self._fetch(conn, id)
        assert new is not None
        return _row_to_entry(new)

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

    def delete_active(self, id: str) -> bool:
        """Remove an ACTIVE message (row, then body): its claimer handed Exchange's permanent
        refusal straight to the waiting client, so the spool keeps nothing. False if not ACTIVE.
        """
        with self._tx("delete") as conn:
            n = conn.execute("DELETE FROM messages WHERE id = ? AND state = ?", (id, State.ACTIVE)).rowcount
        if n != 1:
            return False
        self._unlink_body(id)
        return True

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

    def delete(self, id: str) -> bool:
        """Remove a message in any state but ACTIVE (row first, then body). False if absent/ACTIVE."""
        with self._tx("delete") as conn:
            n = conn.execute("DELETE FROM messages WHERE id = ? AND state != ?", (id, State.ACTIVE)).rowcount
        if n != 1:
            return False
        if _valid_id(id):
            self._unlink_body(id)
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
