"""PIPELINING and CHUNKING/BDAT for the simulated Exchange, and a count of round trips per message.

Exchange Online's EHLO offers both ``PIPELINING`` (RFC 2920) and ``CHUNKING`` (RFC 3030, with
``BINARYMIME``). aiosmtpd already serves pipelined commands (it reads commands one line at a time
from its buffer, whatever arrived at once); it has no BDAT. :class:`ChunkingMixin` adds BDAT, lets
a test switch either extension off (then it is not offered, and BDAT is an unknown command), and
counts the round trips each transaction cost.

A round trip is counted when the server sends a reply and has nothing more from the client to work
on: the client must read that reply before the transaction can go on (or, for the last reply, before
it is done). From MAIL to the final reply: step by step 4 (MAIL, RCPT, DATA, end of data), MAIL +
RCPT + DATA pipelined 2 (354, end of data), MAIL + RCPT + ``BDAT n LAST`` with the message 1.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP, Envelope

#: Exchange's reply to a BDAT chunk that is not the last (the exact text is *unverified*).
CHUNK_OK = "250 2.6.0 {size} octets received"
UNKNOWN_COMMAND = "500 5.3.3 Unrecognized command"


@dataclass(frozen=True)
class Transaction:
    """One mail transaction as the server saw it."""

    round_trips: int
    reply: str  # the final reply (after DATA's end or BDAT LAST), or "RSET"
    bdat_chunks: int = 0


@dataclass
class WireFeatures:
    """Switches and records for the extensions (thread-safe: tests flip them while sessions live)."""

    pipelining: bool = True
    chunking: bool = True
    #: recipient address (lower case) -> the reply its RCPT gets instead of the normal checks
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    _transactions: list[Transaction] = field(default_factory=list)
    _lock: threading.Condition = field(default_factory=threading.Condition)

    @property
    def transactions(self) -> list[Transaction]:
        with self._lock:
            return list(self._transactions)

    def record(self, transaction: Transaction) -> None:
        with self._lock:
            self._transactions.append(transaction)
            self._lock.notify_all()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Transaction]:
        """The first ``count`` transactions, waiting (bounded) until they are recorded."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self._transactions) >= count, timeout):
                raise TimeoutError(f"{len(self._transactions)} of {count} transactions after {timeout}s")
            return list(self._transactions)

    def clear(self) -> None:
        with self._lock:
            self._transactions.clear()
            self.rcpt_replies.clear()

    def rcpt_reply(self, arg: str) -> str | None:
        with self._lock:
            for address, reply in self.rcpt_replies.items():
                if f"<{address}>" in arg.lower():
                    return reply
        return None


class ChunkingMixin(SMTP):
    """BDAT, the EHLO switches and the round-trip count, over an aiosmtpd session class.

    The session class it is mixed into supplies :attr:`wire`, ``_require()`` (the preconditions of
    MAIL/RCPT/DATA, sending the refusal) and ``finish_data()`` (the reply at the end of a message)."""

    if TYPE_CHECKING:  # supplied by the Exchange session class it is mixed into

        @property
        def wire(self) -> WireFeatures: ...

        async def _require(self, *, auth: bool) -> bool: ...

        async def finish_data(self, envelope: Envelope) -> str: ...

        def take_drop_fault(self) -> bool: ...

        def abort(self) -> None: ...

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._chunks = bytearray()
        self._chunk_count = 0
        self._chunk_refusal: str | None = None
        self._round_trips: int | None = None  # None: no transaction open
        self._filter_ehlo = False
        super().__init__(*args, **kwargs)

    # -- counting ------------------------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        if self._filter_ehlo and isinstance(status, str) and status.startswith("250-"):
            status = self._offered(status)
        if isinstance(status, bytes):
            await super().push(status)
        else:
            await super().push(status)
        if self._round_trips is not None and not self._buffered():
            self._round_trips += 1
        text = status.decode("ascii", "replace") if isinstance(status, bytes) else status
        if text.startswith("421") and self.session is not None and self.session.host_name:
            # The channel is closed: commands the client pipelined behind this one are never carried out.
            raise asyncio.CancelledError

    def _buffered(self) -> bool:
        """Client bytes received and not yet read by the session."""
        return bool(getattr(self._reader, "_buffer", b""))

    def _end_transaction(self, reply: str) -> None:
        if self._round_trips is not None:
            self.wire.record(Transaction(self._round_trips, reply, self._chunk_count))
        self._round_trips = None
        self._chunks = bytearray()
        self._chunk_count = 0
        self._chunk_refusal = None

    def _set_rset_state(self) -> None:
        if self._round_trips is not None:
            self._end_transaction("RSET")
        super()._set_rset_state()  # type: ignore[no-untyped-call]

    # -- commands ------------------------------------------------------------------------------

    def _offered(self, status: str) -> str:
        lines = [line[4:] for line in status.split("\r\n")]
        off = set()
        if not self.wire.pipelining:
            off.add("PIPELINING")
        if not self.wire.chunking:
            off |= {"CHUNKING", "BINARYMIME"}
        lines = [line for line in lines if line.upper() not in off]
        return "\r\n".join(f"250-{line}" for line in lines[:-1]) + f"\r\n250 {lines[-1]}"

    async def smtp_EHLO(self, hostname: str) -> None:
        self._filter_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._filter_ehlo = False

    async def smtp_MAIL(self, arg: str | None) -> None:
        self._round_trips = 0
        await super().smtp_MAIL(arg)
        if self.envelope is None or self.envelope.mail_from is None:
            self._end_transaction("MAIL refused")

    async def smtp_RCPT(self, arg: str | None) -> None:
        forced = self.wire.rcpt_reply(arg or "")
        if forced is not None and self.envelope is not None and self.envelope.mail_from is not None:
            await self.push(forced)
            return
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str | None) -> None:
        await super().smtp_DATA(arg)
        if self.envelope is not None and self.envelope.mail_from is None:  # the message went through
            self._end_transaction("DATA")

    async def smtp_BDAT(self, arg: str | None) -> None:
        """``BDAT <size> [LAST]``: take exactly ``size`` octets, whatever the reply will be."""
        if not self.wire.chunking:
            await self.push(UNKNOWN_COMMAND)
            return
        parts = (arg or "").split()
        if not 1 <= len(parts) <= 2 or not parts[0].isdigit() or (len(parts) == 2 and parts[1].upper() != "LAST"):
            await self.push("501 5.5.4 Syntax: BDAT <size> [LAST]")
            return
        size, last = int(parts[0]), len(parts) == 2
        if self.take_drop_fault():
            await self._reader.readexactly(min(size, 64))
            self.abort()
            raise asyncio.CancelledError  # stop the command loop: the rest is message, not commands
        chunk = await self._reader.readexactly(size)
        self._chunk_count += 1
        if await self._require(auth=True):
            return
        assert self.envelope is not None
        if self.envelope.mail_from is None:
            await self.push("503 5.5.1 Need mail command")
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.2 Need rcpt command")
            return
        if self._chunk_refusal is None and len(self._chunks) + size > (self.data_size_limit or size):
            self._chunk_refusal = "552 5.3.4 Message size exceeds fixed maximum message size"
        if self._chunk_refusal is None:
            self._chunks += chunk
        if not last:
            await self.push(self._chunk_refusal or CHUNK_OK.format(size=size))
            return
        if self._chunk_refusal is not None:
            reply = self._chunk_refusal
        else:
            content = bytes(self._chunks)
            self.envelope.original_content = content
            self.envelope.content = content
            reply = await self.finish_data(self.envelope)
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(reply)
        self._end_transaction(reply)
