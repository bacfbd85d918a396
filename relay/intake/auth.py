"""Checking a login (AUTH PLAIN and LOGIN): counted against the client's failure budget before the
password is checked, verified off the event loop (scrypt is slow on purpose), remembered safely
(:class:`relay.intake.passwords.VerifiedCache`), each failure answered a little later.

The listener speaks the protocol (challenges, base64, replies); this module decides.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
from enum import Enum

from relay.config import Settings
from relay.intake.limits import AuthLimiter
from relay.intake.passwords import VerifiedCache, hash_password, verify_password
from relay.intake.policy import Policy
from relay.text import CONTROL

log = logging.getLogger("relay.listener")


class Login(Enum):
    """What became of one login."""

    #: the password is right
    OK = "ok"
    #: the password is wrong; the client may try again (535 5.7.8)
    FAILED = "failed"
    #: the client is banned, or its failures fill its budget: refused (421 4.7.0) and closed
    REFUSED = "refused"


async def check_login(login: str, password: str, client_ip: str, *, limiter: AuthLimiter, policy: Policy,
                      verified: VerifiedCache, settings: Settings) -> Login:
    """Check one login from ``client_ip`` (logged: the user name, never the password)."""
    # Counted before it is checked: a parallel burst cannot get more passwords checked than the
    # failure budget; the ones over it wait for those checks, then go on (successes) or are
    # refused without a check (failures).
    attempt = await limiter.begin(client_ip)
    if attempt is None:
        log.warning("AUTH refused unchecked: too many failed logins from this client", extra={
            "event": "auth_refused", "user": CONTROL.sub("?", login[:64]), "client_ip": client_ip})
        return Login.REFUSED
    try:
        ok = await _check_password(login, password, policy, verified, settings)
    except BaseException:
        limiter.fail(attempt)  # a check cut short (client gone) still counts
        raise
    if ok:
        limiter.succeed(attempt)
        # DEBUG: every message's "received" line already names the user; failures stay WARNING.
        log.debug("client authenticated", extra={"event": "auth_ok", "user": login, "client_ip": client_ip})
        return Login.OK
    failures = limiter.fail(attempt)
    log.warning("client authentication failed", extra={
        "event": "auth_failed", "user": CONTROL.sub("?", login[:64]), "client_ip": client_ip,
        "failures": failures})
    cfg = settings.limits.auth_failures
    delay = min(cfg.delay * failures, cfg.max_delay)
    if delay > 0:
        await asyncio.sleep(delay)  # tarpit: slows password guessing, not a synchronisation
    return Login.REFUSED if limiter.banned(client_ip) else Login.FAILED


async def _check_password(login: str, password: str, policy: Policy, verified: VerifiedCache,
                          settings: Settings) -> bool:
    user = policy.user(login)
    if user is None:
        # Same cost as a known user with a wrong password: the answer time does not tell a
        # guesser which user names exist. The dummy hash is made (once) in the thread too: scrypt
        # is slow on purpose and must not stall the event loop.
        await asyncio.to_thread(lambda: verify_password(password, _dummy_hash(settings)))
        return False
    if verified.hit(user.name, user.password_hash, password):
        return True
    ok = await asyncio.to_thread(verify_password, password, user.password_hash)
    if ok:
        verified.add(user.name, user.password_hash, password)
    return ok


_DUMMY_HASHES: dict[tuple[str, ...], str] = {}


def _dummy_hash(settings: Settings) -> str:
    """A hash with the same parameters as the configured users' (so verifying it costs the same)."""
    params: tuple[str, ...] = ("15", "8", "1")
    for user in settings.users:
        parts = user.password_hash.split("$")
        if parts[0] == "scrypt" and len(parts) == 6:
            params = tuple(parts[1:4])
            break
    if params not in _DUMMY_HASHES:
        try:
            log_n, r, p = (int(x) for x in params)
            _DUMMY_HASHES[params] = hash_password(secrets.token_hex(16), log_n=log_n, r=r, p=p)
        except (ValueError, OverflowError, MemoryError):
            _DUMMY_HASHES[params] = hash_password(secrets.token_hex(16))
    return _DUMMY_HASHES[params]


def decode_answer(text: str) -> bytes | None:
    """A client's base64 AUTH answer, decoded; None when it is not base64."""
    if text == "=":  # RFC 4954: an empty initial response
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None

