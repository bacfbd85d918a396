"""The SMTP front door for legacy apps (aiosmtpd on the daemon's own event loop).

What is ours here, and why aiosmtpd's defaults are not enough:
- AUTH PLAIN / LOGIN are verified off the event loop (scrypt is slow on purpose) and remembered
  safely (:class:`relay.passwords.VerifiedCache`); failures are counted per client address.
- DATA streams into the spool as it arrives instead of buffering the whole message several times
  over, and only CRLF.CRLF ends it: a bare LF or CR before a dot never ends a message (SMTP
  smuggling), and the upstream side normalises line endings, so Exchange sees exactly one message.
- Every refusal carries an enhanced status code; no reply ever carries a Python exception text.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import ipaddress
import logging
import ssl
import time
import warnings
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from relay.config import AuthMode, ListenSettings, Settings, TlsMode
from relay.envelope import Envelope as RelayEnvelope
from relay.envelope import Route
from relay.errors import SpoolError, SpoolFull
from relay.passwords import VerifiedCache, verify_password
from relay.policy import Policy, Principal, Refusal
from relay.rewrite import HeaderRewriter

log = logging.getLogger("relay.listener")

# aiosmtpd warns on every AUTH that Session.login_data is deprecated; we use our own transaction state.
warnings.filterwarnings("ignore", message="Session.login_data is deprecated")
# aiosmtpd logs every command line (addresses, AUTH blobs) at INFO/DEBUG: keep it quiet.
logging.getLogger("mail.log").setLevel(logging.WARNING)

_HEADER_LIMIT = 256 * 1024
_CHUNK = 64 * 1024
#: what a client sees when something unexpected happens: transient, no internals.
INTERNAL_ERROR = "451 4.3.0 Local error in processing, try again later"


class BodySink(Protocol):
    """Where DATA goes as it arrives (a spool BodyWriter)."""

    def write(self, data: bytes) -> None: ...

    def abort(self) -> None: ...


class Intake(Protocol):
    """What the listener hands a complete message to (the service: spool + delivery)."""

    def new_body(self) -> BodySink: ...

    async def accept(self, envelope: RelayEnvelope, route: Route, body: BodySink, *, message_id: str,
                     client: str) -> str:
        """Store durably, maybe deliver at once; return the SMTP reply for the client."""
        ...


def is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


class AuthLimiter:
    """Counts failed AUTH per client address; past ``max`` failures in ``window`` the address is
    refused for ``ban`` seconds. Each failure also costs the client a growing delay."""

    def __init__(self, max_failures: int, window: float, ban: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self.ban = ban
        self._clock = clock
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._banned_until: dict[str, float] = {}

    def banned(self, address: str) -> bool:
        until = self._banned_until.get(address)
        if until is None:
            return False
        if self._clock() >= until:
            del self._banned_until[address]
            self._failures.pop(address, None)
            return False
        return True

    def failed(self, address: str) -> float:
        """Record a failure; returns the delay (seconds) to impose before answering."""
        now = self._clock()
        q = self._failures[address]
        q.append(now)
        while q and q[0] < now - self.window:
            q.popleft()
        if len(q) >= self.max_failures:
            self._banned_until[address] = now + self.ban
            log.warning("client address refused after repeated AUTH failures",
                        extra={"event": "auth_banned", "client_ip": address, "failures": len(q),
                               "ban_seconds": self.ban})
        return min(0.2 * len(q), 2.0)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)


@dataclass
class ListenerState:
    """What all connections of one daemon share; replaced field by field on reload."""

    settings: Settings
    policy: Policy
    intake: Intake
    auth_limiter: AuthLimiter
    verified: VerifiedCache = field(default_factory=VerifiedCache)
    connections: int = 0
    per_address: dict[str, int] = field(default_factory=lambda: defaultdict(int))


@dataclass
class _Transaction:
    principal: Principal | None = None
    route: Route | None = None
    user: str | None = None


class RelayHandler:
    """aiosmtpd hooks: who may send (MAIL), to whom (RCPT), EHLO capabilities, errors."""

    def __init__(self, state: ListenerState) -> None:
        self.state = state

    async def handle_EHLO(self, server: RelaySMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        keep = [r for r in responses if not r.startswith("250-AUTH") or server.auth_offered()]
        return [*keep[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", keep[-1]]

    async def handle_MAIL(self, server: RelaySMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        txn = server.txn
        principal = server.principal()
        if principal is None:
            return "530 5.7.0 Authentication required"
        # aiosmtpd hands the null sender (bounces) over as "<>"; it stays that way in its envelope
        # (RCPT needs a non-empty mail_from) and becomes "" in ours.
        route = self.state.policy.route(principal, "" if address == "<>" else address)
        if isinstance(route, Refusal):
            log.info("sender refused", extra={"event": "sender_refused", "client": server.client_label(),
                                              "reply": route.reply})
            return route.reply
        txn.principal = principal
        txn.route = route
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server: RelaySMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= self.state.settings.limits.max_recipients:
            return f"452 4.5.3 Too many recipients (at most {self.state.settings.limits.max_recipients})"
        refusal = self.state.policy.check_recipient(address)
        if refusal is not None:
            return refusal.reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    async def handle_RSET(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        server.txn = _Transaction(user=server.txn.user)
        return "250 2.0.0 OK"

    async def handle_exception(self, error: Exception) -> str:
        log.error("unexpected error in an SMTP session: %s", type(error).__name__,
                  extra={"event": "session_error", "error_type": type(error).__name__})
        return INTERNAL_ERROR


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP with our AUTH, streaming DATA and connection limits."""

    command_size_limit = 4096

    def __init__(self, handler: RelayHandler, listen: ListenSettings, **kwargs: Any) -> None:
        self.state = handler.state
        self.listen = listen
        self.txn = _Transaction()
        self._counted: str | None = None
        limits = self.state.settings.limits
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
            authenticator=self._never_called,
            **kwargs,
        )
        if self.state.settings.accept.auth is AuthMode.NONE:
            self._auth_methods.clear()

    # ---- connection accounting -------------------------------------------------------------

    @property
    def sess(self) -> Session:
        assert self.session is not None
        return self.session

    @property
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

    async def _handle_client(self) -> None:
        state = self.state
        limits = state.settings.limits
        ip = self.peer_ip
        if state.auth_limiter.banned(ip):
            await self._refuse_connection("421 4.7.0 Too many failed logins from your address, try later")
            return
        if state.connections >= limits.max_connections:
            await self._refuse_connection("421 4.7.0 Too many connections, try again later")
            return
        if state.per_address[ip] >= limits.max_connections_per_address:
            await self._refuse_connection("421 4.7.0 Too many connections from your address, try again later")
            return
        state.connections += 1
        state.per_address[ip] += 1
        self._counted = ip
        try:
            await super()._handle_client()
        finally:
            self._uncount()

    def _uncount(self) -> None:
        if self._counted is not None:
            ip, self._counted = self._counted, None
            self.state.connections -= 1
            self.state.per_address[ip] -= 1
            if self.state.per_address[ip] <= 0:
                del self.state.per_address[ip]

    def connection_lost(self, error: Exception | None) -> None:
        self._uncount()
        super().connection_lost(error)

    async def _refuse_connection(self, reply: str) -> None:
        await self.push(reply)
        if self.transport is not None:
            self.transport.close()

    # ---- who is sending --------------------------------------------------------------------

    @property
    def encrypted(self) -> bool:
        return self._tls_protocol is not None or self.listen.tls is TlsMode.IMPLICIT

    def auth_offered(self) -> bool:
        if not self._auth_methods or not self.state.settings.users:
            return False
        return self.encrypted or self.state.settings.accept.plaintext_auth == "anywhere" or is_loopback(
            self.peer_ip)

    def principal(self) -> Principal | None:
        accept = self.state.settings.accept
        if self.sess.authenticated and self.txn.user:
            user = self.state.policy.user(self.txn.user)
            return Principal.for_user(user) if user else None
        if accept.auth is AuthMode.REQUIRED:
            return None
        rule = self.state.policy.network_rule(self.peer_ip)
        return Principal.for_network(rule) if rule else None

    def _set_rset_state(self) -> None:
        super()._set_rset_state()  # type: ignore[no-untyped-call]
        self.txn = _Transaction(user=getattr(self, "txn", _Transaction()).user)

    # ---- AUTH --------------------------------------------------------------------------------

    def _never_called(self, *args: Any) -> AuthResult:  # aiosmtpd needs an authenticator; ours is async
        return AuthResult(success=False, handled=False)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        if (refused := await self._auth_precheck()) is not None:
            return refused
        blob: bytes | None
        if len(args) == 1:
            answer = await self.challenge_auth("")
            if not isinstance(answer, bytes):
                return AuthResult(success=False, handled=True)  # challenge_auth already replied
            blob = answer
        else:
            blob = _b64(args[1])
            if blob is None:
                await self.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            await self.push("501 5.5.2 Cannot split AUTH PLAIN value")
            return AuthResult(success=False, handled=True)
        return await self._verify(parts[1], parts[2])

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        if (refused := await self._auth_precheck()) is not None:
            return refused
        login: bytes | None
        if len(args) == 1:
            answer = await self.challenge_auth(self.AuthLoginUsernameChallenge)
            if not isinstance(answer, bytes):
                return AuthResult(success=False, handled=True)
            login = answer
        else:
            login = _b64(args[1])
            if login is None:
                await self.push("501 5.5.2 Cannot decode base64")
                return AuthResult(success=False, handled=True)
        password = await self.challenge_auth(self.AuthLoginPasswordChallenge)
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._verify(login, password)

    async def _auth_precheck(self) -> AuthResult | None:
        if not self.auth_offered():
            if not self.encrypted:
                await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
            else:
                await self.push("503 5.5.1 AUTH not available")
            return AuthResult(success=False, handled=True)
        if self.state.auth_limiter.banned(self.peer_ip):
            await self.push("421 4.7.0 Too many failed logins from your address, try later")
            if self.transport is not None:
                self.transport.close()
            return AuthResult(success=False, handled=True)
        return None

    async def _verify(self, login_b: bytes, password_b: bytes) -> AuthResult:
        state = self.state
        login = login_b.decode("utf-8", "replace")
        password = password_b.decode("utf-8", "surrogateescape")
        user = state.policy.user(login)
        ok = False
        if user is not None:
            if state.verified.hit(user.name, user.password_hash, password):
                ok = True
            else:
                ok = await asyncio.to_thread(verify_password, password, user.password_hash)
                if ok:
                    state.verified.add(user.name, user.password_hash, password)
        if ok:
            state.auth_limiter.succeeded(self.peer_ip)
            self.txn.user = login
            log.info("client authenticated", extra={"event": "auth_ok", "user": login, "client_ip": self.peer_ip})
            return AuthResult(success=True, auth_data=LoginPassword(login_b, b""))
        delay = state.auth_limiter.failed(self.peer_ip)
        log.warning("client authentication failed", extra={
            "event": "auth_failed", "user": login[:64], "client_ip": self.peer_ip})
        if delay:
            await asyncio.sleep(delay)  # tarpit: slows password guessing, not a synchronisation
        return AuthResult(success=False, handled=False, message="535 5.7.8 Authentication credentials invalid")

    # ---- DATA ------------------------------------------------------------------------------

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if not self.env.rcpt_tos or self.txn.route is None:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        route = self.txn.route
        limits = self.state.settings.limits
        try:
            body = self.state.intake.new_body()
        except SpoolError:
            await self.push("452 4.3.1 Insufficient system storage, try again later")
            return
        receiver = _DataReceiver(body, limit=limits.max_message_size, line_limit=limits.line_length,
                                 rewriter=HeaderRewriter(route) if route.rewrite_from else None)
        await self.push("354 3.0.0 End data with <CR><LF>.<CR><LF>")
        try:
            reply = await receiver.receive(self._reader)
        except asyncio.CancelledError:
            body.abort()
            raise
        except SpoolFull:
            reply = "452 4.3.1 Insufficient system storage, try again later"
        except (SpoolError, OSError):
            reply = "451 4.3.0 Local error storing the message, try again later"
        if reply is not None:
            body.abort()
            await self.push(reply)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        envelope = RelayEnvelope(
            mail_from="" if self.env.mail_from == "<>" else str(self.env.mail_from),
            rcpt_tos=tuple(self.env.rcpt_tos),
            mail_options=tuple(o for o in self.env.mail_options if not o.upper().startswith("SIZE=")),
        )
        try:
            reply = await self.state.intake.accept(envelope, route, body, message_id=receiver.message_id,
                                                   client=self.client_label())
        except SpoolFull:
            body.abort()
            reply = "452 4.3.1 Insufficient system storage, try again later"
        except Exception as exc:
            body.abort()
            log.error("could not accept a message: %s", type(exc).__name__,
                      extra={"event": "accept_failed", "error_type": type(exc).__name__})
            reply = INTERNAL_ERROR
        await self.push(reply)
        self._set_post_data_state()  # type: ignore[no-untyped-call]


def _b64(text: str) -> bytes | None:
    import base64
    import binascii

    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None


class _DataReceiver:
    """Reads DATA lines until CRLF.CRLF, un-stuffs dots, streams them to the body sink.

    Returns an error reply (and keeps reading to the end so the session stays in sync) when the
    message is too big or a line is too long; returns None when the message is complete.
    """

    def __init__(self, body: BodySink, *, limit: int, line_limit: int,
                 rewriter: HeaderRewriter | None) -> None:
        self.body = body
        self.limit = limit
        self.line_limit = line_limit
        self.rewriter = rewriter
        self.size = 0
        self.message_id = ""
        self._in_headers = True
        self._headers = bytearray()
        self._buffer = bytearray()

    async def receive(self, reader: asyncio.StreamReader) -> str | None:
        error: str | None = None
        fragments: list[bytes] = []
        while True:
            try:
                line = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:
                line = await reader.read(exc.consumed)
                error = error or f"500 5.5.2 Line too long (at most {self.line_limit} bytes)"
                fragments = []
                continue
            except asyncio.IncompleteReadError:
                raise ConnectionResetError("client closed the connection during DATA") from None
            if fragments:
                fragments.append(line)
                line = b"".join(fragments)
                fragments = []
            if line == b".\r\n":
                break
            if error is not None:
                continue
            if len(line) > self.line_limit + 2:
                error = f"500 5.5.2 Line too long (at most {self.line_limit} bytes)"
                continue
            if line.startswith(b"."):
                line = line[1:]
            self.size += len(line)
            if self.size > self.limit:
                error = f"552 5.3.4 Message size exceeds fixed maximum message size ({self.limit} bytes)"
                continue
            self._take(line)
        if error is None:
            self._finish()
        return error

    def _take(self, line: bytes) -> None:
        if self._in_headers:
            self._headers += line
            if line in (b"\r\n", b"\n") or len(self._headers) > _HEADER_LIMIT:
                self._end_headers()
            return
        self._buffer += line
        if len(self._buffer) >= _CHUNK:
            self.body.write(bytes(self._buffer))
            self._buffer.clear()

    def _end_headers(self) -> None:
        self._in_headers = False
        headers = bytes(self._headers)
        self._headers.clear()
        parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(headers)
        self.message_id = str(parsed.get("Message-ID", "") or "").strip()[:256]
        if self.rewriter is not None:
            headers = self.rewriter.rewrite(headers)
        self.body.write(headers)

    def _finish(self) -> None:
        if self._in_headers:
            self._end_headers()
        if self._buffer:
            self.body.write(bytes(self._buffer))
            self._buffer.clear()


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


def make_server_tls_context(cert_file: str, key_file: str, min_version: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


AcceptCallback = Callable[[RelayEnvelope, Route, BodySink], Awaitable[str]]
