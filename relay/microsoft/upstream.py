"""Sessions to Exchange Online: STARTTLS, AUTH XOAUTH2, reuse, and one classified outcome per attempt.

A :class:`SessionPool` per relay keeps, per mailbox, at most ``connections`` authenticated sessions
(Exchange allows 3 per mailbox) and reuses them for many messages: the TLS handshake and AUTH cost
more than a message. A session that died while idle is replaced transparently as long as no byte of
the message was sent yet; one whose token is about to expire is closed rather than reused.

:meth:`Submitter.submit` runs MAIL / RCPT / DATA itself instead of ``sendmail()`` so that every reply
is classified with the stage it belongs to, and per-recipient answers are kept per recipient; the
transaction goes in one flight when Exchange offers PIPELINING (and BDAT), see relay.microsoft.smtp_transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiosmtplib

from relay.config import AppSettings
from relay.delivery.classify import (
    Action,
    Outcome,
    Scope,
    Stage,
    Verdict,
    classify_exception,
    classify_reply,
    timeout_text,
)
from relay.envelope import Envelope, Route
from relay.errors import TokenError
from relay.fleet import FleetWait
from relay.microsoft import smtp_transaction
from relay.microsoft.tokens import Token, TokenProvider

if TYPE_CHECKING:
    from relay.fleet import Fleet

log = logging.getLogger("relay.upstream")

#: A pooled session is not reused when its token expires within this many seconds.
_TOKEN_REUSE_MARGIN = 300.0


def xoauth2_initial_response(user: str, token: str) -> str:
    """The base64 ``AUTH XOAUTH2`` initial response: ``user=<mailbox>^Aauth=Bearer <token>^A^A``."""
    return aiosmtplib.auth.auth_xoauth2_encode(user, token).decode("ascii")


def tls_context_for(app: AppSettings) -> ssl.SSLContext:
    """Certificate and host name verification on, TLS 1.2 or newer; the configured CA if any."""
    return _tls_context(str(app.smtp_ca_file) if app.smtp_ca_file else None)


@functools.lru_cache(maxsize=16)
def _tls_context(cafile: str | None) -> ssl.SSLContext:
    # Loading a CA bundle takes ~150 ms of CPU: once per CA file, not once per connection (and
    # never on the event loop's hot path after the first connection).
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@dataclass
class _Session:
    smtp: aiosmtplib.SMTP
    token: Token
    mailbox: str
    last_used: float
    messages: int = 0
    #: the fleet's lease on one of the mailbox's session slots (relay.fleet), held while the session is open
    lease: str | None = None


class SessionPool:
    """Authenticated sessions per mailbox, at most ``limit(mailbox)`` open at once."""

    def __init__(
        self,
        *,
        local_hostname: str,
        timeout: float,
        idle_close: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._local_hostname = local_hostname
        self._timeout = timeout
        self.timeout = timeout
        self._idle_close = idle_close
        self._clock = clock
        self._idle: dict[str, list[_Session]] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._open: dict[str, int] = {}
        self.connections_made = 0
        #: Optional: session slots shared with other relays. Every session opened holds a lease on one
        #: of the mailbox's slots fleet-wide until it is closed (FleetWait when none is free).
        self.fleet: Fleet | None = None

    def slots(self, mailbox: str, limit: int) -> asyncio.Semaphore:
        sem = self._slots.get(mailbox)
        if sem is None:
            sem = self._slots[mailbox] = asyncio.Semaphore(limit)
        return sem

    def open_sessions(self, mailbox: str) -> int:
        return self._open.get(mailbox, 0)

    def take_idle(self, mailbox: str) -> _Session | None:
        """An idle session still worth using, closing the stale ones found on the way."""
        idle = self._idle.get(mailbox, [])
        now = self._clock()
        while idle:
            session = idle.pop()
            fresh = now - session.last_used < self._idle_close
            token_ok = time.time() < session.token.expires_at - _TOKEN_REUSE_MARGIN
            if fresh and token_ok and session.smtp.is_connected:
                return session
            self.discard(session)
        return None

    async def connect(self, app: AppSettings, mailbox: str, token: Token) -> _Session:
        """A new session: TCP, STARTTLS (required, verified), EHLO, AUTH XOAUTH2 as ``mailbox``."""
        smtp = aiosmtplib.SMTP(
            hostname=app.effective_smtp_host,
            port=app.smtp_port,
            local_hostname=self._local_hostname,
            timeout=self._timeout,
            start_tls=True,
            tls_context=tls_context_for(app),
        )
        lease = await self.fleet.open_session(mailbox) if self.fleet is not None else None
        self.connections_made += 1
        try:
            await smtp.connect()
        except BaseException:
            if self.fleet is not None:
                self.fleet.close_session(lease)
            raise
        self._open[mailbox] = self._open.get(mailbox, 0) + 1
        session = _Session(smtp=smtp, token=token, mailbox=mailbox, last_used=self._clock(), lease=lease)
        try:
            await self.authenticate(session, token)
        except BaseException:
            self.discard(session)
            raise
        return session

    async def authenticate(self, session: _Session, token: Token) -> None:
        smtp = session.smtp
        await smtp.ehlo()
        if "xoauth2" not in smtp.server_auth_methods:
            raise aiosmtplib.SMTPAuthenticationError(
                504, f"5.7.4 server offers no AUTH XOAUTH2 (offers: {', '.join(smtp.server_auth_methods) or 'none'})"
            )
        await smtp.auth_xoauth2(session.mailbox, token.value)
        session.token = token

    def release(self, session: _Session) -> None:
        session.last_used = self._clock()
        fleet = self.fleet
        if fleet is not None and (fleet.wanted(session.mailbox) or self.open_sessions(session.mailbox) > (
                fleet.link.session_share(fleet.limits(session.mailbox)[0]))):
            # Another relay waits for a slot of this mailbox, or more are open than this relay's share
            # while Redis is away: close rather than keep it idle.
            self.discard(session)
            return
        self._idle.setdefault(session.mailbox, []).append(session)

    def discard(self, session: _Session) -> None:
        if session.smtp.is_connected:
            session.smtp.close()
        self._open[session.mailbox] = max(self._open.get(session.mailbox, 1) - 1, 0)
        if self.fleet is not None:
            self.fleet.close_session(session.lease)
            session.lease = None

    async def trim(self, keep: int) -> int:
        """Close idle sessions so that at most ``keep`` stay open per mailbox (the fleet's fallback
        share after Redis went away)."""
        closed = 0
        for mailbox, idle in self._idle.items():
            while idle and self.open_sessions(mailbox) > keep:
                session = idle.pop(0)
                with contextlib.suppress(aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
                    await asyncio.wait_for(session.smtp.quit(), 5)
                self.discard(session)
                closed += 1
        return closed

    async def close_idle(self, *, older_than: float | None = None) -> int:
        """QUIT idle sessions (all, or those idle longer than ``older_than`` seconds)."""
        closed = 0
        now = self._clock()
        for mailbox, idle in self._idle.items():
            keep = []
            for session in idle:
                if older_than is not None and now - session.last_used < older_than:
                    keep.append(session)
                    continue
                with contextlib.suppress(aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
                    await asyncio.wait_for(session.smtp.quit(), 5)
                self.discard(session)
                closed += 1
            self._idle[mailbox] = keep
        return closed


class Submitter:
    """Submits one message (already routed) to Exchange over SMTP and says what happened.

    The SMTP transport only: :class:`relay.microsoft.transport.Dispatcher` chooses between it and Graph, checks
    that the route's app is still configured and holds the mailbox's slot around the attempt."""

    def __init__(self, pool: SessionPool, apps: dict[str, AppSettings], tokens: dict[str, TokenProvider]) -> None:
        self.pool = pool
        self._apps = apps
        self._tokens = tokens
        #: MAIL, RCPT and DATA/BDAT in one flight when the server offers PIPELINING (False: step by step).
        self.pipeline = True

    def configured(self, app: str) -> bool:
        """Does the configuration (still) have this app, with a token provider?"""
        return app in self._apps and app in self._tokens

    async def _session(self, route: Route) -> _Session:
        """A pooled session or a new one; one fresh token retry when Exchange rejects the token."""
        session = self.pool.take_idle(route.mailbox)
        if session is not None:
            return session
        app = self._apps[route.app]
        provider = self._tokens[route.app]
        token = await provider.get()
        try:
            return await self.pool.connect(app, route.mailbox, token)
        except aiosmtplib.SMTPAuthenticationError as exc:
            verdict = classify_reply(exc.code, exc.message, Stage.AUTH)
            if verdict.action is Action.RETRY and not verdict.evict_token:
                raise
            # Exchange refused this token: it may predate a permission change (admin consent,
            # FullAccess) or be about to expire. Evict it and try exactly once with a new one.
            await provider.evict(token)
            token = await provider.get()
            return await self.pool.connect(app, route.mailbox, token)

    async def submit(self, route: Route, envelope: Envelope, body: bytes | Path,
                     rcpts: tuple[str, ...]) -> Outcome:
        """One attempt for ``rcpts``.

        ``body`` is the message, or the path of its spool file: then it is streamed from disk in
        chunks, so memory does not grow with message size times concurrency."""
        stage = Stage.TOKEN
        session: _Session | None = None
        txn: smtp_transaction.Transaction | None = None
        failed: dict[str, Verdict] = {}  # permanently refused at RCPT: kept whatever happens next
        # Internationalised addresses go out as UTF-8 only under SMTPUTF8 (RFC 6531).
        encoding = "utf-8" if any(o.upper() == "SMTPUTF8" for o in envelope.mail_options) else "ascii"

        def unresolved(verdict: Verdict) -> tuple[str, ...]:
            return tuple(r for r in rcpts if r not in failed) if verdict.action is Action.RETRY else ()

        try:
            for reuse_attempt in range(2):
                stage = Stage.CONNECT
                session = await self._session(route)
                stage = Stage.MAIL
                try:
                    options = [o for o in envelope.mail_options if _supported(session.smtp, o)]
                    # In one flight when Exchange offers PIPELINING (relay.microsoft.smtp_transaction).
                    txn = smtp_transaction.begin(session.smtp, route.sender, options, rcpts, body, encoding,
                                                 self.pool.timeout, pipeline=self.pipeline)
                    await txn.start()
                    await txn.mail()
                    break
                except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
                    # A pooled session that died while idle: no reply came, nothing was delivered.
                    self.pool.discard(session)
                    session = txn = None
                    if reuse_attempt == 1:
                        raise exc from None
            assert session is not None and txn is not None
            accepted: list[str] = []
            deferred: list[str] = []
            stage = Stage.RCPT
            for rcpt in rcpts:
                try:
                    await txn.rcpt(rcpt)
                    accepted.append(rcpt)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    verdict = classify_reply(exc.code, exc.message, Stage.RCPT)
                    # A refusal of the whole message stops the transaction - unless the message went
                    # with the commands (BDAT) and the server took it for the recipients it accepted.
                    if verdict.scope is not Scope.RECIPIENT and not await txn.committed():
                        raise
                    if verdict.action is Action.FAILED:
                        failed[rcpt] = verdict
                    else:
                        deferred.append(rcpt)
            if not accepted:
                if await txn.abandon():
                    await session.smtp.rset()
                    self.pool.release(session)
                else:  # the server waits for a message after a pipelined DATA: only closing cancels it
                    self.pool.discard(session)
                session = None
                first = next(iter(failed.values()), None)
                if deferred or first is None:
                    verdict = _retry_verdict("no recipient accepted this time")
                    return Outcome(verdict=verdict, failed=failed, deferred=tuple(deferred))
                return Outcome(verdict=first, failed=failed)
            stage = Stage.DATA
            response = await txn.data()
            session.messages += 1
            self.pool.release(session)
            session = None
            verdict = classify_reply(response.code, response.message, Stage.DATA)
            return Outcome(verdict=verdict, delivered=tuple(accepted), failed=failed, deferred=tuple(deferred),
                           upstream_id=_upstream_id(response.message))
        except aiosmtplib.SMTPResponseException as exc:
            verdict = classify_reply(exc.code, exc.message, stage)
            if session is not None:
                usable = txn is None or await txn.abandon()
                if exc.code == 421 or verdict.evict_token or not usable or not session.smtp.is_connected:
                    # The session is finished, or authenticated with a token Exchange no longer likes.
                    self.pool.discard(session)
                else:
                    await _reset_or_discard(self.pool, session)
                session = None
            if verdict.evict_token:
                await self._tokens[route.app].evict()
            return Outcome(verdict=verdict, failed=failed, deferred=unresolved(verdict))
        except TokenError as exc:
            verdict = classify_exception(exc, Stage.TOKEN)
            return Outcome(verdict=verdict, failed=failed, deferred=unresolved(verdict))
        except asyncio.CancelledError:
            # Stopping: the half-used session is closed, never returned to the pool.
            if session is not None:
                self.pool.discard(session)
            raise
        except FleetWait:
            # No session slot free in the fleet: nothing was sent; the scheduler tries again later.
            raise
        except Exception as exc:  # network errors, and anything unexpected: never lose the message
            if session is not None:
                self.pool.discard(session)
            if not isinstance(exc, TimeoutError | aiosmtplib.SMTPException | OSError | ssl.SSLError):
                log.error("unexpected error talking to Exchange: %s", type(exc).__name__,
                          extra={"event": "upstream_error", "error_type": type(exc).__name__, "stage": str(stage)})
            verdict = classify_exception(exc, stage)
            if isinstance(exc, TimeoutError) and verdict.reason == "timeout":
                # Say which deadline passed, and where: "connected to smtp...:587, no SMTP greeting within 30s".
                app = self._apps[route.app]
                endpoint = f"{app.effective_smtp_host}:{app.smtp_port}"
                verdict = dataclasses.replace(verdict, reply=timeout_text(exc, stage, endpoint, self.pool.timeout))
                log.warning("no answer from Exchange: %s", verdict.reply, extra={
                    "event": "upstream_timeout", "endpoint": endpoint, "stage": str(stage), "mailbox": route.mailbox})
            return Outcome(verdict=verdict, failed=failed, deferred=unresolved(verdict))


async def _reset_or_discard(pool: SessionPool, session: _Session) -> None:
    try:
        await session.smtp.rset()
        pool.release(session)
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        pool.discard(session)


def _supported(smtp: aiosmtplib.SMTP, option: str) -> bool:
    name = option.split("=", 1)[0].lower()
    if name == "body":
        return smtp.supports_extension("8bitmime")
    return smtp.supports_extension(name)


def _upstream_id(message: str) -> str:
    """Exchange's ``250 2.0.0 OK <id> [Hostname=...]``: the id for message trace."""
    for part in message.split():
        if part.startswith("<") and part.endswith(">"):
            return part.strip("<>")
    return ""


def _retry_verdict(text: str) -> Verdict:
    return classify_reply(451, f"4.0.0 {text}", Stage.RCPT)
