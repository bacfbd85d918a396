"""A simulated Microsoft Graph ``sendMail`` endpoint (MIME flavour) over HTTPS on loopback.

It serves exactly what the relay's Graph transport uses: ``POST /v1.0/users/{mailbox}/sendMail``
with ``Content-Type: text/plain`` and the base64 of the raw MIME message. What it checks, in the
order Graph does (as far as the public documentation and reported behaviour tell; the error codes
marked *unverified* in docs/graph.md are plausible, not confirmed):

1. the request size: more than :data:`GRAPH_REQUEST_LIMIT` bytes -> ``413`` (Graph: 4 MB per request);
2. the bearer token: signature (the Entra simulator's key), audience ``https://graph.microsoft.com``,
   tenant, lifetime -> ``401 InvalidAuthenticationToken``;
3. the ``Mail.Send`` application role -> ``403 ErrorAccessDenied``;
4. the mailbox exists in the token's tenant -> ``404 ErrorInvalidUser``; an application access policy
   (:meth:`GraphSimulator.restrict`) that leaves it out -> ``403 ErrorAccessDenied``;
5. injected faults (:meth:`GraphSimulator.fail_next`: ``429`` with ``Retry-After``, ``503``...);
6. ``Content-Type: text/plain`` and a valid base64 body -> ``400 ErrorMimeContentInvalidBase64String``;
7. recipients, rebuilt from the ``To``/``Cc``/``Bcc`` headers as Graph does (there is no envelope)
   -> ``400 ErrorInvalidRecipients`` when there are none;
8. the ``From`` header: the mailbox itself or an address the app holds SendAs on -> ``403 ErrorSendAsDenied``.

Accepted messages answer ``202 Accepted`` with an empty body, are kept in memory
(:attr:`GraphSimulator.accepted`) and written to ``graph-out/`` (``.eml`` + ``.json``).
"""

from __future__ import annotations

import base64
import binascii
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
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.testing.certs import ServerCertificates
from relay.testing.entra import GRAPH_RESOURCE
from relay.testing.https import ServerThread, TLSHTTPServer

log = logging.getLogger(__name__)

MAIL_SEND = "Mail.Send"
"""The Microsoft Graph application permission sendMail requires for app-only tokens."""
GRAPH_REQUEST_LIMIT = 4 * 1024 * 1024
"""Bytes of request body Graph takes in one request (4 MB); a bigger body gets 413."""
TOKEN_CLOCK_SKEW = 300

#: (tenant of the mailbox or None, client IDs holding SendAs on it) for an address.
Directory = Callable[[str], tuple[str | None, frozenset[str]]]


@dataclass(frozen=True)
class GraphMessage:
    """A message Graph answered 202 to."""

    seq: int
    request_id: str
    mailbox: str
    client_id: str
    tenant_id: str
    accepted_at: float
    to: tuple[str, ...]
    cc: tuple[str, ...]
    bcc: tuple[str, ...]
    size: int
    sha256: str
    mime: bytes = field(repr=False)
    eml_path: Path

    @property
    def recipients(self) -> tuple[str, ...]:
        """Everyone Graph delivers to: To, Cc and Bcc, lower case, in that order."""
        return (*self.to, *self.cc, *self.bcc)


@dataclass(frozen=True)
class GraphRequest:
    """One request as the simulator saw it (never the token or the body)."""

    at: float
    method: str
    path: str
    status: int
    code: str = ""
    mailbox: str | None = None
    client_id: str | None = None
    size: int = 0


@dataclass
class _Fault:
    status: int
    code: str
    message: str
    retry_after: int | None
    remaining: int


@dataclass(frozen=True)
class _Answer:
    status: int
    body: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


class GraphError(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class GraphSimulator:
    """Microsoft Graph's ``sendMail`` on ``https://localhost:PORT``. Public methods are thread-safe."""

    def __init__(
        self,
        certs: ServerCertificates,
        outdir: Path,
        *,
        token_key: rsa.RSAPublicKey,
        directory: Directory,
        clock: Callable[[], float] = time.time,
        seed: int = 0,
        request_limit: int = GRAPH_REQUEST_LIMIT,
    ) -> None:
        self._certs = certs
        self.outdir = outdir
        self._token_key = token_key
        self._directory = directory
        self._clock = clock
        self._random = random.Random(f"graph-{seed}")
        self.request_limit = request_limit
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._faults: list[_Fault] = []
        self._policies: dict[str, set[str]] = {}
        self._accepted: list[GraphMessage] = []
        self._log: list[GraphRequest] = []
        self._seq = 0
        self._service = ServerThread("graph-sim", self._make_server)

    # -- lifecycle ---------------------------------------------------------------------------

    def _make_server(self, port: int) -> _GraphHTTPServer:
        self.outdir.mkdir(parents=True, exist_ok=True)
        return _GraphHTTPServer(("127.0.0.1", port), self, self._certs.server_context())

    def start(self) -> None:
        self._service.start()

    def stop(self) -> None:
        self._service.stop()

    @property
    def port(self) -> int:
        return self._service.port

    @property
    def host(self) -> str:
        """``https://localhost:PORT``: what the relay's ``apps[].graph_host`` points at."""
        return f"https://localhost:{self._service.port}"

    # -- switches ----------------------------------------------------------------------------

    def fail_next(self, status: int, code: str = "", message: str = "", *, retry_after: int | None = None,
                  times: int = 1) -> None:
        """Answer the next ``times`` authorised sendMail requests with this error."""
        defaults = {
            429: ("ApplicationThrottled", "Application is over its MailboxConcurrency limit."),
            503: ("ServiceUnavailable", "Service is unavailable. Try again later."),
            500: ("InternalServerError", "An internal server error occurred."),
            504: ("GatewayTimeout", "The gateway did not receive a timely response."),
        }
        d_code, d_message = defaults.get(status, ("UnknownError", "Simulated failure."))
        with self._lock:
            self._faults.append(_Fault(status, code or d_code, message or d_message, retry_after, times))

    def throttle(self, retry_after: int, *, times: int = 1) -> None:
        """429 with ``Retry-After: <seconds>`` (Graph's per app+mailbox throttling)."""
        self.fail_next(429, retry_after=retry_after, times=times)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def restrict(self, client_id: str, mailboxes: set[str] | None) -> None:
        """``New-ApplicationAccessPolicy -AccessRight RestrictAccess``: the app may only use these
        mailboxes (None removes the policy)."""
        with self._lock:
            if mailboxes is None:
                self._policies.pop(client_id, None)
            else:
                self._policies[client_id] = {m.lower() for m in mailboxes}

    # -- what happened -----------------------------------------------------------------------

    @property
    def accepted(self) -> list[GraphMessage]:
        with self._lock:
            return list(self._accepted)

    @property
    def requests(self) -> list[GraphRequest]:
        with self._lock:
            return list(self._log)

    def wait_for_messages(self, count: int, timeout: float = 5.0) -> list[GraphMessage]:
        """Bounded wait until ``count`` messages were accepted; returns them (raises on timeout)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(self._accepted) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{len(self._accepted)} of {count} Graph messages after {timeout}s")
                self._changed.wait(left)
            return list(self._accepted)

    # -- request handling (handler threads) --------------------------------------------------

    def handle(self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes,
               declared_length: int) -> _Answer:
        path = urlsplit(raw_path).path
        request_id = str(uuid.UUID(int=self._random.getrandbits(128), version=4))
        record = {"at": self._clock(), "method": method, "path": path, "size": declared_length}
        try:
            mailbox, client_id, tenant_id = self._authorise(method, path, headers, declared_length, record)
            message = self._accept(mailbox, client_id, tenant_id, headers, body, request_id)
        except GraphError as err:
            self._record(_request(record, err.status, err.code))
            return self._error(err, request_id, headers)
        self._record(_request(record, 202))
        log.debug("graph-sim: accepted %s for %s", message.request_id, message.mailbox)
        return _Answer(202, None, {"request-id": request_id, **_client_request_id(headers)})

    def _authorise(self, method: str, path: str, headers: Mapping[str, str], length: int,
                   record: dict[str, Any]) -> tuple[str, str, str]:
        parts = [unquote(p) for p in path.split("/") if p]
        if method != "POST" or len(parts) != 4 or parts[0] != "v1.0" or parts[1] != "users" \
                or parts[3].lower() != "sendmail":
            raise GraphError(404, "UnknownError", f"No route for {method} {path} in this simulator.")
        mailbox = parts[2].lower()
        record["mailbox"] = mailbox
        if length > self.request_limit:
            raise GraphError(413, "RequestEntityTooLarge",
                             f"The maximum request length supported is 4MB ({length} bytes sent).")
        claims = self._verify(headers.get("authorization", ""))
        client_id = str(claims.get("appid", ""))
        tenant_id = str(claims.get("tid", ""))
        record["client_id"] = client_id
        if MAIL_SEND not in (claims.get("roles") or []):
            raise GraphError(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
        owner, _ = self._directory(mailbox)
        if owner != tenant_id:
            raise GraphError(404, "ErrorInvalidUser", f"The requested user '{mailbox}' is invalid.")
        with self._lock:
            allowed = self._policies.get(client_id)
            fault = self._take_fault()
        if allowed is not None and mailbox not in allowed:
            raise GraphError(403, "ErrorAccessDenied",
                             "Access to OData is disabled: [RAOP] : Blocked by tenant configured AppOnly "
                             "AccessPolicy settings.")
        if fault is not None:
            raise GraphError(fault.status, fault.code, fault.message, fault.retry_after)
        return mailbox, client_id, tenant_id

    def _verify(self, authorization: str) -> dict[str, Any]:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise GraphError(401, "InvalidAuthenticationToken", "Access token is empty.")
        try:
            claims: dict[str, Any] = jwt.decode(
                token.strip(), self._token_key, algorithms=["RS256"],
                options={"verify_aud": False, "verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except jwt.PyJWTError:
            raise GraphError(401, "InvalidAuthenticationToken", "Access token validation failure.") from None
        if str(claims.get("aud", "")).rstrip("/").lower() != GRAPH_RESOURCE:
            raise GraphError(401, "InvalidAuthenticationToken", "Access token validation failure. Invalid audience.")
        tid = claims.get("tid")
        if claims.get("iss") != f"https://sts.windows.net/{tid}/":
            raise GraphError(401, "InvalidAuthenticationToken", "Access token validation failure. Invalid issuer.")
        now = self._clock()
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or exp <= now - TOKEN_CLOCK_SKEW:
            raise GraphError(401, "InvalidAuthenticationToken", "Lifetime validation failed, the token is expired.")
        return claims

    def _take_fault(self) -> _Fault | None:
        if not self._faults:
            return None
        fault = self._faults[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            self._faults.pop(0)
        return fault

    def _accept(self, mailbox: str, client_id: str, tenant_id: str, headers: Mapping[str, str], body: bytes,
                request_id: str) -> GraphMessage:
        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != "text/plain":
            raise GraphError(400, "BadRequest",
                             f"Content-Type {content_type or '(none)'} is not supported: text/plain for MIME.")
        try:
            mime = base64.b64decode(b"".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            raise GraphError(400, "ErrorMimeContentInvalidBase64String",
                             "Invalid base64 string for MIME content.") from None
        if not mime:
            raise GraphError(400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content.")
        parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(mime)
        to, cc, bcc = (_addresses(parsed.get_all(name, [])) for name in ("To", "Cc", "Bcc"))
        if not (to or cc or bcc) or any("@" not in a for a in (*to, *cc, *bcc)):
            raise GraphError(400, "ErrorInvalidRecipients",
                             "At least one recipient is not valid., A message can't be sent because it contains "
                             "no recipients.")
        for sender in _addresses(parsed.get_all("From", [])):
            if sender == mailbox:
                continue
            owner, send_as = self._directory(sender)
            if owner != tenant_id or client_id not in send_as:
                raise GraphError(403, "ErrorSendAsDenied",
                                 "The user account which was used to submit this request does not have the "
                                 "right to send mail on behalf of the specified sending account.")
        with self._changed:
            self._seq += 1
            stem = f"{self._seq:06d}-{request_id}"
            message = GraphMessage(
                seq=self._seq, request_id=request_id, mailbox=mailbox, client_id=client_id, tenant_id=tenant_id,
                accepted_at=self._clock(), to=to, cc=cc, bcc=bcc, size=len(mime),
                sha256=hashlib.sha256(mime).hexdigest(), mime=mime, eml_path=self.outdir / f"{stem}.eml",
            )
            message.eml_path.write_bytes(mime)
            meta = {k: v for k, v in asdict(message).items() if k not in ("mime", "eml_path")}
            (self.outdir / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
            self._accepted.append(message)
            self._changed.notify_all()
        return message

    def _record(self, record: GraphRequest) -> None:
        with self._lock:
            self._log.append(record)

    def _error(self, err: GraphError, request_id: str, headers: Mapping[str, str]) -> _Answer:
        stamp = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        body = {"error": {"code": err.code, "message": err.message,
                          "innerError": {"date": stamp, "request-id": request_id,
                                         **{k: v for k, v in _client_request_id(headers).items()}}}}
        out = {"request-id": request_id, **_client_request_id(headers)}
        if err.retry_after is not None:
            out["Retry-After"] = str(err.retry_after)
        return _Answer(err.status, body, out)


def _request(record: Mapping[str, Any], status: int, code: str = "") -> GraphRequest:
    return GraphRequest(at=float(record["at"]), method=str(record["method"]), path=str(record["path"]),
                        status=status, code=code, mailbox=record.get("mailbox"),
                        client_id=record.get("client_id"), size=int(record.get("size", 0)))


def _addresses(values: list[Any]) -> tuple[str, ...]:
    return tuple(addr.lower() for _, addr in email.utils.getaddresses([str(v) for v in values]) if addr)


def _client_request_id(headers: Mapping[str, str]) -> dict[str, str]:
    value = headers.get("client-request-id")
    return {"client-request-id": value} if value else {}


# ---------------------------------------------------------------------------------------------
# HTTPS plumbing (TLS handshake in the handler thread, one request per connection)
# ---------------------------------------------------------------------------------------------


class _GraphHTTPServer(TLSHTTPServer):
    def __init__(self, address: tuple[str, int], sim: GraphSimulator, context: ssl.SSLContext) -> None:
        self.sim = sim
        super().__init__(address, _Handler, context, name="graph-sim", timeout=30)


class _Handler(BaseHTTPRequestHandler):
    server: _GraphHTTPServer
    server_version = "Microsoft-IIS/10.0"
    sys_version = ""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        # Read (and for an oversized request, drain) the body: a server that answers 413 and closes
        # while the client still writes makes the client see a reset instead of the answer.
        body = bytearray()
        left = length
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
            if len(body) <= self.server.sim.request_limit:
                body += chunk
        self._answer("POST", bytes(body), length)

    def do_GET(self) -> None:
        self._answer("GET", b"", 0)

    def _answer(self, method: str, body: bytes, length: int) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        answer = self.server.sim.handle(method, self.path, headers, body, length)
        payload = json.dumps(answer.body).encode() if answer.body is not None else b""
        self.send_response(answer.status)
        if payload:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if payload:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("graph-sim: " + format, *args)
