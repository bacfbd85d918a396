"""What can go wrong with the spool directory, said so that the fix is obvious.

An OS or SQLite error becomes :class:`~relay.errors.SpoolFull` (no room, quota, read-only, not
permitted: the client gets ``452 4.3.1`` and retries) or :class:`~relay.errors.SpoolError`, with the
operation, the path and the user in the text; :func:`writable_problem` answers, without changing
anything, whether this user could use the spool at all (``check --offline``).
"""

from __future__ import annotations

import errno
import os
import pwd
import sqlite3
from pathlib import Path

from relay.errors import SpoolError, SpoolFull

__all__ = ["FULL_ERRNOS", "db_error", "os_error", "running_user", "writable_problem"]

#: errno values that mean "no room / may not write here": the client gets 452 4.3.1 and retries.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
#: SQLite result codes (primary) that mean the same.
_SQLITE_FULL_CODES = frozenset({13, 8, 3})  # SQLITE_FULL, SQLITE_READONLY, SQLITE_PERM


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


def db_error(exc: sqlite3.Error, what: str, path: Path | None = None) -> SpoolError:
    """Map a SQLite error to SpoolFull (full, read-only, not permitted) or SpoolError, as :func:`os_error`."""
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
