"""The spool's vocabulary: queue ids, the states a message goes through, and the snapshots the spool
hands out (:class:`Entry` for one message, :class:`SpoolStats` for the whole queue).

Pure data: nothing here touches the disk (the spool's modules do, behind :class:`relay.queue.spool.Spool`).
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum

from relay.envelope import Envelope, Route

__all__ = ["Entry", "SpoolStats", "State", "new_queue_id", "valid_queue_id"]

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


def valid_queue_id(id: str) -> bool:
    """Is ``id`` a queue id (and so a safe file name inside ``bodies/``)?"""
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
class SpoolStats:
    counts: dict[State, int]
    oldest_created_at: float | None  # oldest QUEUED or ACTIVE message (for the queue-age alarm)
    total_bytes: int

    @property
    def total(self) -> int:
        return sum(self.counts.values())
