"""The stack's floor: the thinnest relay that can be built from the same parts, for comparison.

An aiosmtpd listener whose DATA handler hands the message to one of N warm aiosmtplib sessions
(STARTTLS + XOAUTH2) to the simulated Exchange and answers with Exchange's reply. No spool, no
fsync, no policy, no logging, no retries: it loses mail on any error and must never be used. It
answers one question: how fast is "aiosmtpd in, aiosmtplib out" on this machine, so that the
relay's own cost (durability, policy, bookkeeping) can be told apart from its libraries'.

With SESSIONS 0 it is a sink instead: it answers 250 to every message and throws it away, the
floor of the ingest rows (aiosmtpd alone: what accepting SMTP costs in Python here).

Run by ``python -m bench`` as a child process (its own interpreter and GIL, like the relay):
``python -m bench.floor PORT EXCHANGE_HOST EXCHANGE_PORT CA_FILE MAILBOX TOKEN SESSIONS``; prints
``ready`` on stdout once listening, stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from bench.loadgen import open_exchange


class Forward:
    def __init__(self, sessions: asyncio.Queue[aiosmtplib.SMTP]) -> None:
        self.sessions = sessions

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.sessions.maxsize == 1 and self.sessions.empty():  # sink mode: no Exchange at all
            return "250 2.0.0 OK (discarded)"
        smtp = await self.sessions.get()
        try:
            content = envelope.original_content or b""
            _, message = await smtp.sendmail(str(envelope.mail_from), list(envelope.rcpt_tos), content)
        except aiosmtplib.SMTPException as exc:
            return f"451 4.3.0 {type(exc).__name__}"
        finally:
            self.sessions.put_nowait(smtp)
        return f"250 {message}"


def _accept_any(server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
    return AuthResult(success=True)


async def serve(port: int, host: str, exchange_port: int, ca_file: Path, mailbox: str, token: str,
                count: int) -> None:
    sessions: asyncio.Queue[aiosmtplib.SMTP] = asyncio.Queue(maxsize=1 if count == 0 else 0)
    for _ in range(count):
        sessions.put_nowait(await open_exchange(host, exchange_port, ca_file, mailbox, token))
    handler = Forward(sessions)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, authenticator=_accept_any, auth_require_tls=False, hostname="floor.local",
                     decode_data=False),
        "127.0.0.1", port)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    server.close()


def main(argv: list[str]) -> int:
    port, host, exchange_port, ca_file, mailbox, token, count = argv
    asyncio.run(serve(int(port), host, int(exchange_port), Path(ca_file), mailbox, token, int(count)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
