"""One mail transaction on an authenticated session, step by step or in one flight.

aiosmtplib connects, runs STARTTLS and AUTH; this module runs MAIL / RCPT / DATA (or BDAT) on the
session it made. Two ways, one interface (:class:`Transaction`), so :mod:`relay.microsoft.upstream` classifies
every reply with the same code whichever way it travelled:

* :class:`StepByStep`: aiosmtplib's commands, one round trip per command (and DATA's two).
* :class:`Pipelined`: when the server advertises PIPELINING (RFC 2920), MAIL, every RCPT and DATA
  go out in one write; the message follows the ``354``. When it also advertises CHUNKING (RFC 3030),
  the message goes in the same write as ``BDAT <size> LAST`` (a spool file as several BDAT chunks,
  the last one ``LAST``): one round trip per message.

The replies of a flight are read and handed out one by one, in command order: :meth:`Transaction.mail`
raises :class:`aiosmtplib.SMTPSenderRefused`, :meth:`Transaction.rcpt`
:class:`aiosmtplib.SMTPRecipientRefused`, :meth:`Transaction.data` :class:`aiosmtplib.SMTPDataError`,
exactly as aiosmtplib's own ``mail()``, ``rcpt()`` and ``data()`` do for the same reply.

aiosmtplib's protocol keeps one reply and drops what arrives while no command awaits one, so a
pipelined transaction reads its replies with its own small protocol object (:class:`_ReplyReader`),
swapped in on the session's transport with the public ``set_protocol()`` for the transaction and
swapped back after its last reply; aiosmtplib's protocol then finds the session as it left it.

The two things a flight cannot take back:

* After ``354`` the message must follow or the connection must close (there is no way to cancel
  DATA). A transaction given up after ``354`` (every recipient refused, a refusal of the message at
  RCPT) closes the session: nothing is delivered, as on the step-by-step path.
* ``BDAT ... LAST`` is sent before any reply is seen. Where the step-by-step path would stop at a
  refusal of the whole message at RCPT (a 5.7.60 for the third recipient) the server has already
  taken the message for the recipients it accepted; :meth:`Pipelined.committed` says so, and the
  caller reports what the server did (delivered for those, the refusal for that recipient) instead
  of retrying a message that was delivered.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Literal

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import SMTPProtocol

from relay.text import CONTROL_BYTES

__all__ = [
    "Pipelined",
    "StepByStep",
    "Transaction",
    "begin",
    "flight_mode",
    "stream_data",
    "wire_blocks",
]

Mode = Literal["pipelining", "chunking"]

#: Bytes of a spool file read and sent at a time (one BDAT chunk each on the CHUNKING path).
STREAM_CHUNK = 256 * 1024
#: A reply (all its lines) longer than this ends the session: no real server sends one.
MAX_REPLY = 32 * 1024
_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r(?!\n)")
_LEADING_DOT = re.compile(rb"(?m)^\.")


def flight_mode(smtp: aiosmtplib.SMTP) -> Mode | None:
    """How much of a transaction can go in one flight on this session (from its EHLO)."""
    if not smtp.supports_extension("pipelining"):
        return None
    return "chunking" if smtp.supports_extension("chunking") else "pipelining"


# -- the message on the wire -------------------------------------------------------------------


def crlf_block(block: bytes) -> bytes:
    """CRLF line endings (a bare CR or LF becomes CRLF): the bytes both DATA and BDAT carry."""
    crlf = block.count(b"\r\n")
    if block.count(b"\n") == crlf and block.count(b"\r") == crlf:
        return block  # already CRLF throughout (what the listener stores): no regex
    return _LINE_ENDINGS.sub(b"\r\n", block)


def dot_stuff(block: bytes, at_line_start: bool) -> bytes:
    """RFC 5321 4.5.2 transparency for a CRLF block; ``at_line_start``: its first byte starts a line."""
    if b"\n." in block:
        block = block.replace(b"\n.", b"\n..")
    return b"." + block if at_line_start and block[:1] == b"." else block


async def wire_blocks(source: Path | bytes) -> AsyncIterator[bytes]:
    """The message as CRLF blocks, ending with CRLF (one is added when the message lacks it).

    A spool file is read in chunks and cut after a LF (never after a CR, which may pair with the
    next LF), so each block's line endings come out as for the whole message; memory stays flat."""
    if isinstance(source, bytes):
        out = crlf_block(source)
        yield out if out.endswith(b"\r\n") else out + b"\r\n"
        return
    last = b"\n"
    carry = b""
    with source.open("rb") as f:
        eof = False
        while True:
            chunk = b"" if eof else await asyncio.to_thread(f.read, STREAM_CHUNK)
            # A regular file reads short only at its end: no second thread hop just to learn that.
            eof = len(chunk) < STREAM_CHUNK
            data = carry + chunk
            if not chunk:
                block, carry = data, b""
            else:
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # a very long line: cut anywhere but after a CR
                    cut = len(data) - 1 if data.endswith(b"\r") else len(data)
                block, carry = data[:cut], data[cut:]
            if block:
                out = crlf_block(block)
                last = out[-2:] if len(out) >= 2 else last[-1:] + out
                yield out
            if not chunk:
                break
    if last != b"\r\n":
        yield b"\r\n"


async def _send_dot_stuffed(write: _Writer, source: Path | bytes) -> None:
    """The message as DATA carries it: CRLF, dot-stuffed, then the ``.`` line."""
    at_line_start = True
    pending = b""
    async for block in wire_blocks(source):
        if pending:
            write.write(pending)
            await write.drain()
        pending = dot_stuff(block, at_line_start)
        at_line_start = block.endswith(b"\n")
    write.write(pending + b".\r\n")  # the last block and the end in one write: one segment for a small message


async def drained(wait: Awaitable[None], seconds: float) -> None:
    """Wait for the socket buffer to drain, at most ``seconds``."""
    try:
        await asyncio.wait_for(wait, seconds)
    except TimeoutError:
        raise aiosmtplib.SMTPTimeoutError("Timed out sending the message data") from None


class _Writer:
    """write() and drain() over aiosmtplib's protocol or a :class:`_ReplyReader`; a server that
    stops reading mid-message does not hold the attempt beyond ``timeout``."""

    def __init__(self, protocol: SMTPProtocol | _ReplyReader, timeout: float) -> None:
        self._protocol = protocol
        self._timeout = timeout

    def write(self, data: bytes) -> None:
        self._protocol.write(data)

    async def drain(self) -> None:
        # Flow control: wait while the socket buffer is full (aiosmtplib's FlowControlMixin).
        drain = getattr(self._protocol, "_drain_helper", None)
        if drain is not None:
            await drained(drain(), self._timeout)


async def stream_data(smtp: aiosmtplib.SMTP, source: Path | bytes, command_timeout: float) -> aiosmtplib.SMTPResponse:
    """DATA step by step, the message from a spool file in chunks (or from memory): the bytes
    aiosmtplib's ``data()`` would send (CRLF normalised, dot-stuffed) without holding a big message."""
    response = await smtp.execute_command(b"DATA", timeout=command_timeout)
    if response.code != 354:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    await _send_dot_stuffed(_Writer(protocol, command_timeout), source)
    response = await protocol.read_response(timeout=command_timeout)
    if response.code != 250:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


# -- commands ----------------------------------------------------------------------------------


def _command(*parts: bytes) -> bytes:
    for part in parts:
        if CONTROL_BYTES.search(part):
            # The same refusal as aiosmtplib's execute_command(): no CR/LF injection on a command line.
            raise ValueError("Command arg contains a prohibited control character")
    return b" ".join(parts) + b"\r\n"


def mail_command(sender: str, options: list[str], encoding: str) -> bytes:
    """``MAIL FROM:<sender> options``, built as aiosmtplib's ``mail()`` builds it."""
    return _command(b"MAIL", b"FROM:" + quote_address(sender).encode(encoding), *(o.encode("ascii") for o in options))


def rcpt_command(recipient: str, encoding: str) -> bytes:
    """``RCPT TO:<recipient>``, built as aiosmtplib's ``rcpt()`` builds it."""
    return _command(b"RCPT", b"TO:" + quote_address(recipient).encode(encoding))


# -- the interface ------------------------------------------------------------------------------


class Transaction(ABC):
    """MAIL, each RCPT, then DATA/BDAT, with aiosmtplib's exceptions for refusals.

    Call :meth:`start` (sends what can be sent now), :meth:`mail`, :meth:`rcpt` for every recipient
    in order, then either :meth:`data` or :meth:`abandon`. After :meth:`data` returned or
    :meth:`abandon` returned True, the session is aiosmtplib's again (RSET, the next message)."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def mail(self) -> aiosmtplib.SMTPResponse: ...

    @abstractmethod
    async def rcpt(self, recipient: str) -> aiosmtplib.SMTPResponse: ...

    @abstractmethod
    async def data(self) -> aiosmtplib.SMTPResponse: ...

    async def committed(self) -> bool:
        """True when the server already has the message for the recipients it accepted."""
        return False

    async def abandon(self) -> bool:
        """Give the transaction up; True when the session can be RSET and reused, False: close it."""
        return True


class StepByStep(Transaction):
    """aiosmtplib's commands, one reply awaited before the next command."""

    def __init__(self, smtp: aiosmtplib.SMTP, sender: str, options: list[str], body: Path | bytes,
                 encoding: str, timeout: float) -> None:
        self._smtp = smtp
        self._sender = sender
        self._options = options
        self._body = body
        self._encoding = encoding
        self._timeout = timeout

    async def start(self) -> None:
        return None

    async def mail(self) -> aiosmtplib.SMTPResponse:
        return await self._smtp.mail(self._sender, options=self._options, encoding=self._encoding)

    async def rcpt(self, recipient: str) -> aiosmtplib.SMTPResponse:
        return await self._smtp.rcpt(recipient, encoding=self._encoding)

    async def data(self) -> aiosmtplib.SMTPResponse:
        return await stream_data(self._smtp, self._body, self._timeout)


class _ReplyReader(asyncio.Protocol):
    """Reads every reply of a flight in order; installed on the session's transport meanwhile.

    Replies are parsed as they arrive (RFC 5321 4.2: ``NNN-text`` continuation lines, ``NNN text``
    last line) and queued; loss of the connection is queued after them, so replies the server sent
    before closing (a ``421``) are still read."""

    def __init__(self, transport: asyncio.Transport, previous: asyncio.BaseProtocol) -> None:
        self.transport = transport
        self.previous = previous
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._replies: collections.deque[aiosmtplib.SMTPResponse] = collections.deque()
        self._error: Exception | None = None
        self._changed = asyncio.Event()
        self._paused = False
        self._resumed = asyncio.Event()
        self._resumed.set()
        self.lost = False

    # asyncio.Protocol
    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._error is None:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY:
                    self._fail(aiosmtplib.SMTPResponseException(-1, "Response too long"))
                break
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            self._take_line(line)
        self._changed.set()

    def _take_line(self, line: bytes) -> None:
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"-", b" ", b"\r", b"\n"):
            text = line.decode("utf-8", "replace").strip()
            self._fail(aiosmtplib.SMTPResponseException(-1, f"Malformed SMTP response line: {text[:200]}"))
            return
        self._lines.append(line)
        if sum(len(x) for x in self._lines) > MAX_REPLY:
            self._fail(aiosmtplib.SMTPResponseException(-1, "Response too long"))
            return
        if line[3:4] == b"-":
            return
        joined = b"\n".join(x[4:].strip(b" \t\r\n") for x in self._lines)
        self._replies.append(aiosmtplib.SMTPResponse(int(line[:3]), joined.decode("utf-8", "surrogateescape")))
        self._lines = []

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._changed.set()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        error = aiosmtplib.SMTPServerDisconnected("Connection lost")
        error.__cause__ = exc
        self._fail(error)
        self._resumed.set()
        # aiosmtplib's protocol learns it too: the SMTP object then reports itself disconnected.
        self.previous.connection_lost(exc)

    def pause_writing(self) -> None:
        self._paused = True
        self._resumed.clear()

    def resume_writing(self) -> None:
        self._paused = False
        self._resumed.set()

    @property
    def paused(self) -> bool:
        return self._paused

    # for the transaction
    def write(self, data: bytes) -> None:
        if self.lost or self.transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self.transport.write(data)

    async def _drain_helper(self) -> None:
        if self.lost:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        await self._resumed.wait()

    async def reply(self, seconds: float) -> aiosmtplib.SMTPResponse:
        """The next reply; SMTPServerDisconnected / SMTPReadTimeoutError when none will come."""
        deadline = asyncio.get_running_loop().time() + seconds
        while not self._replies:
            if self._error is not None:
                raise self._error
            self._changed.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._changed.wait()
            except TimeoutError as exc:
                raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from exc
        return self._replies.popleft()

    @property
    def idle(self) -> bool:
        """Nothing unread: swapping the session back loses no byte."""
        return not self._buffer and not self._lines and not self._replies and self._error is None


class Pipelined(Transaction):
    """MAIL, RCPT... and DATA (or BDAT and the message) written at once; replies read in order."""

    def __init__(self, smtp: aiosmtplib.SMTP, sender: str, options: list[str], rcpts: tuple[str, ...],
                 body: Path | bytes, encoding: str, timeout: float, mode: Mode) -> None:
        self._smtp = smtp
        self._sender = sender
        self._options = options
        self._rcpts = rcpts
        self._body = body
        self._encoding = encoding
        self._timeout = timeout
        self.mode: Mode = mode
        self._reader: _ReplyReader | None = None
        self._outstanding = 0  # replies the server owes for what was sent
        self._next_rcpt = 0  # recipients handed out by rcpt()
        self._chunks = 0  # BDAT commands sent
        self._ahead: collections.deque[aiosmtplib.SMTPResponse] = collections.deque()  # RCPT replies read ahead
        self._final: aiosmtplib.SMTPResponse | Exception | None = None  # CHUNKING path, once read
        self._error: Exception | None = None  # no further reply will come
        self._awaiting_message = False  # DATA path: the server said 354

    async def start(self) -> None:
        protocol = self._smtp.protocol
        transport = protocol.transport if protocol is not None else None
        if protocol is None or not isinstance(transport, asyncio.Transport) or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        head = b"".join([mail_command(self._sender, self._options, self._encoding),
                         *(rcpt_command(r, self._encoding) for r in self._rcpts)])
        reader = _ReplyReader(transport, protocol)
        transport.set_protocol(reader)
        self._reader = reader
        self._outstanding = 1 + len(self._rcpts)
        if self.mode == "pipelining":
            self._outstanding += 1
            reader.write(head + b"DATA\r\n")
            return
        if isinstance(self._body, bytes):
            (block,) = [b async for b in wire_blocks(self._body)]
            self._bdat(head, block, last=True)
            return
        pending: bytes | None = None
        try:
            async for block in wire_blocks(self._body):
                if pending is not None:
                    self._bdat(head, pending, last=False)
                    head = b""
                    await drained(reader._drain_helper(), self._timeout)
                pending = block
            self._bdat(head, pending or b"", last=True)
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
            # The server closed while the message was still going out (a 421 to MAIL): its replies
            # so far are read as usual; after them mail()/rcpt()/data() say the connection is lost.
            if not head:  # the commands went out: there is something to read
                return
            raise

    def _bdat(self, head: bytes, chunk: bytes, *, last: bool) -> None:
        assert self._reader is not None
        self._reader.write(head + b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk)
        self._outstanding += 1
        self._chunks += 1

    async def _reply(self) -> aiosmtplib.SMTPResponse:
        if self._error is not None:
            raise self._error
        assert self._reader is not None
        try:
            response = await self._reader.reply(self._timeout)
        except Exception as exc:
            self._error = exc
            raise
        self._outstanding -= 1
        return response

    async def mail(self) -> aiosmtplib.SMTPResponse:
        response = await self._reply()
        if response.code != 250:
            raise aiosmtplib.SMTPSenderRefused(response.code, response.message, self._sender)
        return response

    async def rcpt(self, recipient: str) -> aiosmtplib.SMTPResponse:
        index = self._next_rcpt
        if index >= len(self._rcpts) or self._rcpts[index] != recipient:
            raise ValueError("recipients must be taken in the order they were sent")
        self._next_rcpt += 1
        response = self._ahead.popleft() if self._ahead else await self._reply()
        if response.code not in (250, 251):
            raise aiosmtplib.SMTPRecipientRefused(response.code, response.message, recipient)
        return response

    async def committed(self) -> bool:
        if self.mode != "chunking":
            return False
        if self._final is None:
            # Read the remaining RCPT replies (kept for rcpt()), then the BDAT replies.
            with contextlib.suppress(Exception):  # kept in self._error: raised by rcpt() / data()
                while len(self._ahead) < len(self._rcpts) - self._next_rcpt:
                    self._ahead.append(await self._reply())
                await self._read_final()
        return isinstance(self._final, aiosmtplib.SMTPResponse)

    async def _read_final(self) -> None:
        """Every BDAT chunk's reply: the last one's, or SMTPDataError for the first refusal."""
        refusal: aiosmtplib.SMTPResponse | None = None
        response = aiosmtplib.SMTPResponse(-1, "")
        for _ in range(self._chunks):
            response = await self._reply()
            if response.code != 250 and refusal is None:
                refusal = response
        self._final = response if refusal is None else aiosmtplib.SMTPDataError(refusal.code, refusal.message)

    async def data(self) -> aiosmtplib.SMTPResponse:
        if self._next_rcpt != len(self._rcpts):
            raise ValueError("data() before every recipient's reply was taken")
        if self.mode == "chunking":
            if self._final is None:
                await self._read_final()
            if isinstance(self._final, Exception):
                raise self._final
            assert self._final is not None
            self._restore()
            return self._final
        response = await self._reply()
        if response.code != 354:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
        self._awaiting_message = True
        assert self._reader is not None
        self._outstanding += 1
        await _send_dot_stuffed(_Writer(self._reader, self._timeout), self._body)
        self._awaiting_message = False
        response = await self._reply()
        if response.code != 250:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
        self._restore()
        return response

    async def abandon(self) -> bool:
        if self._reader is None:
            return self._error is None
        if self._awaiting_message:
            return False  # the server waits for (the rest of) a message: only closing cancels it
        try:
            while self._outstanding > 0:
                response = await self._reply()
                if self.mode == "pipelining" and self._outstanding == 0 and response.code == 354:
                    return False  # 354 to the pipelined DATA, with nothing to send
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            return False
        return self._restore()

    def _restore(self) -> bool:
        """Hand the transport back to aiosmtplib's protocol; False (and closed) if out of step."""
        reader = self._reader
        if reader is None:
            return True
        self._reader = None
        if reader.lost:
            return False
        reader.transport.set_protocol(reader.previous)
        # Flow control state follows the transport's: aiosmtplib's protocol missed pauses and resumes.
        flow = reader.previous
        if isinstance(flow, asyncio.Protocol):
            (flow.pause_writing if reader.paused else flow.resume_writing)()
        if reader.idle and self._outstanding == 0 and self._error is None:
            return True
        reader.transport.close()  # unread bytes: the next command would get this one's reply
        return False


def begin(smtp: aiosmtplib.SMTP, sender: str, options: list[str], rcpts: tuple[str, ...], body: Path | bytes,
          encoding: str, timeout: float, *, pipeline: bool = True) -> Transaction:
    """The transaction for this session: in one flight when the server allows it (and ``pipeline``)."""
    mode = flight_mode(smtp) if pipeline else None
    if mode is None:
        return StepByStep(smtp, sender, options, body, encoding, timeout)
    return Pipelined(smtp, sender, options, rcpts, body, encoding, timeout, mode)
