"""What one client may take: connections (in all and per address), the length of a session, and
AUTH failures before it is banned. Counted per client, all of loopback as one (:data:`LOOPBACK_KEY`).

The listener (:mod:`relay.intake.listener`) asks before it serves a connection and before it
checks a password; the replies it then sends are in :mod:`relay.intake.replies`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from relay.config import LimitSettings, is_loopback_host
from relay.intake import replies as R

log = logging.getLogger("relay.listener")

#: The key every loopback client shares: one local process could otherwise pick any of the 16 million
#: source addresses of 127.0.0.0/8 (and ::1, ::ffff:127.x) to get a fresh count each time.
LOOPBACK_KEY = "loopback"


def ban_key(address: str) -> str:
    """What failures and bans are counted against: all of loopback as one client, an IPv4 address,
    or the /64 of an IPv6 one (a single host is usually given a whole /64, so banning one address of
    it would only make the attacker pick the next)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if is_loopback_host(address):
        return LOOPBACK_KEY
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return address


def slot_key(address: str) -> str:
    """What ``limits.max_connections_per_address`` counts: an address, with all of loopback as one."""
    return LOOPBACK_KEY if is_loopback_host(address) else address


@dataclass(eq=False)
class AuthAttempt:
    """One AUTH being verified: it holds a slot of its client's failure budget until it is settled."""

    key: str
    at: float
    failed: bool = False


class AuthLimiter:
    """Counts AUTH failures per client (:func:`ban_key`: all of loopback is one client, IPv6 by /64);
    ``max_failures`` failures within ``window`` seconds ban the client for ``ban`` seconds (421 4.7.0
    at connect and at AUTH).

    An attempt is counted *before* its password is checked (:meth:`begin` reserves a slot of the
    budget): attempts still being verified hold a slot, so a parallel burst gets at most
    ``max_failures`` passwords checked per window; the rest wait for those to settle and are refused
    unchecked once failures fill the budget (or go on when successes give slots back). A successful login
    gives back only its own slot: it never clears earlier failures, whoever logged in (another user's
    success, or the guessed user's own app logging in between guesses, must not reset a guesser's count).

    Memory is bounded: at most ``max_tracked`` clients are remembered (the oldest are forgotten first),
    so a client cycling through many source addresses cannot grow it without limit.
    """

    def __init__(self, max_failures: int, window: float, ban: float,
                 clock: Callable[[], float] = time.monotonic, *, max_tracked: int = 10000,
                 on_failure: Callable[[], None] | None = None) -> None:
        self.max_failures = max_failures
        #: told of every failed login (the relay_client_auth_failures metric)
        self.on_failure = on_failure
        self.window = window
        self.ban = ban
        self.max_tracked = max_tracked
        self._clock = clock
        self._failures: OrderedDict[str, deque[AuthAttempt]] = OrderedDict()
        self._banned_until: OrderedDict[str, float] = OrderedDict()
        self._settle: asyncio.Event | None = None
        #: AUTHs waiting for a check of their client to settle
        self.waiting = 0

    def banned(self, address: str) -> bool:
        return self._banned(ban_key(address))

    def _banned(self, key: str) -> bool:
        until = self._banned_until.get(key)
        if until is None:
            return False
        if self._clock() >= until:
            del self._banned_until[key]
            self._failures.pop(key, None)
            return False
        return True

    def _counted(self, key: str) -> deque[AuthAttempt]:
        """The client's attempts in the window (failures and ones being verified), most recent last."""
        now = self._clock()
        q = self._failures.pop(key, None) or deque()
        self._failures[key] = q
        while q and q[0].at < now - self.window:
            q.popleft()
        while len(self._failures) > self.max_tracked:
            self._failures.popitem(last=False)
        return q

    async def begin(self, address: str) -> AuthAttempt | None:
        """Reserve a slot of the client's budget for one password check. None: refuse without
        checking (the client is banned, or its failures alone fill the budget). While checks still
        running fill the budget, wait for one of them to settle: a success gives its slot back (ten
        apps logging in at once all get in), a failure keeps it (a burst of guesses is refused)."""
        key = ban_key(address)
        while True:
            if self._banned(key):
                return None
            q = self._counted(key)
            if len(q) < self.max_failures:
                attempt = AuthAttempt(key, self._clock())
                q.append(attempt)
                return attempt
            if all(a.failed for a in q):
                return None
            self.waiting += 1
            try:
                await self._settled().wait()
            finally:
                self.waiting -= 1

    def _settled(self) -> asyncio.Event:
        if self._settle is None:
            self._settle = asyncio.Event()
        return self._settle

    def _notify(self) -> None:
        if self._settle is not None:
            self._settle.set()
            self._settle = None

    def fail(self, attempt: AuthAttempt) -> int:
        """The checked password was wrong: its slot stays taken. Returns the client's failures in
        the window; ``max_failures`` of them ban it (checks still running do not ban, they only
        hold their slot)."""
        attempt.failed = True
        if self.on_failure is not None:
            self.on_failure()
        q = self._counted(attempt.key)
        if attempt not in q:  # forgotten meanwhile (window over, or memory bound): count it again
            q.append(AuthAttempt(attempt.key, self._clock(), failed=True))
        failures = sum(a.failed for a in q)
        if failures >= self.max_failures and attempt.key not in self._banned_until:
            self._banned_until[attempt.key] = self._clock() + self.ban
            log.warning("client refused after repeated AUTH failures",
                        extra={"event": "auth_banned", "client_ip": attempt.key, "failures": failures,
                               "ban_seconds": self.ban})
            while len(self._banned_until) > self.max_tracked:
                self._banned_until.popitem(last=False)
        self._notify()
        return failures

    def succeed(self, attempt: AuthAttempt) -> None:
        """The checked password was right: its own slot is given back, earlier failures stay."""
        q = self._failures.get(attempt.key)
        if q is not None and attempt in q:
            q.remove(attempt)
        self._notify()

    def failed(self, address: str) -> int:
        """Record a failure without a reservation (an attempt settled at once)."""
        attempt = AuthAttempt(ban_key(address), self._clock())
        self._counted(attempt.key).append(attempt)
        return self.fail(attempt)


class Connections:
    """The connections open now, in all and per address (:func:`slot_key`): what
    ``limits.max_connections`` and ``limits.max_connections_per_address`` count."""

    def __init__(self) -> None:
        self.open = 0
        self.per_address: dict[str, int] = defaultdict(int)

    def admit(self, ip: str, limits: LimitSettings, ends: float) -> Admitted | str:
        """Count a new connection from ``ip``, or the reply that refuses it (logged) when a limit is
        reached. ``ends``: when its session is over (``limits.max_session`` from now)."""
        if self.open >= limits.max_connections:
            log.warning("connection refused: too many connections",
                        extra={"event": "connection_limit", "client_ip": ip, "limit": limits.max_connections})
            return R.TOO_MANY_CONNECTIONS
        slot = slot_key(ip)
        if self.per_address[slot] >= limits.max_connections_per_address:
            log.warning("connection refused: too many connections from one address",
                        extra={"event": "connection_limit", "client_ip": ip,
                               "limit": limits.max_connections_per_address})
            return R.TOO_MANY_FROM_ADDRESS
        self.open += 1
        self.per_address[slot] += 1
        return Admitted(self, slot, ends)

    def release(self, slot: str) -> None:
        self.open -= 1
        self.per_address[slot] -= 1
        if self.per_address[slot] <= 0:
            del self.per_address[slot]


@dataclass(eq=False)
class Admitted:
    """One connection within the limits: its place in the counts and its session's end. Past
    ``ends`` every command but QUIT is refused; ``hard_stop`` (``limits.data_timeout`` later) closes
    the connection whatever the client is doing."""

    connections: Connections
    slot: str
    #: the listener's clock (``ListenerState.clock``) when the session is over
    ends: float
    hard_stop: asyncio.TimerHandle | None = None
    released: bool = field(default=False, init=False)

    def release(self) -> None:
        """The connection is over: give its place back (once, however often it is called)."""
        if self.hard_stop is not None:
            self.hard_stop.cancel()
            self.hard_stop = None
        if not self.released:
            self.released = True
            self.connections.release(self.slot)
