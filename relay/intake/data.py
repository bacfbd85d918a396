"""SMTP DATA: one DATA command is one message, whatever it contains.

The invariant this module owns (and the only place that has to keep it): once the relay has answered
``354``, it reads on to the end-of-data line, whatever happens on the way (a limit, a policy refusal,
a full disk, an exception in our own code), answers exactly one reply for that DATA, and discards the
partial body (no open file, no ``spool/tmp`` file). Only the client going away or the task being
cancelled ends the read early, and then there is no session left to desynchronise. Reading to the end
matters: a reply sent in the middle of the data would make the rest of the body be read as SMTP
commands, and a body is anything a client (or the sender of a forwarded message) put there, including
``RSET``/``MAIL``/``RCPT``/``DATA`` (SMTP smuggling).

Framing: only a line that is exactly ``.CRLF`` after a CRLF ends the data; ``\\n.\\r\\n``, ``\\r.\\r\\n``
and ``\\n.\\n`` are content. A line over the limit is read to its CRLF and dropped, never split, so
its tail cannot be taken for the end of the data.

Header work is bounded: the header block is judged once, when it ends; the common From shapes are
judged in microseconds on the event loop, anything else in a worker thread (see
:func:`relay.intake.rewrite.is_simple_address_field`), and the address parsers never see a field longer
than :data:`relay.intake.rewrite.MAX_ADDRESS_FIELD`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from relay.errors import SpoolError, SpoolFull
from relay.intake.policy import HeaderDecision, Refusal
from relay.intake.replies import (
    INTERNAL_ERROR,
    SPOOL_ERROR,
    SPOOL_FULL,
    header_too_big,
    line_too_long,
    message_too_big,
)
from relay.intake.rewrite import (
    HeaderRewriter,
    drop_fields,
    field_name,
    field_value,
    is_simple_address_field,
    split_header_fields,
)
from relay.text import CONTROL

log = logging.getLogger("relay.data")


_CHUNK = 64 * 1024
_BARE_EOL = re.compile(rb"\r\n|\n|\r")
#: Give other connections a turn after this many lines or blocks read from an already full buffer
#: (``readuntil`` does not yield while the data is there).
_YIELD_EVERY = 256

#: Header judgements that may be slow (unusual From/Sender fields) run here, off the event loop;
#: two workers so one slow message does not queue every other unusual one behind it.
_SLOW_HEADERS = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="header-check")


class BodySink(Protocol):
    """Where DATA goes as it arrives (a spool BodyWriter)."""

    def write(self, data: bytes) -> None: ...

    def abort(self) -> None: ...


class LineTooLong(Exception):
    """A line longer than the reader's limit was read and thrown away up to its end."""


async def read_line(reader: asyncio.StreamReader, separator: bytes = b"\r\n") -> bytes:
    """One line including ``separator``. A line over the reader's limit is consumed up to and
    including its separator (so the stream stays in sync: its tail is never taken for a new line)
    and :class:`LineTooLong` is raised. EOF raises :class:`asyncio.IncompleteReadError`."""
    try:
        return await reader.readuntil(separator)
    except asyncio.LimitOverrunError as exc:
        await reader.readexactly(exc.consumed)
    while True:
        try:
            await reader.readuntil(separator)
            raise LineTooLong
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)


HeaderCheck = Callable[[bytes], "HeaderDecision | Refusal"]


@dataclass(frozen=True)
class PreparedHeaders:
    """The header block as it will be stored, and what was changed in it."""

    block: bytes
    rewritten: bool = False
    sender_dropped: bool = False


def prepare_headers(block: bytes, check: HeaderCheck | None) -> PreparedHeaders | Refusal:
    """Judge a complete header block (CRLF line ends, the empty line included) and apply the
    decision: drop a Sender the client may not use, rewrite From. Pure; may be slow for unusual
    From fields, so :class:`DataReceiver` runs it off the event loop unless :func:`is_cheap`."""
    if block[:1] in (b" ", b"\t"):
        # A continuation line with no field to continue: some readers glue it to nothing, others to
        # the line before the header (or take it as a field of its own); never guess.
        return Refusal(554, "5.6.0 Message header starts with a folded (continuation) line")
    if check is None:
        return PreparedHeaders(block)
    decision = check(block)
    if isinstance(decision, Refusal):
        return decision
    sender_dropped = decision.drop_sender
    if sender_dropped:
        block = drop_fields(block, "sender")
    rewritten = decision.rewrite_to is not None
    if decision.rewrite_to is not None:
        block = HeaderRewriter(decision.rewrite_to).rewrite(block)
    return PreparedHeaders(block, rewritten=rewritten, sender_dropped=sender_dropped)


def is_cheap(block: bytes) -> bool:
    """Can :func:`prepare_headers` run on the event loop (microseconds), or does it need a worker?
    Cheap: every From and Sender field has one of the common simple shapes."""
    return all(is_simple_address_field(f) for f in split_header_fields(block)
               if field_name(f) in ("from", "sender"))


def message_id_of(block: bytes) -> str:
    """The Message-ID for logs: first field's value, control characters removed, bounded."""
    for raw in split_header_fields(block):
        if field_name(raw) == "message-id":
            return CONTROL.sub("", field_value(raw)[:1024]).strip()[:256]
    return ""


class DataReceiver:
    """Reads one DATA (after the 354) to its end-of-data line into a body sink.

    :meth:`receive` returns None when the message is complete and the sink holds it, or the one
    error reply for the client (message too big, line too long, header refused by policy, spool
    trouble, any unexpected error); in that case everything up to the end of the data has been read
    and the sink has been aborted. Connection loss and cancellation propagate (the sink aborted too).
    """

    def __init__(self, body: BodySink, *, limit: int, line_limit: int, header_limit: int = 256 * 1024,
                 check_headers: HeaderCheck | None = None,
                 keepalive: Callable[[], None] | None = None) -> None:
        self.body = body
        self.limit = limit
        self.line_limit = line_limit
        self.header_limit = header_limit
        self.check_headers = check_headers
        self.keepalive = keepalive
        self.size = 0
        self.message_id = ""
        self.rewritten = False
        self.sender_dropped = False
        self._in_headers = True
        self._headers = bytearray()
        self._buffer = bytearray()
        self._error: str | None = None
        self._too_long = line_too_long(line_limit)
        self._last_keepalive = time.monotonic()

    @property
    def error(self) -> str | None:
        return self._error

    def _fail(self, reply: str) -> None:
        """The first error wins; from then on nothing more is kept."""
        if self._error is None:
            self._error = reply
            self._buffer.clear()
            self._headers.clear()

    def _fail_on(self, exc: Exception) -> None:
        if isinstance(exc, SpoolFull):
            self._fail(SPOOL_FULL)
        elif isinstance(exc, (SpoolError, OSError)):
            self._fail(SPOOL_ERROR)
        else:
            # Only the class name reaches the log: the text may quote client data.
            log.error("unexpected error while receiving a message: %s", type(exc).__name__,
                      extra={"event": "data_error", "error_type": type(exc).__name__})
            self._fail(INTERNAL_ERROR)

    async def receive(self, reader: asyncio.StreamReader) -> str | None:
        try:
            await self._receive(reader)
        except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError):
            self.body.abort()
            raise
        except Exception as exc:  # reading itself failed: the framing is lost
            self.body.abort()
            log.error("DATA read failed: %s", type(exc).__name__,
                      extra={"event": "data_error", "error_type": type(exc).__name__})
            raise ConnectionResetError("DATA could not be read to its end") from None
        if self._error is not None:
            self.body.abort()
        return self._error

    def _tick(self) -> None:
        if self.keepalive is not None and time.monotonic() - self._last_keepalive > 1.0:
            self._last_keepalive = time.monotonic()
            self.keepalive()

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        # The header block line by line (it is small and judged field by field), then the body in
        # blocks: one Python step per line cost ~15 % of the CPU per message.
        lines = 0
        while self._in_headers and self._error is None:
            try:
                line = await read_line(reader)
            except LineTooLong:
                self._fail(self._too_long)
                break
            if line == b".\r\n":
                await self._finish()
                return
            lines += 1
            if lines % _YIELD_EVERY == 0:
                self._tick()
                await asyncio.sleep(0)
            if len(line) > self.line_limit + 2:
                self._fail(self._too_long)
                break
            if line.startswith(b"."):
                line = line[1:]
            self.size += len(line)
            if self.size > self.limit:
                self._fail(self._too_big())
                break
            if self._take_header_line(line):
                await self._end_headers()
        await self._receive_blocks(reader)
        await self._finish()

    def _too_big(self) -> str:
        return message_too_big(self.limit)

    async def _receive_blocks(self, reader: asyncio.StreamReader) -> None:
        """The rest of DATA, from a line start to the line ``.CRLF``, in blocks.

        ``readuntil(b".\r\n")`` stops at every ``.CRLF``; it ends the data only when the dot starts
        a line (right after a CRLF), so ``\n.\r\n`` and ``\r.\r\n`` stay content as in the line
        loop. ``tail`` holds an incomplete line: blocks are judged (line length, dot-unstuffing,
        size) only up to their last CRLF.
        """
        tail = b""
        blocks = 0
        while True:
            try:
                chunk = await reader.readuntil(b".\r\n")
            except asyncio.LimitOverrunError as exc:  # no .CRLF within the reader's limit: take a block
                chunk = await reader.readexactly(exc.consumed)
            blocks += 1
            if blocks % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            self._tick()
            data = tail + chunk
            final = data == b".\r\n" or data.endswith(b"\r\n.\r\n")
            if final:
                complete, tail = data[:-3], b""
            else:
                cut = data.rfind(b"\r\n") + 2
                complete, tail = data[:cut], data[cut:]
                if len(tail) > self.line_limit + 2:
                    # An over-long line: refuse the message, keep reading; "x" marks "not at a line
                    # start" without keeping the line in memory.
                    self._fail(self._too_long)
                    tail = b"x"
            if complete and self._error is None:
                try:
                    self._take_block(complete)
                except Exception as exc:  # the one-reply invariant (module doc)
                    self._fail_on(exc)
            if final:
                return

    def _take_block(self, complete: bytes) -> None:
        """Whole lines (from a line start, ending with CRLF): limits, dot-unstuffing, then the body."""
        if max(map(len, complete.split(b"\r\n"))) > self.line_limit:
            self._fail(self._too_long)
            return
        unstuffed = (b"\r\n" + complete).replace(b"\r\n.", b"\r\n")[2:]
        self.size += len(unstuffed)
        if self.size > self.limit:
            self._fail(self._too_big())
            return
        if self._in_headers:  # only after an error in the header loop, and then nothing is kept
            return
        self._buffer += unstuffed
        if len(self._buffer) >= _CHUNK:
            self.body.write(bytes(self._buffer))
            self._buffer.clear()

    def _take_header_line(self, line: bytes) -> bool:
        """Add one line to the header block; True when it was the empty line that ends the block.

        Judge the header block exactly as Exchange will see it: upstream turns every bare LF or CR
        into CRLF, so a bare one here may end the header block or start a new field."""
        pieces = _BARE_EOL.sub(b"\r\n", line).split(b"\r\n")[:-1]
        for i, piece in enumerate(pieces):
            self._headers += piece + b"\r\n"
            if piece == b"":
                rest = b"".join(p + b"\r\n" for p in pieces[i + 1:])
                if rest:
                    self._buffer += rest
                return True
        if len(self._headers) > self.header_limit:
            self._fail(header_too_big(self.header_limit))
        return False

    async def _end_headers(self) -> None:
        """Judge the header block and write it (changed as policy says) to the body sink."""
        self._in_headers = False
        block = bytes(self._headers)
        self._headers.clear()
        try:
            self.message_id = message_id_of(block)
            if is_cheap(block):
                prepared = prepare_headers(block, self.check_headers)
            else:
                loop = asyncio.get_running_loop()
                prepared = await loop.run_in_executor(_SLOW_HEADERS, prepare_headers, block,
                                                      self.check_headers)
            if isinstance(prepared, Refusal):
                self._fail(prepared.reply)
                return
            self.rewritten = prepared.rewritten
            self.sender_dropped = prepared.sender_dropped
            self.body.write(prepared.block)
        except Exception as exc:  # the one-reply invariant (module doc)
            self._fail_on(exc)

    async def _finish(self) -> None:
        if self._in_headers and self._error is None:
            await self._end_headers()
        if self._error is None and self._buffer:
            try:
                self.body.write(bytes(self._buffer))
            except Exception as exc:  # the one-reply invariant (module doc)
                self._fail_on(exc)
            self._buffer.clear()


Accept = Callable[[DataReceiver], Awaitable[str]]


async def take_message(reader: asyncio.StreamReader, receiver: DataReceiver, accept: Accept) -> str:
    """Read one DATA through ``receiver`` and hand a complete message to ``accept`` (store, maybe
    deliver): the one reply for this DATA. Whatever fails, the data has been read to its end and an
    unaccepted body has been aborted; only connection loss and cancellation propagate."""
    reply = await receiver.receive(reader)
    if reply is not None:
        return reply
    try:
        return await accept(receiver)
    except SpoolFull:
        receiver.body.abort()
        return SPOOL_FULL
    except asyncio.CancelledError:
        # The client left while the message was being stored: the spool's committer owns the body
        # now (a message stored for nobody is delivered anyway), so it is not aborted here.
        raise
    except Exception as exc:  # the one-reply invariant (module doc)
        receiver.body.abort()
        log.error("could not accept a message: %s", type(exc).__name__,
                  extra={"event": "accept_failed", "error_type": type(exc).__name__})
        return INTERNAL_ERROR
