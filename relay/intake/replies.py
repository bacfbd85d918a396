"""The replies the relay writes to its clients on its own, named; and the sanitiser every reply passes.

Each text exists once, here: the listener (commands, AUTH, limits) and the DATA reader import it.
Refusals decided by policy (:class:`relay.intake.policy.Refusal`) and the delivery's answers after DATA are
built where those decisions are made. Every refusal carries an enhanced status code (RFC 3463) and
no reply ever carries a Python exception text; :func:`normalise_reply` adds the code to aiosmtpd's
own replies and bounds whatever is written.
"""

from __future__ import annotations

import re

from relay.text import CONTROL

# -- transient trouble of our own: no internals, the client tries again
INTERNAL_ERROR = "451 4.3.0 Local error in processing, try again later"
SPOOL_FULL = "452 4.3.1 Insufficient system storage, try again later"
SPOOL_ERROR = "451 4.3.0 Local error storing the message, try again later"

# -- connection and session limits
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
TOO_MANY_FROM_ADDRESS = "421 4.7.0 Too many connections from your address, try again later"
BANNED = "421 4.7.0 Too many failed logins from your address, try later"
IDLE_TIMEOUT = "421 4.4.2 Idle timeout, closing connection"
SESSION_TOO_LONG = "421 4.4.2 Session time limit reached, closing connection"

# -- AUTH
AUTH_REQUIRED = "530 5.7.0 Authentication required"
AUTH_NOT_AVAILABLE = "503 5.5.1 AUTH not available"
ENCRYPTION_REQUIRED = "538 5.7.11 Encryption required for requested authentication mechanism"
AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication exchange line is too long"
AUTH_ABORTED = "501 5.7.0 Authentication aborted"
BAD_BASE64 = "501 5.5.2 Cannot decode base64"
BAD_AUTH_PLAIN = "501 5.5.2 Cannot split AUTH PLAIN value"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"

# -- the transaction
SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
RESET_OK = "250 2.0.0 OK"
#: RFC 6531 3.7.4.1: a non-ASCII address in a transaction whose MAIL did not say SMTPUTF8. Refused at
#: once: accepted, it could never be delivered (Exchange refuses it the same way, on every retry).
NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter on MAIL FROM"
NEED_RCPT = "503 5.5.1 Error: need RCPT command"
DATA_SYNTAX = "501 5.5.4 Syntax: DATA"
START_DATA = "354 3.0.0 End data with <CR><LF>.<CR><LF>"


def relaying_denied(client_ip: str) -> str:
    return f"550 5.7.1 Relaying denied: {client_ip} may not send through this relay"


def too_many_recipients(limit: int) -> str:
    return f"452 4.5.3 Too many recipients (at most {limit})"


def too_big_for_graph(mailbox: str, limit: int) -> str:
    return f"552 5.3.4 Message size exceeds the Microsoft Graph limit of mailbox {mailbox} ({limit} bytes)"


def line_too_long(limit: int) -> str:
    return f"500 5.5.2 Line too long (at most {limit} bytes)"


def message_too_big(limit: int) -> str:
    return f"552 5.3.4 Message size exceeds fixed maximum message size ({limit} bytes)"


def header_too_big(limit: int) -> str:
    return f"552 5.3.4 Message header too large (at most {limit} bytes)"


#: Enhanced status codes (RFC 3463) for replies aiosmtpd writes without one, by reply code.
_ENHANCED_BY_CODE = {
    "421": "4.3.0", "450": "4.2.0", "451": "4.3.0", "452": "4.3.1", "454": "4.7.0",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "530": "5.7.0", "535": "5.7.8", "538": "5.7.11", "550": "5.0.0", "552": "5.3.4", "553": "5.1.3",
    "554": "5.7.0", "555": "5.5.4",
}
#: 2xx replies of aiosmtpd worth an enhanced code (EHLO lines and the greeting take none).
_ENHANCED_2XX = {"250 OK": "250 2.0.0 OK", "221 Bye": "221 2.0.0 Bye"}
_HAS_ENHANCED = re.compile(r"^[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_MAX_REPLY = 512


def normalise_reply(status: str) -> str:
    """Every 4xx/5xx single-line reply gets an enhanced status code; no control characters (a client
    cannot make us echo a CR or LF into a reply); a bounded length; aiosmtpd's "Error: " prefix goes."""
    status = CONTROL.sub("?", status)[:_MAX_REPLY]
    if status in _ENHANCED_2XX:
        return _ENHANCED_2XX[status]
    code, sep, text = status[:3], status[3:4], status[4:]
    if sep != " " or code not in _ENHANCED_BY_CODE or _HAS_ENHANCED.match(status):
        return status
    text = text.removeprefix("Error: ")
    text = text[:1].upper() + text[1:]
    return f"{code} {_ENHANCED_BY_CODE[code]} {text}".rstrip()
