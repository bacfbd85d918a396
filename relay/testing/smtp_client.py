"""A raw-socket SMTP client for tests and the fuzz benchmarks: it can send any bytes and checks every reply for leaks.

Every read is bounded by a socket timeout; nothing sleeps to synchronise.
"""

from __future__ import annotations

import base64
import contextlib
import re
import socket
import ssl
from collections.abc import Iterable

from relay.testing.harness import DEMO_PASSWORD, DEMO_USER

#: What no reply may ever contain: Python internals.
TRACEBACK_MARKERS = re.compile(
    rb"Traceback|File \"|\.py\b|Errno|\b[A-Z][A-Za-z]*(?:Error|Exception|Interrupt)\b|aiosmtpd"
    rb"|relay\.(?:listener|service|spool|policy|delivery|upstream)|asyncio|\bline \d+, in\b", re.ASCII)


def assert_clean_reply(reply: bytes) -> None:
    """No traceback, no exception class name, no module path in a reply."""
    # aiosmtpd's texts use the word "Error:" which we strip; an exception class name looks like FooError.
    match = TRACEBACK_MARKERS.search(reply)
    assert match is None, f"reply leaks internals: {reply!r}"


def plain_blob(user: str = DEMO_USER, password: str = DEMO_PASSWORD) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


class RawSMTP:
    """A byte-level SMTP client: ``send`` exact bytes, ``reply`` reads one (multi-line) reply."""

    def __init__(self, port: int, *, source: str = "127.0.0.1", host: str = "127.0.0.1",
                 timeout: float = 15.0, tls: ssl.SSLContext | None = None, server_hostname: str = "localhost",
                 greet: bool = True) -> None:
        sock = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0))
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=server_hostname)
        self.sock: socket.socket = sock
        self.buffer = b""
        self.transcript: list[bytes] = []
        self.greeting = self.reply() if greet else b""

    # -- io ------------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"server closed the connection; unread {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def reply(self) -> bytes:
        """One whole reply (all lines of a multi-line one), CRLF-joined, checked for leaks."""
        lines = [self._line()]
        while len(lines[-1]) > 3 and lines[-1][3:4] == b"-":
            lines.append(self._line())
        text = b"\r\n".join(lines)
        self.transcript.append(text)
        assert_clean_reply(text)
        return text

    def code(self) -> int:
        return int(self.reply()[:3])

    def cmd(self, line: str | bytes) -> bytes:
        data = line.encode() if isinstance(line, str) else line
        self.send(data + b"\r\n")
        return self.reply()

    def expect(self, line: str | bytes, code: int) -> bytes:
        reply = self.cmd(line)
        assert int(reply[:3]) == code, f"{line!r} -> {reply!r} (expected {code})"
        return reply

    def closed(self) -> bool:
        """True when the server has closed the connection (bounded by the socket timeout)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawSMTP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- conveniences --------------------------------------------------------------------------

    def ehlo(self, name: str = "app.test") -> bytes:
        return self.expect(f"EHLO {name}", 250)

    def login(self, user: str = DEMO_USER, password: str = DEMO_PASSWORD) -> bytes:
        return self.expect(f"AUTH PLAIN {plain_blob(user, password)}", 235)

    def send_mail(self, sender: str, rcpts: Iterable[str], body: bytes) -> bytes:
        """MAIL/RCPT/DATA; ``body`` is sent as is (already dot-stuffed, ending in CRLF.CRLF)."""
        self.expect(f"MAIL FROM:<{sender}>", 250)
        for r in rcpts:
            self.expect(f"RCPT TO:<{r}>", 250)
        self.expect("DATA", 354)
        self.send(body)
        return self.reply()


def simple_body(subject: str, *, sender: str = "relay@contoso.com", extra: bytes = b"") -> bytes:
    return (f"From: {sender}\r\nTo: someone@fabrikam.example\r\nSubject: {subject}\r\n\r\n".encode()
            + b"Hello.\r\n" + extra + b".\r\n")
