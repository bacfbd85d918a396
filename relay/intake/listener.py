"""The SMTP front door for legacy apps (aiosmtpd on the daemon's own event loop).

What is ours here, and why aiosmtpd's defaults are not enough:
- AUTH PLAIN / LOGIN: the protocol is here, the check in :mod:`relay.intake.auth` (off the event
  loop, scrypt is slow on purpose); attempts are counted per client (all of loopback is one) before
  they are checked, and connections and sessions are limited (:mod:`relay.intake.limits`).
- DATA streams into the spool as it arrives instead of buffering the whole message several times
  over, and only CRLF.CRLF ends it: a bare LF or CR before a dot never ends a message (SMTP
  smuggling), and the upstream side normalises line endings, so Exchange sees exactly one message.
- Every refusal carries an enhanced status code; no reply ever carries a Python exception text.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import logging
import ssl
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiosmtpd.smtp import MISSING, AuthResult, Envelope, LoginPassword, Session, syntax

from relay.config import AuthMode, ListenSettings, Settings, TlsMode, is_loopback_host
from relay.envelope import Envelope as RelayEnvelope
from relay.envelope import Route
from relay.errors import SpoolError
from relay.intake import replies as R
from relay.intake.addresses import parse_path
from relay.intake.aiosmtpd_compat import CheapIntrospection, CompatSMTP, fixed_signature
from relay.intake.auth import Login, check_login, decode_answer
from relay.intake.data import BodySink, DataReceiver, LineTooLong, read_line, take_message
from relay.intake.limits import Admitted, AuthLimiter, Connections
from relay.intake.passwords import VerifiedCache
from relay.intake.policy import Policy, Principal, Refusal

log = logging.getLogger("relay.listener")


class Intake(Protocol):
    """What the listener hands a complete message to (the service: spool + delivery)."""

    def new_body(self) -> BodySink: ...

    async def accept(self, envelope: RelayEnvelope, route: Route, body: BodySink, *, message_id: str,
                     client: str) -> str:
        """Store durably, maybe deliver at once; return the SMTP reply for the client."""
        ...


@dataclass
class ListenerState:
    """What all connections of one daemon share; replaced field by field on reload."""

    settings: Settings
    policy: Policy
    intake: Intake
    auth_limiter: AuthLimiter
    verified: VerifiedCache = field(default_factory=VerifiedCache)
    #: monotonic seconds, for the session limit (a test may turn it forward)
    clock: Callable[[], float] = time.monotonic
    connections: Connections = field(default_factory=Connections)


@dataclass
class _Transaction:
    principal: Principal | None = None
    route: Route | None = None
    user: str | None = None


class RelayHandler(CheapIntrospection):
    """aiosmtpd hooks: who may send (MAIL), to whom (RCPT), EHLO capabilities, errors."""

    def __init__(self, state: ListenerState) -> None:
        self.state = state

    @fixed_signature
    async def handle_EHLO(self, server: RelaySMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        keep = [r for r in responses if not r.startswith("250-AUTH") or server.offers_auth()]
        return [*keep[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", keep[-1]]

    async def handle_MAIL(self, server: RelaySMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        if not address.isascii() and "SMTPUTF8" not in mail_options:
            return R.NEEDS_SMTPUTF8
        txn = server.txn
        principal = server.principal()
        if principal is None:
            if server.offers_auth():
                return R.AUTH_REQUIRED
            return R.relaying_denied(server.peer_ip)
        # aiosmtpd hands the null sender (bounces) over as "<>"; it stays that way in its envelope
        # (RCPT needs a non-empty mail_from) and becomes "" in ours.
        route = self.state.policy.route(principal, "" if address == "<>" else address)
        if isinstance(route, Refusal):
            log.info("sender refused", extra={"event": "sender_refused", "client": server.client_label(),
                                              "reply": route.reply})
            return route.reply
        too_big = self._too_big_for_graph(route, mail_options)
        if too_big is not None:
            return too_big
        txn.principal = principal
        txn.route = route
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return R.SENDER_OK

    def _too_big_for_graph(self, route: Route, mail_options: list[str]) -> str | None:
        """552 at MAIL for a declared SIZE that a Graph-only mailbox could never send (RFC 1870: say
        so before the data is sent); the limit is checked again on the real message."""
        declared = next((o[5:] for o in mail_options if o.upper().startswith("SIZE=")), "")
        if not declared.isdigit():
            return None
        settings = self.state.settings
        mbx = settings.mailbox(route.mailbox)
        if mbx is None or mbx.transport != "graph" or mbx.fallback_smtp:
            return None
        try:
            limit = settings.app(mbx.app).graph_max_mime
        except KeyError:
            return None
        if int(declared) <= limit:
            return None
        return R.too_big_for_graph(mbx.address, limit)

    async def handle_RCPT(self, server: RelaySMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.state.settings.limits.max_recipients:
            return R.too_many_recipients(self.state.settings.limits.max_recipients)
        if not address.isascii() and not envelope.smtp_utf8:
            return R.NEEDS_SMTPUTF8
        refusal = self.state.policy.check_recipient(address)
        if refusal is not None:
            return refusal.reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return R.RECIPIENT_OK

    async def handle_RSET(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        server.txn = _Transaction(user=server.txn.user)
        return R.RESET_OK

    async def handle_exception(self, error: Exception) -> str:
        # Only the class name reaches the log (never str(error): it may quote client data); the
        # client sees a fixed transient reply.
        log.error("unexpected error in an SMTP session: %s", type(error).__name__,
                  extra={"event": "session_error", "error_type": type(error).__name__})
        return R.INTERNAL_ERROR


class RelaySMTP(CompatSMTP):
    """aiosmtpd's SMTP with our AUTH, streaming DATA, limits and replies."""

    def __init__(self, handler: RelayHandler, listen: ListenSettings, **kwargs: Any) -> None:
        self.state = handler.state
        self.listen = listen
        self.txn = _Transaction()
        self._admitted: Admitted | None = None
        limits = self.state.settings.limits
        # Per connection, not aiosmtpd's class-wide dict (which every EHLO of every client grows).
        self.command_size_limit = limits.command_line_length
        self.command_size_limits = defaultdict(lambda: limits.command_line_length)
        # The StreamReader's limit: the longest line we read at all (commands and DATA).
        self.line_length_limit = max(limits.command_line_length, limits.line_length + 2) + 2
        super().__init__(
            handler,
            data_size_limit=limits.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self.state.settings.hostname or "localhost",
            ident="oauth-smtp-relay",
            timeout=limits.idle_timeout,
            auth_require_tls=False,
            auth_required=False,
            authenticator=_async_only,
            **kwargs,
        )
        self.command_size_limits = defaultdict(lambda: limits.command_line_length)
        if self.state.settings.accept.auth is AuthMode.NONE:
            self.offered_mechanisms().clear()
        self.wrap_commands(self._within_session)

    def _within_session(self, name: str, method: Callable[[str], Any]) -> Callable[[str], Any]:
        """Every command but QUIT is refused (421 4.4.2, then close) once the session is older than
        limits.max_session."""
        if name == "QUIT":
            return method

        @functools.wraps(method)  # HELP reads the syntax aiosmtpd attaches to each method
        async def command(arg: str) -> None:
            if self._admitted is not None and self.state.clock() >= self._admitted.ends:
                log.info("session closed: longer than limits.max_session", extra={
                    "event": "session_limit", "client_ip": self.peer_ip,
                    "max_session": self.state.settings.limits.max_session})
                await self._refuse_connection(R.SESSION_TOO_LONG)
                return
            await method(arg)
        return command

    def _session_expired(self) -> None:
        """The hard stop, data_timeout after max_session: whatever the client is doing (silent,
        dribbling DATA, stalled in AUTH), say why and close."""
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            log.info("session closed: longer than limits.max_session", extra={
                "event": "session_limit", "client_ip": self.peer_ip,
                "max_session": self.state.settings.limits.max_session})
            transport.write(R.SESSION_TOO_LONG.encode() + b"\r\n")
            transport.close()

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            await super().push(R.normalise_reply(status))
        else:
            await super().push(status)

    def idle_timeout(self) -> None:
        # aiosmtpd closes silently; RFC 5321 4.2: say why with 421 before closing.
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(R.IDLE_TIMEOUT.encode() + b"\r\n")
        super().idle_timeout()

    def parse_address(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parser without the typing.Protocol class it defines on every call
        (4 % of the CPU per message); same parser, same results."""
        if not arg:
            return "", ""
        parsed = parse_path(arg)
        if parsed is None:
            return None, None
        addr, rest = parsed
        localpart = addr.rpartition("@")[0]
        if self.local_part_limit and len(localpart) > self.local_part_limit:
            return None, None
        return addr, rest

    # ---- connection accounting -------------------------------------------------------------

    # A plain method, not a property: aiosmtpd's __init__ runs inspect.getmembers(self), which
    # evaluates every property before a session exists.
    def env(self) -> Envelope:
        assert self.envelope is not None
        return self.envelope

    @property
    def peer_ip(self) -> str:
        peer = self.session.peer if self.session else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"

    def client_label(self) -> str:
        user = self.txn.user
        return f"user {user} from {self.peer_ip}" if user else f"{self.peer_ip}"

    async def serve_client(self) -> None:
        state = self.state
        limits = state.settings.limits
        if state.auth_limiter.banned(self.peer_ip):
            await self._refuse_connection(R.BANNED)
            return
        admitted = state.connections.admit(self.peer_ip, limits, state.clock() + limits.max_session)
        if isinstance(admitted, str):
            await self._refuse_connection(admitted)
            return
        self._admitted = admitted
        admitted.hard_stop = asyncio.get_running_loop().call_later(
            limits.max_session + limits.data_timeout, self._session_expired)
        try:
            await super().serve_client()
        finally:
            admitted.release()

    def connection_lost(self, error: Exception | None) -> None:
        if self._admitted is not None:
            self._admitted.release()
        super().connection_lost(error)

    async def _refuse_connection(self, reply: str) -> None:
        with contextlib.suppress(ConnectionError):
            await self.push(reply)
        if self.transport is not None:
            self.transport.close()

    # ---- who is sending --------------------------------------------------------------------

    @property
    def encrypted(self) -> bool:
        return self.tls_started() or self.listen.tls is TlsMode.IMPLICIT

    def offers_auth(self) -> bool:
        if not self.offered_mechanisms() or not self.state.settings.users:
            return False
        return self.encrypted or self.state.settings.accept.plaintext_auth == "anywhere" or is_loopback_host(
            self.peer_ip)

    def principal(self) -> Principal | None:
        logged_in = self.session is not None and self.session.authenticated
        return self.state.policy.principal(self.txn.user if logged_in else None, self.peer_ip)

    def transaction_reset(self) -> None:
        self.txn = _Transaction(user=getattr(self, "txn", _Transaction()).user)

    @syntax("STARTTLS", when="tls_context")  # what HELP shows (aiosmtpd's own method carries it)
    async def smtp_STARTTLS(self, arg: str) -> None:
        # RFC 3207 4.2: after TLS the client starts over; nothing learnt before it counts (aiosmtpd
        # resets its session and drops bytes sent along with STARTTLS; we drop our login too).
        self.txn = _Transaction()
        await super().smtp_STARTTLS(arg)
        self.txn = _Transaction()

    # ---- AUTH --------------------------------------------------------------------------------

    async def challenge_auth(self, challenge: str | bytes, encode_to_b64: bool = True,
                             log_client_response: bool = False) -> Any:
        """aiosmtpd's, minus logging the client's answer, plus a bounded line that keeps the session
        in sync. Returns the decoded answer, or MISSING after replying (abort, bad base64, too long)."""
        raw = challenge.encode() if isinstance(challenge, str) else challenge
        await self.push(b"334 " + (base64.b64encode(raw) if encode_to_b64 else raw))
        try:
            line = await read_line(self.stream_reader(), b"\n")
        except LineTooLong:
            await self.push(R.AUTH_LINE_TOO_LONG)
            return MISSING
        except asyncio.IncompleteReadError:
            raise ConnectionResetError("client closed the connection during AUTH") from None
        blob = line.strip()
        if blob == b"*":
            await self.push(R.AUTH_ABORTED)
            return MISSING
        decoded = decode_answer(blob.decode("latin-1"))
        if decoded is None:
            await self.push(R.BAD_BASE64)
            return MISSING
        return decoded

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if (refused := await self._auth_precheck()) is not None:
            return refused
        blob = await self._initial_response(args, "")
        if isinstance(blob, AuthResult):
            return blob
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push(R.BAD_AUTH_PLAIN)
            return AuthResult(success=False, handled=True)
        return await self._verify(parts[1], parts[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if (refused := await self._auth_precheck()) is not None:
            return refused
        login = await self._initial_response(args, self.AuthLoginUsernameChallenge)
        if isinstance(login, AuthResult):
            return login
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._verify(login, password)

    async def _initial_response(self, args: list[str], challenge: str) -> bytes | AuthResult:
        """``AUTH MECH <b64>`` or, without it, a 334 challenge: the decoded bytes, or the AuthResult
        to return when the client sent something unusable (the reply is already pushed)."""
        if len(args) == 1:
            answer = await self.challenge_auth(challenge)
            return answer if isinstance(answer, bytes) else AuthResult(success=False, handled=True)
        decoded = decode_answer(args[1])
        if decoded is None:
            await self.push(R.BAD_BASE64)
            return AuthResult(success=False, handled=True)
        return decoded

    async def _auth_precheck(self) -> AuthResult | None:
        if not self.offers_auth():
            if not self.encrypted and self.offered_mechanisms() and self.state.settings.users:
                await self.push(R.ENCRYPTION_REQUIRED)
            else:
                await self.push(R.AUTH_NOT_AVAILABLE)
            return AuthResult(success=False, handled=True)
        if self.state.auth_limiter.banned(self.peer_ip):
            await self._refuse_connection(R.BANNED)
            return AuthResult(success=False, handled=True)
        return None

    async def _verify(self, login_b: bytes, password_b: bytes) -> AuthResult:
        state = self.state
        login = login_b.decode("utf-8", "replace")
        password = password_b.decode("utf-8", "surrogateescape")
        verdict = await check_login(login, password, self.peer_ip, limiter=state.auth_limiter, policy=state.policy,
                                    verified=state.verified, settings=state.settings)
        if verdict is Login.OK:
            self.txn.user = login
            return AuthResult(success=True, auth_data=LoginPassword(login_b, b""))
        if verdict is Login.REFUSED:
            await self._refuse_connection(R.BANNED)
            return AuthResult(success=False, handled=True)
        return AuthResult(success=False, handled=False, message=R.AUTH_INVALID)

    # ---- DATA ------------------------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if not self.env().rcpt_tos or self.txn.route is None or self.txn.principal is None:
            await self.push(R.NEED_RCPT)
            return
        if arg:
            await self.push(R.DATA_SYNTAX)
            return
        route = self.txn.route
        principal = self.txn.principal
        limits = self.state.settings.limits
        try:
            body = self.state.intake.new_body()
        except SpoolError:
            await self.push(R.SPOOL_FULL)
            return
        policy = self.state.policy
        receiver = DataReceiver(
            body, limit=limits.max_message_size, line_limit=limits.line_length,
            header_limit=limits.max_header_size,
            check_headers=lambda headers: policy.header_from(principal, route, headers),
            keepalive=lambda: self.reset_idle_timer(limits.data_timeout),
        )
        self.reset_idle_timer(limits.data_timeout)
        await self.push(R.START_DATA)
        # From here on exactly one reply for this DATA, after its end-of-data line (relay.intake.data).
        reply = await take_message(self.stream_reader(), receiver, functools.partial(self._accept, route))
        self.reset_idle_timer()
        await self.push(reply)
        self.end_transaction()

    async def _accept(self, route: Route, receiver: DataReceiver) -> str:
        """A complete message: store it durably (and maybe deliver at once); the client's reply."""
        if receiver.rewritten:
            route = dataclasses.replace(route, rewrite_from=True, notes=(
                *route.notes, f"header From rewritten to <{route.mailbox}>"))
        if receiver.sender_dropped:
            route = dataclasses.replace(route, notes=(*route.notes, "header Sender removed (not allowed)"))
        env = self.env()
        envelope = RelayEnvelope(
            mail_from="" if env.mail_from == "<>" else str(env.mail_from),
            rcpt_tos=tuple(env.rcpt_tos),
            mail_options=tuple(o for o in env.mail_options if not o.upper().startswith("SIZE=")),
        )
        # Delivery may take up to delivery.sync_wait: that is not the client being idle.
        limits = self.state.settings.limits
        self.reset_idle_timer(limits.idle_timeout + self.state.settings.delivery.sync_wait)
        return await self.state.intake.accept(envelope, route, receiver.body, message_id=receiver.message_id,
                                              client=self.client_label())


async def start_listener(
    listen: ListenSettings,
    state: ListenerState,
    tls_context: ssl.SSLContext | None,
) -> asyncio.base_events.Server:
    """Start one listening socket on the running loop."""
    loop = asyncio.get_running_loop()
    handler = RelayHandler(state)

    def factory() -> RelaySMTP:
        starttls = tls_context if listen.tls is TlsMode.STARTTLS else None
        return RelaySMTP(handler, listen, tls_context=starttls)

    implicit = tls_context if listen.tls is TlsMode.IMPLICIT else None
    server = await loop.create_server(factory, host=listen.host, port=listen.port, ssl=implicit,
                                      reuse_address=True, start_serving=True)
    return server


def _async_only(*args: Any) -> AuthResult:
    """aiosmtpd needs an authenticator; it is never called, the relay's AUTH methods check logins."""
    return AuthResult(success=False, handled=False)
