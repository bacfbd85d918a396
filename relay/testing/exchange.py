"""A simulated Exchange Online SMTP submission endpoint (``smtp.office365.com:587``) on loopback.

Why: the relay's upstream code must meet Exchange's real protocol and real reply texts - STARTTLS
before AUTH, ``AUTH LOGIN XOAUTH2`` only, token and permission checks answered with ``535 5.7.3`` /
``5.7.139``, SendAs refusals at MAIL and after DATA, the per-mailbox limits - and its failure modes
(421 at connect, 4xx at any stage, a connection dropped mid-DATA, a slow server). aiosmtpd does the
SMTP parsing; this module adds Exchange's behaviour as told by ``docs/exchange.md``.

The protocol runs on its own event loop in a daemon thread (:meth:`ExchangeSimulator.start`), so a
synchronous test and an asyncio test drive it the same way. State, switches and counters are guarded
by one lock: tests flip them from their own thread while sessions are live ("the admin fixed the
permission").
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import datetime
import email.parser
import email.policy
import email.utils
import hashlib
import json
import logging
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.testing.certs import ServerCertificates
from relay.testing.chunking import ChunkingMixin, WireFeatures
from relay.testing.entra import EXCHANGE_RESOURCE, SMTP_SEND_AS_APP
from relay.testing.loop_thread import LoopThread

log = logging.getLogger(__name__)

SIM_HOSTNAME = "SIM01.prod.outlook.com"
"""Host name in the banner, EHLO and bracketed reply tails (real ones look like SN4PR0201CA0045...)."""
MAX_MESSAGE_SIZE = 157_286_400
"""The EHLO ``SIZE`` of Exchange Online (150 MB): a ceiling, not what usually bites."""
DEFAULT_MAX_SEND_SIZE = 35 * 1024 * 1024
"""A mailbox's MaxSendSize (commonly 25-35 MB, *unverified*): what really limits a message."""
COMMAND_LINE_LIMIT = 16_384
"""aiosmtpd allows 512-byte command lines; ``AUTH XOAUTH2 <b64>`` lines are 2-4 KB (more with big tokens)."""
TOKEN_CLOCK_SKEW = 300
"""Seconds of skew tolerated on a token's ``nbf`` (Exchange tolerates a few minutes)."""

FAULT_STAGES = ("connect", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "drop_mid_data")
"""Where a one-shot fault can be injected. ``data`` replies after the message was received."""

DEFAULT_FAULT_REPLIES = {
    "connect": "421 4.3.2 Service not available, closing transmission channel",
    "data": "451 4.7.0 Temporary server error. Please try again later. PRX2",
}
GENERIC_FAULT_REPLY = "451 4.7.0 Temporary server error. Please try again later. PRX2"

# Reply texts. Where a bracketed tail follows, it is added by ExchangeSimulator.tail().
AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_FAILED = "535 5.7.3 Authentication unsuccessful"
AUTH_DISABLED = (
    "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the {scope}. "
    "Visit https://aka.ms/smtp_auth_disabled for more information."
)
BASIC_AUTH_DISABLED = "535 5.7.139 Authentication unsuccessful, basic authentication is disabled."
UNKNOWN_MECHANISM = "504 5.7.4 Unrecognized authentication type"
NEED_STARTTLS = "530 5.7.0 Must issue a STARTTLS command first"
NOT_AUTHENTICATED = "530 5.7.57 Client not authenticated to send mail."
SEND_AS_DENIED_MAIL = "550 5.7.60 SMTP; Client does not have permissions to send as this sender"
THREAD_LIMIT = "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"
# *unverified*: the exact text Exchange sends when the per-minute submission rate is exceeded.
RATE_LIMIT = "421 4.4.2 Message submission rate for this client has exceeded the configured limit"
SIZE_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
RCPT_NOT_FOUND = "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
_STOREDRV_TAIL = (
    "Failed to process message due to a permanent exception with message "
    "[BeginDiagnosticData]Cannot submit message. {detail}[EndDiagnosticData]"
)
SEND_AS_DENIED_DATA = (
    "554 5.2.252 SendAsDenied; {mailbox} not allowed to send as {sender}; "
    "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; " + _STOREDRV_TAIL
)
MESSAGE_TOO_BIG = "554 5.2.0 STOREDRV.Submission.Exception:MessageSubmissionExceededException; " + _STOREDRV_TAIL
QUOTA_EXCEEDED = "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; " + _STOREDRV_TAIL

_MAIL_PARAMS = {"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH"}
_RCPT_PARAMS = {"NOTIFY", "ORCPT"}


# ---------------------------------------------------------------------------------------------
# State model
# ---------------------------------------------------------------------------------------------


@dataclass
class Mailbox:
    """A mailbox (or any address the tenant owns) and the rights apps hold on it.

    ``full_access`` / ``send_as`` hold app client IDs (the trustee is the app's service principal).
    ``smtp_auth_enabled`` mirrors ``Set-CASMailbox -SmtpClientAuthenticationDisabled``: None follows
    the tenant setting, True/False override it.
    """

    address: str
    tenant_id: str
    full_access: set[str] = field(default_factory=set)
    send_as: set[str] = field(default_factory=set)
    smtp_auth_enabled: bool | None = None
    max_send_size: int = DEFAULT_MAX_SEND_SIZE
    quota_exhausted: bool = False


@dataclass
class ExchangeTenant:
    """The Exchange Online side of a tenant: org-wide SMTP AUTH and registered service principals."""

    tenant_id: str
    smtp_auth_disabled: bool = False
    service_principals: dict[str, str] = field(default_factory=dict)
    """app client ID -> object ID given to ``New-ServicePrincipal``."""


@dataclass
class ExchangeLimits:
    """Per-mailbox limits (Exchange Online defaults, all configurable)."""

    concurrent_sessions: int = 3
    messages_per_minute: int = 30
    recipients_per_day: int = 10_000
    recipients_per_message: int = 1_000


@dataclass(frozen=True)
class AuthAttempt:
    """One AUTH command: the raw initial response exactly as received, and the outcome.

    ``reason`` names the failed check (``malformed``, ``invalid_token``, ``expired``, ``wrong_audience``,
    ``unknown_tenant``, ``missing_role``, ``service_principal``, ``no_full_access``,
    ``smtp_auth_disabled``, ``basic_auth``) or is ``ok``. The token itself is not kept.
    """

    mechanism: str
    raw: str
    user: str | None
    client_id: str | None
    success: bool
    reply: str
    reason: str


@dataclass(frozen=True)
class AcceptedMessage:
    """A message Exchange said 250 to, as stored on disk."""

    seq: int
    queue_id: str
    mail_from: str
    rcpt_tos: tuple[str, ...]
    mail_options: tuple[str, ...]
    mailbox: str
    client_id: str
    tenant_id: str
    accepted_at: float
    size: int
    sha256: str
    content: bytes = field(repr=False)
    eml_path: Path
    json_path: Path


@dataclass(frozen=True)
class ExchangeStats:
    """A snapshot of the counters."""

    connections: int
    auth_successes: int
    auth_failures: int
    messages_accepted: int
    max_concurrent_sessions: dict[str, int]


@dataclass
class _Fault:
    reply: str | None
    remaining: int | None  # None: until cleared


@dataclass(frozen=True)
class _AuthContext:
    """Who a session authenticated as: the XOAUTH2 ``user=`` and the token's app and tenant."""

    mailbox: str
    client_id: str
    tenant_id: str


# ---------------------------------------------------------------------------------------------
# The simulator: state, policy, switches, counters, storage
# ---------------------------------------------------------------------------------------------


class ExchangeSimulator:
    """Exchange Online's SMTP submission endpoint. Public methods are thread-safe."""

    def __init__(
        self,
        certs: ServerCertificates,
        outdir: Path,
        *,
        token_key: rsa.RSAPublicKey,
        clock: Callable[[], float] = time.time,
        seed: int = 0,
        limits: ExchangeLimits | None = None,
        hostname: str = SIM_HOSTNAME,
    ) -> None:
        self._certs = certs
        self.outdir = outdir
        self._token_key = token_key
        self._clock = clock
        self._random = random.Random(f"exchange-{seed}")
        self.limits = limits or ExchangeLimits()
        self.hostname = hostname
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._tenants: dict[str, ExchangeTenant] = {}
        self._mailboxes: dict[str, Mailbox] = {}
        self.unknown_recipients: set[str] = set()
        self._faults: dict[str, deque[_Fault]] = collections.defaultdict(deque)
        self._reply_delay = 0.0
        self._accepted: list[AcceptedMessage] = []
        self._auth_attempts: list[AuthAttempt] = []
        self._connections = 0
        self._auth_ok = 0
        self._auth_failed = 0
        self._authenticated: dict[str, set[int]] = collections.defaultdict(set)
        self._admitted: dict[str, set[int]] = collections.defaultdict(set)
        self._max_concurrent: dict[str, int] = collections.defaultdict(int)
        self._submissions: dict[str, deque[float]] = collections.defaultdict(deque)
        self._recipients: dict[str, deque[tuple[float, int]]] = collections.defaultdict(deque)
        #: Limit refusals per mailbox and kind: ``thread_limit`` (432 4.3.2), ``rate`` (per minute),
        #: ``quota`` (554 5.2.0 SubmissionQuotaExceeded, recipients per day).
        self._refusals: dict[tuple[str, str], int] = collections.defaultdict(int)
        self._seq = 0
        self._runner = LoopThread("exchange-sim")
        self._server: asyncio.Server | None = None
        self._protocols: set[_ExchangeSMTP] = set()
        self._port = 0
        #: PIPELINING / CHUNKING switches and the round trips of each transaction (relay.testing.chunking).
        self.wire = WireFeatures()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Serve on 127.0.0.1 (ephemeral port) from a private event loop in a daemon thread."""
        if self._runner.running:
            return
        self.outdir.mkdir(parents=True, exist_ok=True)
        loop = self._runner.start()
        self._server = self._runner.call(loop.create_server(self._new_protocol, "127.0.0.1", self._port))
        self._port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Close the listener and every open session, then end the loop thread."""
        self._runner.stop(self._shutdown)
        self._server = None

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for protocol in list(self._protocols):
            protocol.abort()
        for _ in range(100):  # connection_lost() runs on later loop iterations
            with self._lock:
                if not self._protocols:
                    break
            await asyncio.sleep(0.01)

    @property
    def port(self) -> int:
        return self._port

    @property
    def host(self) -> str:
        """The name a client dials (matches the server certificate)."""
        return "localhost"

    def _new_protocol(self) -> _ExchangeSMTP:
        return _WireSMTP(self, self._certs.server_context(), self._runner.loop)

    # -- directory ---------------------------------------------------------------------------

    def add_tenant(self, tenant_id: str, *, smtp_auth_disabled: bool = False) -> ExchangeTenant:
        with self._lock:
            tenant = self._tenants.setdefault(tenant_id, ExchangeTenant(tenant_id))
            tenant.smtp_auth_disabled = smtp_auth_disabled
            return tenant

    def set_tenant_smtp_auth(self, tenant_id: str, enabled: bool) -> None:
        """``Set-TransportConfig -SmtpClientAuthenticationDisabled (not enabled)``."""
        with self._lock:
            self._tenants[tenant_id].smtp_auth_disabled = not enabled

    def register_service_principal(self, tenant_id: str, client_id: str, object_id: str) -> None:
        """``New-ServicePrincipal -AppId <client_id> -ObjectId <object_id>``.

        Passing an object ID other than the enterprise app's (the classic mistake of using the App
        registration's Object ID) makes AUTH fail with 535 5.7.3, as in Exchange.
        """
        with self._lock:
            self._tenants[tenant_id].service_principals[client_id] = object_id

    def remove_service_principal(self, tenant_id: str, client_id: str) -> None:
        with self._lock:
            self._tenants[tenant_id].service_principals.pop(client_id, None)

    def add_mailbox(
        self,
        tenant_id: str,
        address: str,
        *,
        full_access: Iterable[str] = (),
        send_as: Iterable[str] = (),
        smtp_auth_enabled: bool | None = None,
        max_send_size: int = DEFAULT_MAX_SEND_SIZE,
    ) -> Mailbox:
        with self._lock:
            if tenant_id not in self._tenants:
                raise KeyError(f"unknown tenant {tenant_id!r}: call add_tenant first")
            mailbox = Mailbox(
                address.lower(), tenant_id, set(full_access), set(send_as), smtp_auth_enabled, max_send_size
            )
            self._mailboxes[mailbox.address] = mailbox
            return mailbox

    def mailbox(self, address: str) -> Mailbox:
        with self._lock:
            return self._mailboxes[address.lower()]

    def grant_full_access(self, address: str, client_id: str) -> None:
        """``Add-MailboxPermission -AccessRights FullAccess`` for the app's service principal."""
        with self._lock:
            self.mailbox(address).full_access.add(client_id)

    def revoke_full_access(self, address: str, client_id: str) -> None:
        with self._lock:
            self.mailbox(address).full_access.discard(client_id)

    def grant_send_as(self, address: str, client_id: str) -> None:
        """``Add-RecipientPermission -AccessRights SendAs`` for the app's service principal."""
        with self._lock:
            self.mailbox(address).send_as.add(client_id)

    def revoke_send_as(self, address: str, client_id: str) -> None:
        with self._lock:
            self.mailbox(address).send_as.discard(client_id)

    def set_mailbox_smtp_auth(self, address: str, enabled: bool | None) -> None:
        """``Set-CASMailbox -SmtpClientAuthenticationDisabled``: None = follow the tenant."""
        with self._lock:
            self.mailbox(address).smtp_auth_enabled = enabled

    def set_quota_exhausted(self, address: str, exhausted: bool) -> None:
        """Force the daily recipient quota of a mailbox to be used up (or not)."""
        with self._lock:
            self.mailbox(address).quota_exhausted = exhausted

    def set_max_send_size(self, address: str, size: int) -> None:
        with self._lock:
            self.mailbox(address).max_send_size = size

    def add_unknown_recipient(self, address: str) -> None:
        with self._lock:
            self.unknown_recipients.add(address.lower())

    # -- switches ----------------------------------------------------------------------------

    def inject(self, stage: str, reply: str | None = None, *, times: int | None = 1) -> None:
        """Make the next ``times`` commands of ``stage`` get ``reply`` instead (None: until cleared).

        ``connect`` sends the reply instead of the banner and closes; a ``421`` reply at any stage
        closes the connection after it is sent; ``drop_mid_data`` closes the TCP connection while the
        message is being received, without a reply.
        """
        if stage not in FAULT_STAGES:
            raise ValueError(f"unknown stage {stage!r}; one of {FAULT_STAGES}")
        if reply is None and stage != "drop_mid_data":
            reply = DEFAULT_FAULT_REPLIES.get(stage, GENERIC_FAULT_REPLY)
        with self._lock:
            self._faults[stage].append(_Fault(reply, times))

    def drop_mid_data(self, *, times: int | None = 1) -> None:
        self.inject("drop_mid_data", times=times)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def set_reply_delay(self, seconds: float) -> None:
        """Wait this long before every reply: a slow server, for timeout tests."""
        with self._lock:
            self._reply_delay = max(0.0, seconds)

    @property
    def reply_delay(self) -> float:
        with self._lock:
            return self._reply_delay

    def take_fault(self, stage: str) -> _Fault | None:
        """Consume one fault for ``stage`` if one is queued."""
        with self._lock:
            queue = self._faults.get(stage)
            if not queue:
                return None
            fault = queue[0]
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    queue.popleft()
            return fault

    # -- counters and records ----------------------------------------------------------------

    @property
    def accepted(self) -> list[AcceptedMessage]:
        with self._lock:
            return list(self._accepted)

    @property
    def auth_attempts(self) -> list[AuthAttempt]:
        with self._lock:
            return list(self._auth_attempts)

    def stats(self) -> ExchangeStats:
        with self._lock:
            return ExchangeStats(
                self._connections,
                self._auth_ok,
                self._auth_failed,
                len(self._accepted),
                dict(self._max_concurrent),
            )

    def refusals(self, address: str | None = None) -> dict[str, int]:
        """How often the per-mailbox limits were enforced (one mailbox, or all): kind -> count."""
        out = {"thread_limit": 0, "rate": 0, "quota": 0}
        with self._lock:
            for (mailbox, kind), n in self._refusals.items():
                if address is None or mailbox == address.lower():
                    out[kind] += n
        return out

    def max_per_minute(self, address: str) -> int:
        """The most messages of a mailbox accepted within any 60 s (as Exchange counts its minute)."""
        with self._lock:
            stamps = sorted(m.accepted_at for m in self._accepted if m.mailbox == address.lower())
        best, first = 0, 0
        for i, t in enumerate(stamps):
            while t - stamps[first] >= 60:
                first += 1
            best = max(best, i - first + 1)
        return best

    def max_concurrent(self, address: str) -> int:
        """The most authenticated sessions a mailbox ever had open at once."""
        with self._lock:
            return self._max_concurrent.get(address.lower(), 0)

    def concurrent_sessions(self, address: str) -> int:
        """Authenticated sessions open right now for a mailbox."""
        with self._lock:
            return len(self._authenticated.get(address.lower(), ()))

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Block until ``predicate()`` (evaluated under the lock) holds or ``timeout`` passes.

        Every state change by a session notifies, so tests synchronise on facts instead of sleeping.
        """
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    async def await_until(self, predicate: Callable[[], bool], seconds: float = 5.0) -> bool:
        """:meth:`wait_until` for asyncio callers: waits in a worker thread so their loop keeps running."""
        return await asyncio.to_thread(self.wait_until, predicate, seconds)

    def wait_for_messages(self, count: int, timeout: float = 5.0) -> list[AcceptedMessage]:
        if not self.wait_until(lambda: len(self._accepted) >= count, timeout):
            raise TimeoutError(f"{len(self._accepted)} of {count} messages accepted after {timeout}s")
        return self.accepted

    def tail(self) -> str:
        """The bracketed tail Exchange appends to errors: ``[server timestamp id]``."""
        with self._lock:
            ident = f"{self._random.getrandbits(64):016X}"
        stamp = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        return f"[{self.hostname} {stamp} {ident}]"

    def banner_date(self) -> str:
        return datetime.datetime.fromtimestamp(self._clock(), datetime.UTC).strftime("%a, %d %b %Y %H:%M:%S +0000")

    # -- session bookkeeping (called from the loop thread) -----------------------------------

    def session_opened(self, protocol: _ExchangeSMTP) -> None:
        with self._changed:
            self._protocols.add(protocol)
            self._connections += 1
            self._changed.notify_all()

    def session_closed(self, protocol: _ExchangeSMTP) -> None:
        with self._changed:
            self._protocols.discard(protocol)
            key = id(protocol)
            for sessions in (*self._authenticated.values(), *self._admitted.values()):
                sessions.discard(key)
            self._changed.notify_all()

    # -- policy ------------------------------------------------------------------------------

    def authenticate_xoauth2(self, protocol: _ExchangeSMTP, raw: str) -> tuple[str, _AuthContext | None]:
        """Check an XOAUTH2 initial response in Exchange's order; return (reply, context)."""
        user, token = _parse_xoauth2(raw)
        if user is None or token is None:
            return self._auth_result("XOAUTH2", raw, user, None, AUTH_FAILED, "malformed")
        claims, reason = self._verify_token(token)
        client_id = claims.get("appid") if claims else None
        if claims is None:
            return self._auth_result("XOAUTH2", raw, user, client_id, AUTH_FAILED, reason)
        with self._lock:
            reply, reason = self._check_rights(user, claims)
        if reason != "ok":
            return self._auth_result("XOAUTH2", raw, user, client_id, reply, reason)
        context = _AuthContext(user.lower(), str(claims["appid"]), str(claims["tid"]))
        with self._changed:
            sessions = self._authenticated[context.mailbox]
            sessions.add(id(protocol))
            self._max_concurrent[context.mailbox] = max(self._max_concurrent[context.mailbox], len(sessions))
        return self._auth_result("XOAUTH2", raw, user, client_id, AUTH_OK, "ok", context)

    def basic_auth_refused(self, raw: str) -> str:
        """AUTH LOGIN: always refused, basic authentication is off."""
        return self._auth_result("LOGIN", raw, None, None, BASIC_AUTH_DISABLED, "basic_auth")[0]

    def _auth_result(
        self,
        mechanism: str,
        raw: str,
        user: str | None,
        client_id: Any,
        reply: str,
        reason: str,
        context: _AuthContext | None = None,
    ) -> tuple[str, _AuthContext | None]:
        success = context is not None
        if not success:
            reply = f"{reply} {self.tail()}"
        with self._changed:
            self._auth_attempts.append(
                AuthAttempt(mechanism, raw, user, str(client_id) if client_id else None, success, reply, reason)
            )
            if success:
                self._auth_ok += 1
            else:
                self._auth_failed += 1
            self._changed.notify_all()
        return reply, context

    def _verify_token(self, token: str) -> tuple[dict[str, Any] | None, str]:
        """Signature, audience, issuer/tenant and lifetime (per the simulator clock)."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._token_key,
                algorithms=["RS256"],
                options={"verify_aud": False, "verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.PyJWTError:
            return None, "invalid_token"
        now = self._clock()
        tid = claims.get("tid")
        with self._lock:
            known_tenant = tid in self._tenants
        if str(claims.get("aud", "")).rstrip("/") != EXCHANGE_RESOURCE:
            return None, "wrong_audience"
        if not known_tenant or claims.get("iss") != f"https://sts.windows.net/{tid}/":
            return None, "unknown_tenant"
        exp, nbf = claims.get("exp"), claims.get("nbf", 0)
        if not isinstance(exp, int | float) or exp <= now:
            return None, "expired"
        if isinstance(nbf, int | float) and nbf > now + TOKEN_CLOCK_SKEW:
            return None, "expired"
        return claims, "ok"

    def _check_rights(self, user: str, claims: dict[str, Any]) -> tuple[str, str]:
        """Role, service principal, FullAccess, SMTP AUTH enabled - in that order. Caller holds the lock."""
        roles = claims.get("roles") or []
        if SMTP_SEND_AS_APP not in roles:
            return AUTH_FAILED, "missing_role"
        tenant = self._tenants[str(claims["tid"])]
        if tenant.service_principals.get(str(claims.get("appid"))) != claims.get("oid"):
            return AUTH_FAILED, "service_principal"
        mailbox = self._mailboxes.get(user.lower())
        if mailbox is None or mailbox.tenant_id != tenant.tenant_id or claims["appid"] not in mailbox.full_access:
            return AUTH_FAILED, "no_full_access"
        if mailbox.smtp_auth_enabled is False:
            return AUTH_DISABLED.format(scope="Mailbox"), "smtp_auth_disabled"
        if mailbox.smtp_auth_enabled is None and tenant.smtp_auth_disabled:
            return AUTH_DISABLED.format(scope="Tenant"), "smtp_auth_disabled"
        return AUTH_OK, "ok"

    def may_send_as(self, auth: _AuthContext, address: str) -> bool:
        """The authenticated mailbox itself, or an address the app holds SendAs on."""
        address = address.lower()
        if address == auth.mailbox:
            return True
        with self._lock:
            target = self._mailboxes.get(address)
            return target is not None and target.tenant_id == auth.tenant_id and auth.client_id in target.send_as

    def check_mail(self, protocol: _ExchangeSMTP, auth: _AuthContext, sender: str, size: int | None) -> str | None:
        """MAIL FROM checks: size, SendAs, sender threads, rate. Returns a refusal or None."""
        with self._lock:
            mailbox = self._mailboxes[auth.mailbox]
            if size is not None and size > min(MAX_MESSAGE_SIZE, mailbox.max_send_size):
                return f"{SIZE_TOO_BIG} {self.tail()}"
            if sender and not self.may_send_as(auth, sender):
                return f"{SEND_AS_DENIED_MAIL} {self.tail()}"
            admitted = self._admitted[auth.mailbox]
            if id(protocol) not in admitted:
                if len(admitted) >= self.limits.concurrent_sessions:
                    self._refusals[(auth.mailbox, "thread_limit")] += 1
                    return f"{THREAD_LIMIT} {self.tail()}"
                admitted.add(id(protocol))
            recent = self._submissions[auth.mailbox]
            _forget_before(recent, self._clock() - 60)
            if len(recent) >= self.limits.messages_per_minute:
                self._refusals[(auth.mailbox, "rate")] += 1
                return f"{RATE_LIMIT} {self.tail()}"
        return None

    def check_rcpt(self, rcpt_count: int, address: str) -> str | None:
        with self._lock:
            if rcpt_count >= self.limits.recipients_per_message:
                return f"{TOO_MANY_RCPTS} {self.tail()}"
            if address.lower() in self.unknown_recipients:
                return f"{RCPT_NOT_FOUND} {self.tail()}"
        return None

    def finish_data(self, auth: _AuthContext, envelope: Envelope) -> str:
        """End of DATA: header From, size, daily quota; then store and answer 250 with a queue id."""
        content = envelope.original_content or b""
        for sender in _header_from_addresses(content):
            if not self.may_send_as(auth, sender):
                detail = f"SendAsDeniedException.MapiExceptionSendAsDenied: {auth.mailbox} -> {sender}. "
                reply = SEND_AS_DENIED_DATA.format(mailbox=auth.mailbox, sender=sender, detail=detail)
                return f"{reply} {self.tail()}"
        with self._changed:
            mailbox = self._mailboxes[auth.mailbox]
            if len(content) > mailbox.max_send_size:
                detail = f"MessageSubmissionExceededException: {len(content)} > {mailbox.max_send_size}. "
                return f"{MESSAGE_TOO_BIG.format(detail=detail)} {self.tail()}"
            now = self._clock()
            used = self._recipients[auth.mailbox]
            _forget_before(used, now - 86_400)
            if mailbox.quota_exhausted or sum(n for _, n in used) + len(envelope.rcpt_tos) > (
                self.limits.recipients_per_day
            ):
                detail = "SubmissionQuotaExceededException: recipient rate limit exceeded. "
                self._refusals[(auth.mailbox, "quota")] += 1
                return f"{QUOTA_EXCEEDED.format(detail=detail)} {self.tail()}"
            used.append((now, len(envelope.rcpt_tos)))
            self._submissions[auth.mailbox].append(now)
            message = self._store(auth, envelope, content, now)
            self._changed.notify_all()
        return f"250 2.0.0 OK <{message.queue_id}@{self.hostname}> [Hostname={self.hostname}]"

    def _store(self, auth: _AuthContext, envelope: Envelope, content: bytes, now: float) -> AcceptedMessage:
        """Write ``<seq>-<queueid>.eml`` (exact bytes) and ``.json`` (envelope); keep it in memory."""
        self._seq += 1
        queue_id = f"{self._random.getrandbits(80):020X}"
        stem = f"{self._seq:06d}-{queue_id}"
        message = AcceptedMessage(
            seq=self._seq,
            queue_id=queue_id,
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            mail_options=tuple(envelope.mail_options),
            mailbox=auth.mailbox,
            client_id=auth.client_id,
            tenant_id=auth.tenant_id,
            accepted_at=now,
            size=len(content),
            sha256=hashlib.sha256(content).hexdigest(),
            content=content,
            eml_path=self.outdir / f"{stem}.eml",
            json_path=self.outdir / f"{stem}.json",
        )
        message.eml_path.write_bytes(content)
        meta = {k: v for k, v in asdict(message).items() if k not in ("content", "eml_path", "json_path")}
        message.json_path.write_text(json.dumps(meta, indent=2) + "\n")
        self._accepted.append(message)
        return message


# ---------------------------------------------------------------------------------------------
# The SMTP protocol: aiosmtpd with Exchange's commands, replies and fault hooks
# ---------------------------------------------------------------------------------------------


class _Hooks:
    """aiosmtpd handler hooks for the replies whose wording we only need to change."""

    async def handle_DATA(self, server: _ExchangeSMTP, session: Session, envelope: Envelope) -> str:
        return await server.finish_data(envelope)

    async def handle_NOOP(self, server: _ExchangeSMTP, session: Session, envelope: Envelope, arg: str) -> str:
        return "250 2.0.0 OK"

    async def handle_RSET(self, server: _ExchangeSMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 Resetting"

    async def handle_QUIT(self, server: _ExchangeSMTP, session: Session, envelope: Envelope) -> str:
        return "221 2.0.0 Service closing transmission channel"


class _ExchangeSMTP(SMTP):
    """One SMTP session. Overrides EHLO, AUTH, MAIL, RCPT and DATA; aiosmtpd does the rest."""

    command_size_limit = COMMAND_LINE_LIMIT
    command_size_limits: dict[str, int] = collections.defaultdict(lambda: COMMAND_LINE_LIMIT)
    # The StreamReader limit: must exceed the longest AUTH line. Also bounds DATA lines (Exchange's
    # own limit on long lines is *unverified*; it does not refuse 1000+ octet lines outright).
    line_length_limit = COMMAND_LINE_LIMIT

    def __init__(
        self, sim: ExchangeSimulator, tls_context: ssl.SSLContext, loop: asyncio.AbstractEventLoop | None
    ) -> None:
        self.sim = sim
        self.auth: _AuthContext | None = None
        super().__init__(
            _Hooks(),
            hostname=sim.hostname,
            ident=f"Microsoft ESMTP MAIL Service ready at {sim.banner_date()}",
            tls_context=tls_context,
            data_size_limit=MAX_MESSAGE_SIZE,
            enable_SMTPUTF8=True,
            timeout=600,
            loop=loop,
        )

    # -- plumbing ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            self.sim.session_opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.sim.session_closed(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        fault = self.sim.take_fault("connect")
        if fault is not None and fault.reply is not None:
            await self.push(fault.reply)
            return
        await super()._handle_client()

    async def push(self, status: str | bytes) -> None:
        """Send a reply after the configured delay; a 421 closes the channel as SMTP says."""
        delay = self.sim.reply_delay
        if delay:
            await asyncio.sleep(delay)
        if isinstance(status, bytes):
            await super().push(status)
        else:
            await super().push(status)
        text = status.decode("ascii", "replace") if isinstance(status, bytes) else status
        if text.startswith("421") and self.transport is not None:
            self.transport.close()

    async def _fault(self, stage: str) -> bool:
        """Send an injected reply for ``stage`` instead of the normal one; True if one was sent."""
        fault = self.sim.take_fault(stage)
        if fault is None or fault.reply is None:
            return False
        await self.push(fault.reply)
        return True

    @property
    def _tls(self) -> bool:
        return self._tls_protocol is not None

    async def _require(self, *, auth: bool) -> bool:
        """The preconditions Exchange checks before MAIL/RCPT/DATA; True if a refusal was sent."""
        assert self.session is not None
        if not self.session.host_name:
            await self.push("503 5.5.1 Send hello first")
        elif not self._tls:
            await self.push(NEED_STARTTLS)
        elif auth and self.auth is None:
            await self.push(f"{NOT_AUTHENTICATED} {self.sim.tail()}")
        else:
            return False
        return True

    # -- commands ----------------------------------------------------------------------------

    async def smtp_EHLO(self, hostname: str) -> None:
        if await self._fault("ehlo"):
            return
        if not hostname:
            await self.push("501 5.5.4 Invalid domain name")
            return
        self.envelope = self._create_envelope()
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = hostname
        peer = self.session.peer[0] if isinstance(self.session.peer, tuple) else "127.0.0.1"
        lines = [f"{self.hostname} Hello [{peer}]", f"SIZE {MAX_MESSAGE_SIZE}", "PIPELINING", "DSN"]
        lines.append("ENHANCEDSTATUSCODES")
        lines.append("AUTH LOGIN XOAUTH2" if self._tls else "STARTTLS")
        lines += ["8BITMIME", "BINARYMIME", "CHUNKING", "SMTPUTF8"]
        await self.push("\r\n".join(f"250-{line}" for line in lines[:-1]) + f"\r\n250 {lines[-1]}")

    async def smtp_STARTTLS(self, arg: str) -> None:
        if await self._fault("starttls"):
            return
        if self._tls:
            await self.push("503 5.5.1 TLS already active")
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg: str | None) -> None:
        if await self._fault("auth"):
            return
        assert self.session is not None
        if not self.session.host_name:
            await self.push("503 5.5.1 Send hello first")
            return
        args = (arg or "").split()
        if not self._tls or not args:
            # Exchange does not offer AUTH before STARTTLS; the exact pre-TLS text is *unverified*.
            await self.push(UNKNOWN_MECHANISM if args else "501 5.5.4 Invalid arguments")
            return
        if self.auth is not None:
            await self.push("503 5.5.1 Already authenticated")
            return
        mechanism = args[0].upper()
        if mechanism == "XOAUTH2":
            await self._auth_xoauth2(args[1:])
        elif mechanism == "LOGIN":
            await self._auth_login(args[1:])
        else:
            await self.push(UNKNOWN_MECHANISM)

    async def _auth_xoauth2(self, initial: list[str]) -> None:
        raw = initial[0] if initial else await self._read_auth_line(b"334 ")
        if raw is None:
            return
        reply, context = self.sim.authenticate_xoauth2(self, raw)
        if context is not None:
            self.auth = context
            assert self.session is not None
            self.session.authenticated = True
        await self.push(reply)

    async def _auth_login(self, initial: list[str]) -> None:
        username = initial[0] if initial else await self._read_auth_line(b"334 VXNlcm5hbWU6")
        if username is None:
            return
        password = await self._read_auth_line(b"334 UGFzc3dvcmQ6")
        if password is None:
            return
        await self.push(self.sim.basic_auth_refused(username))

    async def _read_auth_line(self, challenge: bytes) -> str | None:
        """Send a 334 challenge and read the client's line; None if it aborted with ``*``."""
        await self.push(challenge)
        line = (await self._reader.readline()).strip().decode("ascii", "replace")
        if line == "*":
            await self.push("501 5.0.0 Authentication aborted")
            return None
        return line

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self._fault("mail") or await self._require(auth=True):
            return
        assert self.envelope is not None and self.auth is not None
        if self.envelope.mail_from is not None:
            await self.push("503 5.5.2 Sender already specified")
            return
        parsed = self._parse_path("FROM:", arg, _MAIL_PARAMS)
        if isinstance(parsed, str):
            await self.push(parsed)
            return
        address, options, params = parsed
        size = params.get("SIZE")
        refusal = self.sim.check_mail(self, self.auth, address, int(size) if size and size.isdigit() else None)
        if refusal is not None:
            await self.push(refusal)
            return
        self.envelope.mail_from = address
        self.envelope.mail_options.extend(options)
        self.envelope.smtp_utf8 = "SMTPUTF8" in params
        await self.push("250 2.1.0 Sender OK")

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self._fault("rcpt") or await self._require(auth=True):
            return
        assert self.envelope is not None
        if self.envelope.mail_from is None:
            await self.push("503 5.5.2 Need mail command")
            return
        parsed = self._parse_path("TO:", arg, _RCPT_PARAMS)
        if isinstance(parsed, str):
            await self.push(parsed)
            return
        address, options, _ = parsed
        if not address:
            await self.push("501 5.1.3 Invalid address")
            return
        refusal = self.sim.check_rcpt(len(self.envelope.rcpt_tos), address)
        if refusal is not None:
            await self.push(refusal)
            return
        self.envelope.rcpt_tos.append(address)
        self.envelope.rcpt_options.extend(options)
        await self.push("250 2.1.5 Recipient OK")

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self._require(auth=True):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.2 Need rcpt command")
            return
        if self.sim.take_fault("drop_mid_data") is not None:
            await self._drop_mid_data()
            return
        await super().smtp_DATA(arg)

    def abort(self) -> None:
        """Cut the TCP connection at once (under TLS too), without a reply."""
        transport = self._original_transport or self.transport
        if isinstance(transport, asyncio.Transport):
            transport.abort()

    async def _drop_mid_data(self) -> None:
        """Say 354, take the first line of the message, then cut the TCP connection without a reply."""
        await self.push("354 Start mail input; end with <CRLF>.<CRLF>")
        await self._reader.readline()
        self.abort()
        # Stop this session's command loop too, or it would read the buffered message lines as commands.
        raise asyncio.CancelledError

    async def finish_data(self, envelope: Envelope) -> str:
        """Called by the DATA hook once the whole message is in."""
        fault = self.sim.take_fault("data")
        if fault is not None and fault.reply is not None:
            return fault.reply
        assert self.auth is not None
        return self.sim.finish_data(self.auth, envelope)

    def _parse_path(
        self, keyword: str, arg: str | None, allowed: set[str]
    ) -> tuple[str, list[str], dict[str, str]] | str:
        """Parse ``FROM:<addr> params`` / ``TO:<addr> params``; a str result is the error reply."""
        rest = self._strip_command_keyword(keyword, arg or "")
        if rest is None:
            return f"501 5.5.4 Syntax: {keyword[:-1]}:<address> [parameters]"
        if rest.startswith("<>"):
            address, tail = "", rest[2:]
        else:
            parsed, tail_or_none = self._getaddr(rest)
            if not parsed:
                return "501 5.1.7 Invalid address"
            address, tail = parsed, tail_or_none or ""
        options = tail.split()
        params: dict[str, str] = {}
        for option in options:
            name, _, value = option.partition("=")
            if name.upper() not in allowed:
                return f"555 5.5.4 Unsupported parameter {name}"
            params[name.upper()] = value
        return address, options, params


class _WireSMTP(ChunkingMixin, _ExchangeSMTP):
    """An Exchange session with BDAT, the extension switches and the round-trip count."""

    @property
    def wire(self) -> WireFeatures:
        return self.sim.wire

    def take_drop_fault(self) -> bool:
        return self.sim.take_fault("drop_mid_data") is not None


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def xoauth2_initial_response(user: str, token: str) -> str:
    """base64 of ``user=<mailbox>\\x01auth=Bearer <token>\\x01\\x01`` (docs/exchange.md, "XOAUTH2")."""
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode()).decode("ascii")


def _parse_xoauth2(raw: str) -> tuple[str | None, str | None]:
    """(user, token) from an XOAUTH2 initial response; Nones where it is malformed."""
    try:
        decoded = base64.b64decode(raw, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None, None
    parts = decoded.split("\x01")
    if len(parts) != 4 or parts[2:] != ["", ""]:
        return None, None
    user = parts[0].removeprefix("user=") if parts[0].startswith("user=") and len(parts[0]) > 5 else None
    token = parts[1][len("auth=Bearer ") :] if parts[1].startswith("auth=Bearer ") else None
    return user, token or None


def _header_from_addresses(content: bytes) -> list[str]:
    """Addresses in the From header(s), parsing the header block only (bodies can be huge)."""
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(content)
    values = [str(v) for v in headers.get_all("From", [])]
    return [addr for _, addr in email.utils.getaddresses(values) if addr]


def _forget_before(events: deque[Any], cutoff: float) -> None:
    """Drop entries older than ``cutoff`` from a time-ordered deque of ``t`` or ``(t, n)``."""
    while events:
        first = events[0]
        stamp = first[0] if isinstance(first, tuple) else first
        if stamp >= cutoff:
            break
        events.popleft()
