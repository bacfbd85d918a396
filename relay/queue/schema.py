"""The spool's SQLite database: its schema and migrations, how a connection is set up, and how a row
maps to an :class:`~relay.queue.entries.Entry` and back.

One table, ``messages``, one row per message (the truth about its state). ``PRAGMA user_version``
holds the schema version: an older database is brought up to date when opened, a newer one refused.
"""

# SQL note: every f-string below interpolates only module constants or "?" placeholders (S608).

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from relay.envelope import Envelope, Route
from relay.errors import SpoolError
from relay.queue.bodies import FILE_MODE
from relay.queue.entries import Entry, State
from relay.queue.problems import db_error

__all__ = ["BUSY_TIMEOUT_MS", "COLUMNS", "DELETE", "INSERT", "SCHEMA_VERSION", "SELECT_BY_ID", "connect",
           "entry_to_row", "merge_results", "row_to_entry"]

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 10_000

COLUMNS = (
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

SELECT_BY_ID = f"SELECT {COLUMNS} FROM messages WHERE id = ?"  # noqa: S608
INSERT = f"INSERT INTO messages ({COLUMNS}, updated_at) VALUES ({', '.join('?' * 18)})"  # noqa: S608
DELETE = "DELETE FROM messages WHERE id = ?"


def connect(db_path: Path, *, fsync: bool) -> sqlite3.Connection:
    """Open the database in WAL mode (``synchronous=FULL`` with ``fsync``, else OFF), create or migrate
    its schema. Raises SpoolFull/SpoolError naming the file and the user."""
    try:
        conn = sqlite3.connect(
            db_path,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # the spool guards it with a lock
        )
    except sqlite3.Error as exc:
        raise db_error(exc, "open database", db_path) from None
    conn.row_factory = sqlite3.Row
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise SpoolError(f"spool: database refuses WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'OFF'}")
        with contextlib.suppress(OSError):
            os.chmod(db_path, FILE_MODE)
        _migrate(conn)
    except sqlite3.Error as exc:
        conn.close()
        raise db_error(exc, "prepare database", db_path) from None
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
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


def _route_to_json(route: Route) -> str:
    return json.dumps(dataclasses.asdict(route), separators=(",", ":"))


def _route_from_json(text: str) -> Route:
    data: dict[str, Any] = json.loads(text)
    known = {f.name for f in dataclasses.fields(Route)}
    kwargs = {k: v for k, v in data.items() if k in known}
    if "notes" in kwargs:
        kwargs["notes"] = tuple(kwargs["notes"])
    return Route(**kwargs)


def entry_to_row(entry: Entry, updated_at: float) -> tuple[Any, ...]:
    """The values for :data:`INSERT` (the columns in :data:`COLUMNS` order, then ``updated_at``)."""
    envelope, route = entry.envelope, entry.route
    return (
        entry.id,
        entry.state,
        envelope.mail_from,
        json.dumps(list(envelope.rcpt_tos)),
        json.dumps(list(envelope.mail_options)),
        _route_to_json(route),
        route.mailbox.lower(),
        entry.created_at,
        entry.next_attempt_at,
        entry.attempts,
        entry.last_reply,
        entry.reason,
        entry.message_id,
        entry.size,
        entry.client,
        json.dumps(list(entry.recipients_done)),
        json.dumps(dict(entry.recipients_failed)),
        updated_at,
    )


def row_to_entry(row: sqlite3.Row) -> Entry:
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


def merge_results(
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
