"""Load generators: a lean asyncio SMTP client (plain SMTP in, like a legacy app) and aiosmtplib
sessions to the simulated Exchange (STARTTLS + XOAUTH2, the ceiling).

The legacy-side client is hand-written on asyncio streams rather than smtplib or aiosmtplib: it
costs a few tens of microseconds per command, so with two cores the server under test, not the
client, sets the rate. It talks like smtplib's ``sendmail`` does (EHLO, optional AUTH PLAIN, MAIL,
RCPT, DATA, the next MAIL on the same connection or QUIT), one command at a time, no PIPELINING:
the way most legacy apps talk. Every run is bounded by a message count and a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Message:
    sender: str
    rcpt: str
    data: bytes
    """The message, CRLF line ends, already dot-stuffed, ending with ``\\r\\n.\\r\\n``."""


@dataclass
class RunResult:
    sent: int = 0
    failed: int = 0
    duration: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    timed_out: bool = False

    def error(self, text: str) -> None:
        key = text[:120]
        self.errors[key] = self.errors.get(key, 0) + 1

    @property
    def rate(self) -> float:
        return self.sent / self.duration if self.duration > 0 else 0.0

    def first_error(self) -> str:
        return next(iter(self.errors), "")


class SMTPReplyError(Exception):
    def __init__(self, stage: str, reply: bytes) -> None:
        super().__init__(f"{stage}: {reply.decode('utf-8', 'replace').strip()}")


def make_message(sender: str, rcpt: str, size: int, seq: int = 0, *, tag: str = "bench") -> Message:
    """An RFC 5322 message of about ``size`` bytes: headers + 76-character base64-like lines."""
    headers = (
        f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: {tag} message {seq}\r\n"
        f"Message-ID: <{tag}.{seq}.{time.monotonic_ns()}@bench.local>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    line = (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/" * 2)[:76] + b"\r\n"
    body_lines = max(1, (size - len(headers)) // len(line))
    data = headers + line * body_lines + b".\r\n"
    return Message(sender, rcpt, data)


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One (possibly multi-line) reply; raises on EOF."""
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by server")
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            return b"".join(lines)


class PlainClient:
    """One SMTP connection without TLS (the legacy app's side)."""

    def __init__(self, host: str, port: int, *, auth: tuple[str, str] | None, ehlo: str = "bench.local") -> None:
        self.host, self.port, self.auth, self.ehlo = host, port, auth, ehlo
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _cmd(self, line: bytes, expect: bytes, stage: str) -> bytes:
        assert self.reader is not None and self.writer is not None
        self.writer.write(line)
        reply = await _reply(self.reader)
        if not reply.startswith(expect):
            raise SMTPReplyError(stage, reply)
        return reply

    async def connect(self) -> None:
        # A connected socket of our own: open_connection(host, port) would resolve the address in
        # a worker thread first (getaddrinfo), a millisecond per connection that no legacy app pays.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (self.host, self.port))
        except BaseException:
            sock.close()
            raise
        self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        banner = await _reply(self.reader)
        if not banner.startswith(b"220"):
            raise SMTPReplyError("banner", banner)
        await self._cmd(f"EHLO {self.ehlo}\r\n".encode(), b"250", "EHLO")
        if self.auth is not None:
            user, password = self.auth
            blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            await self._cmd(f"AUTH PLAIN {blob}\r\n".encode(), b"235", "AUTH")

    async def send(self, msg: Message) -> bytes:
        await self._cmd(f"MAIL FROM:<{msg.sender}>\r\n".encode(), b"250", "MAIL")
        await self._cmd(f"RCPT TO:<{msg.rcpt}>\r\n".encode(), b"250", "RCPT")
        await self._cmd(b"DATA\r\n", b"354", "DATA")
        assert self.writer is not None and self.reader is not None
        self.writer.write(msg.data)
        reply = await _reply(self.reader)
        if not reply.startswith(b"250"):
            raise SMTPReplyError("end of DATA", reply)
        return reply

    async def quit(self) -> None:
        if self.writer is None:
            return
        with contextlib.suppress(OSError, ConnectionError, SMTPReplyError, asyncio.TimeoutError):
            await asyncio.wait_for(self._cmd(b"QUIT\r\n", b"221", "QUIT"), 5)
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def run_plain(
    host: str,
    port: int,
    messages: list[Message],
    *,
    concurrency: int,
    reuse: bool,
    auth: tuple[str, str] | None,
    deadline: float,
    record_latency: bool = False,
) -> RunResult:
    """Send ``messages`` with ``concurrency`` clients; a new connection per message unless ``reuse``.

    Stops at ``deadline`` seconds (wall time from the start) whatever is left; ``timed_out`` tells.
    """
    result = RunResult()
    queue = list(reversed(messages))
    start = time.perf_counter()
    end_by = start + deadline

    async def one_connection(first: Message) -> None:
        client = PlainClient(host, port, auth=auth)
        msg: Message | None = first
        try:
            await client.connect()
            while msg is not None:
                t0 = time.perf_counter()
                await client.send(msg)
                result.sent += 1
                if record_latency:
                    result.latencies.append(time.perf_counter() - t0)
                msg = None
                if reuse and queue and time.perf_counter() < end_by:
                    msg = queue.pop()
            await client.quit()
        except (OSError, ConnectionError, SMTPReplyError, asyncio.IncompleteReadError) as exc:
            result.failed += 1
            result.error(str(exc) or type(exc).__name__)
            client.close()

    async def worker() -> None:
        while queue and time.perf_counter() < end_by:
            await one_connection(queue.pop())

    tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    remaining = max(0.1, end_by - time.perf_counter() + 5)
    _done, pending = await asyncio.wait(tasks, timeout=remaining)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)
    result.duration = time.perf_counter() - start
    result.timed_out = bool(queue) or bool(pending)
    return result


# ---------------------------------------------------------------------------------------------
# Direct submission to the simulated Exchange (aiosmtplib, as the relay's upstream does)
# ---------------------------------------------------------------------------------------------


def tls_context(ca_file: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def open_exchange(host: str, port: int, ca_file: Path, mailbox: str, token: str):  # type: ignore[no-untyped-def]
    import aiosmtplib

    smtp = aiosmtplib.SMTP(hostname=host, port=port, start_tls=True, tls_context=tls_context(ca_file),
                           local_hostname="bench.local", timeout=60)
    await smtp.connect()
    await smtp.ehlo()
    await smtp.auth_xoauth2(mailbox, token)
    return smtp


def _unstuffed(msg: Message) -> bytes:
    """The message as aiosmtplib's ``sendmail`` wants it (it does the dot-stuffing itself)."""
    data = msg.data[: -len(b".\r\n")]
    return data.replace(b"\r\n..", b"\r\n.")


async def run_direct(
    host: str,
    port: int,
    ca_file: Path,
    mailbox: str,
    token: str,
    messages: list[Message],
    *,
    connections: int,
    deadline: float,
    record_latency: bool = False,
) -> RunResult:
    """Authenticated STARTTLS sessions (opened before the clock starts), reused for every message."""
    import aiosmtplib

    result = RunResult()
    sessions = [await open_exchange(host, port, ca_file, mailbox, token) for _ in range(connections)]
    payloads = [(m.sender, m.rcpt, _unstuffed(m)) for m in messages]
    queue = list(reversed(payloads))
    start = time.perf_counter()
    end_by = start + deadline

    async def worker(smtp: aiosmtplib.SMTP) -> None:
        while queue and time.perf_counter() < end_by:
            sender, rcpt, data = queue.pop()
            t0 = time.perf_counter()
            try:
                await smtp.sendmail(sender, [rcpt], data)
                result.sent += 1
                if record_latency:
                    result.latencies.append(time.perf_counter() - t0)
            except (aiosmtplib.SMTPException, OSError) as exc:
                result.failed += 1
                result.error(str(exc))
                return

    tasks = [asyncio.ensure_future(worker(s)) for s in sessions]
    _done, pending = await asyncio.wait(tasks, timeout=max(0.1, deadline + 5))
    for task in pending:
        task.cancel()
    result.duration = time.perf_counter() - start
    result.timed_out = bool(queue) or bool(pending)
    for smtp in sessions:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(smtp.quit(), 5)
    return result
