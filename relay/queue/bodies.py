"""The spool's files: the directories, and one body file per message.

A body is streamed into ``tmp/`` by a :class:`BodyWriter` while SMTP DATA arrives; committing it
fsyncs the file and renames it into ``bodies/`` under its queue id (the spool then fsyncs ``bodies/``
and commits the row: the order is the spool's durability contract, see :mod:`relay.queue.spool`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from relay.errors import SpoolError
from relay.queue.problems import os_error

__all__ = ["DIR_MODE", "FILE_MODE", "BodyWriter", "can_write", "free_bytes", "fsync_dir", "make_directories",
           "unlink_body"]

DIR_MODE = 0o700
FILE_MODE = 0o600


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_directories(directories: Iterable[Path], *, fsync: bool) -> None:
    """Create each missing directory (mode 0700), fsyncing its parent so the new entry survives a crash.
    Raises OSError."""
    for d in directories:
        if not d.is_dir():
            d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            if fsync:
                fsync_dir(d.parent)


def unlink_body(bodies_dir: Path, id: str) -> None:
    # Not fsync'd: if the unlink is lost in a crash, recovery removes the body without a row.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(bodies_dir / id)


def free_bytes(path: Path) -> int:
    """Free space for an unprivileged writer on the filesystem of ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def can_write(directory: Path) -> bool:
    """For readiness: can we create, write, fsync and remove a small file in ``directory``?"""
    probe = directory / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
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


class BodyWriter:
    """Streams one message body into ``tmp/`` while SMTP DATA arrives.

    Hand it to :meth:`Spool.store` to commit it, or call :meth:`abort`. As a context manager it
    aborts on leaving unless stored. Write errors are raised as SpoolFull/SpoolError after the tmp
    file has been removed, so a failed write leaves nothing behind.
    """

    def __init__(self, owner: object, id: str, path: Path, keep: int = 0) -> None:
        #: The spool that made this writer: only it may commit the body.
        self.owner = owner
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

    def commit(self, owner: object, bodies_dir: Path, *, fsync: bool) -> None:
        """fsync the body (if ``fsync``), close it and rename it into ``bodies_dir`` under its id; the
        caller then fsyncs ``bodies_dir`` and commits the row. Refuses a writer that another spool made
        or that was aborted or already committed; on any error the tmp file is gone."""
        if self.owner is not owner:
            raise SpoolError("spool: body writer belongs to another spool")
        if self.closed or self._fd is None:
            raise SpoolError("spool: body writer was aborted or already stored")
        self._finish(fsync)
        try:
            os.rename(self.path, bodies_dir / self.id)
        except OSError as exc:
            self.abort()
            raise os_error(exc, "commit body") from None
        self.closed = True

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
