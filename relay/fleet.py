"""The fleet coordination client: several relays share each mailbox's Exchange limits through Redis.

Exchange Online's limits are per mailbox, not per relay: 3 concurrent sessions, 30 submissions a
minute, 10,000 recipients a day. With ``fleet:`` configured, every relay sending as a mailbox asks
Redis before it opens a session or submits a message; each decision is one Lua script, so it is
atomic in Redis and no two relays can both take the last slot.

Keys (``P`` is ``fleet.key_prefix``, ``m`` a mailbox in lower case)::

    P slots:m        ZSET  lease id -> lease expiry (ms)      session slots (leases renewed while open)
    P rate:m         ZSET  submission id -> start/end (ms)     submissions in the last 61 s
    P rcpt:m         HASH  minute number -> recipients         recipients in the last 24 h
    P block:S:N      HASH  kind, reason, reply, hint, ...      a hold or pause of app/mailbox N (S: scope)
    P probe:S:N      STR   instance id, with a TTL             the one relay probing a held N
    P instance:I     STR   JSON heartbeat, with a TTL          relay I is alive
    P instances      ZSET  instance id -> last heartbeat (ms)  who has been seen (for ``fleet status``)
    P mailboxes      SET   mailbox                              mailboxes the fleet has paced
    P want:m         STR   instance id, 2 s TTL                a relay waits for a slot: close idle sessions
    P epoch          STR   ms                                   when the slot registry became complete

Only counters, lease ids, instance ids and the classifier's reply texts are stored: no token, no
secret, no message, no recipient address. Time comes from Redis (``TIME``) inside the scripts, so the
relays' clocks do not have to agree.

Redis trouble never stops mail: every call has a deadline (``fleet.deadline``); a failure switches
this relay to its fallback share (``fleet.fallback``), logs it once, and a background loop rejoins
when Redis answers again. While disconnected no call waits for Redis at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from relay.config import FleetSettings

if TYPE_CHECKING:
    import redis.asyncio as aioredis

# redis is imported when a fleet is configured, not by every relay (about 6 MB of memory at start).

log = logging.getLogger("relay.fleet")

#: The pacing window, as in relay.delivery.pacing.PACING_WINDOW (Exchange's minute plus a second of margin).
RATE_WINDOW_MS = 61_000
DAY_MS = 86_400_000
#: A hold written to Redis lives this long unless a probe refreshes or lifts it (a relay that found
#: it may die; the hold must not outlive everyone who knows about it by much).
HOLD_TTL_MS = 24 * 3_600_000
#: How long to wait before asking again for a session slot when the fleet has none free.
SLOT_RETRY = 0.5
#: A start waits this long for a slot in place (asking every SLOT_POLL) before it goes back to the queue.
SLOT_WAIT = 1.0
SLOT_POLL = 0.05

# Returns 1 (a slot leased), 0 (none free) or 2: leased, but the registry is not complete yet (a new
# or restarted Redis: not every relay has written its leases again), so this relay keeps to its
# fallback share (ARGV[5] sessions of its own, ARGV[6] its instance id) until it is.
_SLOT_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local epoch = redis.call('GET', KEYS[3])
local forming = (not epoch) or now < tonumber(epoch)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('ZCARD', KEYS[1]) >= limit then
    redis.call('SET', KEYS[4], ARGV[6], 'PX', 2000)  -- someone waits: idle sessions give their slot back
    return 0
  end
  if forming then
    local own = 0
    local mine = ARGV[6] .. '/'
    for _, lease in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
      if string.sub(lease, 1, #mine) == mine then own = own + 1 end
    end
    if own >= tonumber(ARGV[5]) then return 0 end
  end
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
redis.call('SADD', KEYS[2], ARGV[4])
if forming then return 2 end
return 1
"""

# Renews the leases of sessions this relay has open. A lease that expired (Redis was away, or
# restarted empty) is written again: the session exists, and the registry should say so.
_SLOT_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl * 2)
end
return #KEYS
"""

# The registry's epoch: the time from which every live relay has written its leases. Missing (a new
# or restarted Redis): it starts now and is complete one grace period later. Returns the ms left.
_EPOCH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = now + tonumber(ARGV[1])
  redis.call('SET', KEYS[1], epoch)
end
return math.max(tonumber(epoch) - now, 0)
"""

# A submission starts: at most ARGV[2] in the window, at most ARGV[5] recipients a day.
# Returns {1, 0, ''} or {0, ms to wait, why}.
_RATE_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local per_minute = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local budget = tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if per_minute > 0 and redis.call('ZCARD', KEYS[1]) >= per_minute then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, tonumber(oldest[2]) + window - now, 'per_minute'}
end
local minute = math.floor(now / 60000)
if budget > 0 then
  local flat = redis.call('HGETALL', KEYS[2])
  local used = 0
  local buckets = {}
  for i = 1, #flat, 2 do
    local m, c = tonumber(flat[i]), tonumber(flat[i + 1])
    if m <= minute - 1440 then
      redis.call('HDEL', KEYS[2], flat[i])
    else
      used = used + c
      table.insert(buckets, {m, c})
    end
  end
  if used > 0 and used + n > budget then
    table.sort(buckets, function(a, b) return a[1] < b[1] end)
    local left = used
    for _, b in ipairs(buckets) do
      left = left - b[2]
      if left + n <= budget then
        return {0, (b[1] + 1441) * 60000 - now, 'recipients_per_day'}
      end
    end
    return {0, DAY, 'recipients_per_day'}
  end
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], window * 2)
if n > 0 then
  redis.call('HINCRBY', KEYS[2], minute, n)
  redis.call('PEXPIRE', KEYS[2], DAY + 120000)
end
redis.call('SADD', KEYS[3], ARGV[6])
return {1, minute, ''}
""".replace("DAY", str(DAY_MS))

# A submission ended: its minute counts from now (Exchange counts at acceptance, which lies between
# our start and our end).
_RATE_DONE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return 1
"""

# A submission that never reached Exchange (no session slot after all): give back its place.
_RATE_CANCEL = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 and tonumber(ARGV[2]) > 0 then
  local rest = redis.call('HINCRBY', KEYS[2], ARGV[3], -tonumber(ARGV[2]))
  if rest <= 0 then redis.call('HDEL', KEYS[2], ARGV[3]) end
end
return 1
"""

# A hold or pause found by one relay, for all. A hold outranks a pause; a pause only grows.
_BLOCK_SET = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local kind = ARGV[1]
local ttl = tonumber(ARGV[6])
local old = redis.call('HGET', KEYS[1], 'kind')
if old == 'hold' and kind == 'pause' then return 0 end
if old == 'pause' and kind == 'pause' and redis.call('PTTL', KEYS[1]) >= ttl then return 0 end
local since = redis.call('HGET', KEYS[1], 'since')
if not since or old ~= kind then since = tostring(now) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'kind', kind, 'reason', ARGV[2], 'reply', ARGV[3], 'hint', ARGV[4],
           'by', ARGV[5], 'since', since, 'until', tostring(now + ttl))
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""


class FleetWait(Exception):
    """The fleet has no room now for this mailbox; ask again in ``seconds``."""

    def __init__(self, seconds: float, reason: str) -> None:
        super().__init__(f"fleet limit {reason}: wait {seconds:.1f} s")
        self.seconds = seconds
        self.reason = reason


@dataclass(frozen=True)
class SharedBlock:
    """A hold or pause as the fleet knows it."""

    kind: str
    scope: str
    name: str
    reason: str
    reply: str
    hint: str
    by: str
    since: float
    until: float


@dataclass
class FleetCounters:
    """Redis round trips made, and the time they took (the benchmark's cost per message)."""

    calls: int = 0
    seconds: float = 0.0
    failures: int = 0


@dataclass
class _Submission:
    id: str
    mailbox: str
    recipients: int
    minute: int = 0
    shared: bool = True


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


Limits = Callable[[str], tuple[int, int]]


class Fleet:
    """One relay's membership of a fleet. ``await start()``, then the delivery path calls
    :meth:`open_session` / :meth:`close_session` (pool) and :meth:`take` / :meth:`done` (pacing)."""

    def __init__(self, settings: FleetSettings, limits: Limits, *, metrics: Any = None,
                 client: aioredis.Redis | None = None) -> None:
        self.settings = settings
        self.instance_id = settings.instance_id or default_instance_id()
        self.prefix = settings.key_prefix
        #: (connections, per_minute) of a mailbox as configured: the fleet-wide limits.
        self.limits = limits
        self.metrics = metrics
        if metrics is not None:
            metrics.enable_fleet()
        from redis.exceptions import RedisError

        #: What a failed Redis call raises (besides FleetUnavailable's causes below).
        self._redis_error: type[Exception] = RedisError
        self.redis = client or _client(settings)
        self.connected = False
        self.counters = FleetCounters()
        self._leases: dict[str, str] = {}  # lease id -> mailbox (sessions this relay has open)
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._aux: set[asyncio.Task[Any]] = set()
        self._lost_logged = False
        self._started_at = time.time()
        #: (monotonic) after losing Redis, no new session before this: the others notice too and trim
        #: to their fallback share first.
        self._settle_until = 0.0
        #: (monotonic) Redis is back but its registry is not complete yet: fallback share until then.
        self._forming_until = 0.0
        #: (monotonic) per mailbox: another relay asked for a session slot and waits, until then.
        self._wanted: dict[str, float] = {}
        self.blocks: dict[tuple[str, str], SharedBlock] = {}
        #: called after each sync with the blocks the fleet holds (the delivery reconciles its own)
        self.on_blocks: Callable[[dict[tuple[str, str], SharedBlock]], None] | None = None
        #: called when this relay loses or regains Redis
        self.on_state: Callable[[bool], None] | None = None
        self._acquire = self.redis.register_script(_SLOT_ACQUIRE)
        self._renew = self.redis.register_script(_SLOT_RENEW)
        self._take = self.redis.register_script(_RATE_TAKE)
        self._done = self.redis.register_script(_RATE_DONE)
        self._cancel = self.redis.register_script(_RATE_CANCEL)
        self._block_set = self.redis.register_script(_BLOCK_SET)
        self._epoch = self.redis.register_script(_EPOCH)
        self.mailboxes: tuple[str, ...] = ()
        self.apps: tuple[str, ...] = ()

    # ------------------------------------------------------------------ keys

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # ------------------------------------------------------------------ calls with a deadline

    async def _call(self, what: str, coro: Awaitable[Any]) -> Any:
        """One Redis round trip within ``fleet.deadline``. Raises FleetUnavailable (and switches to the
        fallback share) on any trouble."""
        started = time.perf_counter()
        self.counters.calls += 1
        try:
            return await asyncio.wait_for(coro, self.settings.deadline)
        except (self._redis_error, OSError, TimeoutError) as exc:
            self.counters.failures += 1
            self._lost(what, exc)
            raise FleetUnavailable(what) from None
        finally:
            spent = time.perf_counter() - started
            self.counters.seconds += spent
            if self.metrics is not None:
                self.metrics.fleet_calls.labels(what).inc()
                self.metrics.fleet_call_seconds.labels(what).inc(spent)

    def _lost(self, what: str, exc: BaseException) -> None:
        if self.connected or not self._lost_logged:
            log.warning("Redis unreachable (or it refused the call): this relay uses its fallback share of "
                        "each mailbox's limits",
                        extra={"event": "fleet_disconnected", "call": what, "error_type": type(exc).__name__,
                               "fallback_connections": self.settings.fallback.connections,
                               "fallback_per_minute": self.settings.fallback.per_minute})
            self._lost_logged = True
        was = self.connected
        if was:
            self._settle_until = time.monotonic() + self.grace
        self.connected = False
        self._gauge()
        if was and self.on_state is not None:
            self.on_state(False)

    def _joined(self) -> None:
        if not self.connected:
            log.info("fleet joined: limits are shared through Redis",
                     extra={"event": "fleet_connected", "instance": self.instance_id})
            self.connected = True
            self._lost_logged = False
            self._gauge()
            if self.on_state is not None:
                self.on_state(True)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.fleet_connected.set(1 if self.connected else 0)

    # ------------------------------------------------------------------ local limits

    @property
    def grace(self) -> float:
        """Long enough for every relay to notice a change (one sync) and act on it."""
        return 2 * self.settings.sync_interval + self.settings.deadline

    @property
    def shared(self) -> bool:
        """Redis answers and its registry is complete: the limits are the fleet's."""
        return self.connected and time.monotonic() >= self._forming_until

    def local_limits(self, configured: tuple[int, int]) -> tuple[int, int]:
        """What this relay may use on its own: all of it while Redis decides (Redis is the limit
        then), the fallback share while Redis is away (or back but not complete yet)."""
        if self.shared:
            return configured
        fb = self.settings.fallback
        per_minute = fb.per_minute if configured[1] <= 0 else min(fb.per_minute or configured[1], configured[1])
        return min(fb.connections, configured[0]), per_minute

    # ------------------------------------------------------------------ session slots

    async def open_session(self, mailbox: str) -> str:
        """A lease on one of the mailbox's session slots, fleet-wide. Raises FleetWait when every
        slot is taken. Disconnected: a local lease (the fallback share limits it)."""
        mailbox = mailbox.lower()
        lease = f"{self.instance_id}/{next(self._ids)}"
        if not self.connected and time.monotonic() < self._settle_until:
            raise FleetWait(self._settle_until - time.monotonic(), "fallback_settling")
        if self.connected:
            connections = self.limits(mailbox)[0]
            give_up = time.monotonic() + SLOT_WAIT
            while True:
                try:
                    got = await self._call("slot", self._acquire(
                        keys=[self.key("slots", mailbox), self.key("mailboxes"), self.key("epoch"),
                              self.key("want", mailbox)],
                        args=[lease, connections, int(self.settings.lease_ttl * 1000), mailbox,
                              self.settings.fallback.connections, self.instance_id]))
                except FleetUnavailable:
                    raise FleetWait(self._settle_until - time.monotonic(), "fallback_settling") from None
                if got or time.monotonic() >= give_up:
                    break
                await asyncio.sleep(SLOT_POLL)  # another relay's session ends soon: it was asked to
            if got == 2:  # Redis is new or restarted empty: the others' leases may not be back yet
                self._forming_until = max(self._forming_until, time.monotonic() + self.grace)
            elif not got:
                self._count_wait(mailbox, "slot")
                raise FleetWait(SLOT_RETRY, "session_slots")
        self._leases[lease] = mailbox
        return lease

    def close_session(self, lease: str | None) -> None:
        """The session is closed: give its slot back (in the background; the lease expires anyway)."""
        if lease is None:
            return
        mailbox = self._leases.pop(lease, None)
        if mailbox is None or not self.connected:
            return
        self._spawn(self._release(mailbox, lease))

    async def _release(self, mailbox: str, lease: str) -> None:
        with contextlib.suppress(FleetUnavailable):
            await self._call("slot_release", self.redis.zrem(self.key("slots", mailbox), lease))

    def wanted(self, mailbox: str) -> bool:
        """Another relay waits for one of this mailbox's session slots: an idle session should close."""
        return time.monotonic() < self._wanted.get(mailbox.lower(), 0.0)

    def session_share(self, configured: int) -> int:
        """How many sessions of a mailbox this relay may keep open: the fleet decides while shared,
        the fallback share otherwise."""
        return configured if self.shared else min(configured, self.settings.fallback.connections)

    def sessions(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for mailbox in self._leases.values():
            out[mailbox] = out.get(mailbox, 0) + 1
        return out

    # ------------------------------------------------------------------ submissions

    async def take(self, mailbox: str, recipients: int) -> _Submission:
        """A place in the mailbox's fleet-wide minute and daily recipient budget. Raises FleetWait."""
        mailbox = mailbox.lower()
        sub = _Submission(f"{self.instance_id}/{next(self._ids)}", mailbox, recipients, shared=False)
        if not self.connected:
            return sub
        per_minute = self.limits(mailbox)[1]
        try:
            ok, wait_ms, why = await self._call("rate", self._take(
                keys=[self.key("rate", mailbox), self.key("rcpt", mailbox), self.key("mailboxes")],
                args=[sub.id, per_minute, RATE_WINDOW_MS, recipients, self.settings.recipients_per_day, mailbox]))
        except FleetUnavailable:
            return sub
        if not ok:
            reason = why.decode() if isinstance(why, bytes) else str(why)
            self._count_wait(mailbox, reason)
            raise FleetWait(max(int(wait_ms), 10) / 1000, reason)
        sub.shared = True
        sub.minute = int(wait_ms)  # on success: the minute (Redis time) the recipients count in
        return sub

    def done(self, sub: _Submission | None) -> None:
        """The submission ended (whatever the outcome): its minute counts from now."""
        if sub is None or not sub.shared or not self.connected:
            return
        self._spawn(self._stamp(sub))

    async def _stamp(self, sub: _Submission) -> None:
        with contextlib.suppress(FleetUnavailable):
            await self._call("rate_done", self._done(keys=[self.key("rate", sub.mailbox)],
                                                     args=[sub.id, RATE_WINDOW_MS]))

    async def cancel(self, sub: _Submission | None) -> None:
        """The submission never reached Exchange: give back its place."""
        if sub is None or not sub.shared or not self.connected:
            return
        with contextlib.suppress(FleetUnavailable):
            await self._call("rate_cancel", self._cancel(
                keys=[self.key("rate", sub.mailbox), self.key("rcpt", sub.mailbox)],
                args=[sub.id, sub.recipients, sub.minute]))

    def _count_wait(self, mailbox: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.fleet_waits.labels(mailbox, reason).inc()

    # ------------------------------------------------------------------ holds, pauses, probes

    def share_block(self, kind: str, scope: str, name: str, reason: str, reply: str, hint: str,
                    seconds: float) -> None:
        """Tell the fleet about a hold or pause this relay found (in the background)."""
        if not self.connected:
            return
        ttl = HOLD_TTL_MS if kind == "hold" else max(int(seconds * 1000), 1)
        self._spawn(self._write_block(kind, scope, name, reason, reply, hint, ttl))

    async def _write_block(self, kind: str, scope: str, name: str, reason: str, reply: str, hint: str,
                           ttl: int) -> None:
        with contextlib.suppress(FleetUnavailable):
            await self._call("block", self._block_set(keys=[self.key("block", scope, name)],
                                                      args=[kind, reason, reply[:500], hint[:500],
                                                            self.instance_id, ttl]))

    async def may_probe(self, scope: str, name: str, seconds: float) -> bool:
        """Exactly one relay probes a held app or mailbox at a time: the one that gets this lease."""
        if not self.connected:
            return True
        try:
            got = await self._call("probe", self.redis.set(self.key("probe", scope, name), self.instance_id,
                                                           nx=True, px=max(int(seconds * 1000), 1000)))
        except FleetUnavailable:
            return True
        return bool(got)

    async def probe_done(self, scope: str, name: str, ok: bool, next_in: float = 0.0) -> None:
        """A probe ended. Success lifts the hold for the whole fleet; a failure keeps the probe lease
        for ``next_in`` seconds, so the fleet probes once per interval, not once per relay."""
        if not self.connected:
            return
        with contextlib.suppress(FleetUnavailable):
            if ok:  # one DEL of both keys: atomic without MULTI
                await self._call("release", self.redis.delete(self.key("block", scope, name),
                                                              self.key("probe", scope, name)))
            elif next_in > 0:
                await self._call("probe_end", self.redis.set(self.key("probe", scope, name), self.instance_id,
                                                             px=max(int(next_in * 1000), 1)))
            else:
                await self._call("probe_end", self.redis.delete(self.key("probe", scope, name)))

    def lift(self, scope: str, name: str) -> None:
        """Lift a hold or pause fleet-wide (an admin released it here)."""
        if self.connected:
            self._spawn(self.probe_done(scope, name, True))

    # ------------------------------------------------------------------ the sync loop

    async def start(self, mailboxes: Iterable[str], apps: Iterable[str]) -> None:
        """Join (or start disconnected: mail flows on the fallback share) and run the sync loop."""
        self.mailboxes = tuple(m.lower() for m in mailboxes)
        self.apps = tuple(apps)
        self._gauge()
        await self.sync()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="fleet-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=self.settings.deadline * 2)
        if self._aux:
            await asyncio.wait(self._aux, timeout=self.settings.deadline * 2)
        if self.connected:
            with contextlib.suppress(FleetUnavailable):
                pipe = self.redis.pipeline(transaction=False)
                for lease, mailbox in self._leases.items():
                    pipe.zrem(self.key("slots", mailbox), lease)
                pipe.delete(self.key("instance", self.instance_id))
                pipe.zrem(self.key("instances"), self.instance_id)
                await self._call("leave", pipe.execute())
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.redis.aclose(), timeout=self.settings.deadline)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sync_interval)
            try:
                await self.sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop must survive anything; the next round tries again
                log.warning("fleet sync failed: %s", type(exc).__name__,
                            extra={"event": "fleet_sync_error", "error_type": type(exc).__name__})

    async def sync(self) -> None:
        """One round trip: heartbeat, lease renewal, and the fleet's holds and pauses."""
        now_ms = int(time.time() * 1000)
        ttl_ms = int(self.settings.lease_ttl * 1000)
        heartbeat = json.dumps({"instance": self.instance_id, "pid": os.getpid(), "host": socket.gethostname(),
                                "started": round(self._started_at), "seen": round(now_ms / 1000, 3),
                                "connected": True, "sessions": self.sessions(),
                                "mailboxes": list(self.mailboxes)})
        names = [("mailbox", m) for m in self.mailboxes] + [("app", a) for a in self.apps]
        pipe = self.redis.pipeline(transaction=False)
        await self._epoch(keys=[self.key("epoch")], args=[int(self.grace * 1000)], client=pipe)
        pipe.set(self.key("instance", self.instance_id), heartbeat,
                 px=max(ttl_ms, int(self.settings.sync_interval * 3000)))
        pipe.zadd(self.key("instances"), {self.instance_id: now_ms})
        pipe.zremrangebyscore(self.key("instances"), "-inf", now_ms - DAY_MS)
        leases = list(self._leases.items())
        if leases:
            await self._renew(keys=[self.key("slots", m) for _, m in leases],
                              args=[ttl_ms, *[lid for lid, _ in leases]], client=pipe)
        for scope, name in names:
            pipe.hgetall(self.key("block", scope, name))
        for m in self.mailboxes:  # the shared budgets, for the metrics; who waits for a slot
            pipe.pttl(self.key("want", m))
            pipe.zcount(self.key("slots", m), now_ms, "+inf")
            pipe.zcount(self.key("rate", m), now_ms - 60_000, "+inf")
            pipe.hgetall(self.key("rcpt", m))
        try:
            results = await self._call("sync", pipe.execute())
        except FleetUnavailable:
            return
        except self._redis_error as exc:  # e.g. NOSCRIPT inside a pipeline after a Redis restart
            self._lost("sync", exc)
            return
        forming = int(results[0])
        if forming > 0:
            self._forming_until = max(self._forming_until, time.monotonic() + forming / 1000)
        self._joined()
        budgets = results[len(results) - 4 * len(self.mailboxes):]
        shown = results[len(results) - 4 * len(self.mailboxes) - len(names):len(results) - 4 * len(self.mailboxes)]
        blocks: dict[tuple[str, str], SharedBlock] = {}
        for (scope, name), raw in zip(names, shown, strict=True):
            if raw:
                blocks[(scope, name)] = _shared_block(scope, name, raw)
        for i, m in enumerate(self.mailboxes):
            want_ms = int(budgets[4 * i])
            if want_ms > 0:
                self._wanted[m] = time.monotonic() + want_ms / 1000
        if self.metrics is not None:
            minute = now_ms // 60_000
            for i, m in enumerate(self.mailboxes):
                slots, last_minute, rcpt = budgets[4 * i + 1:4 * i + 4]
                day = sum(int(c) for k, c in rcpt.items() if int(k) > minute - 1440)
                self.metrics.fleet_budget(m, int(slots), int(last_minute), day)
        self.blocks = blocks
        if self.on_blocks is not None:
            self.on_blocks(blocks)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._aux.add(task)
        task.add_done_callback(self._aux.discard)

    # ------------------------------------------------------------------ status (the CLI)

    async def status(self) -> dict[str, Any]:
        """Instances seen, and per mailbox: slots and holders, submissions in the last minute,
        recipients in the last 24 h, holds and pauses. Raises FleetUnavailable."""
        now_ms = int(time.time() * 1000)
        ids = await self._call("status", self.redis.zrangebyscore(self.key("instances"), now_ms - DAY_MS, "+inf",
                                                                  withscores=True))
        mailboxes = sorted({*self.mailboxes, *[_s(m) for m in await self._call(
            "status", self.redis.smembers(self.key("mailboxes")))]})
        pipe = self.redis.pipeline(transaction=False)
        for iid, _ in ids:
            pipe.get(self.key("instance", _s(iid)))
        for m in mailboxes:
            pipe.zrangebyscore(self.key("slots", m), now_ms, "+inf")
            pipe.zcount(self.key("rate", m), now_ms - 60_000, "+inf")
            pipe.hgetall(self.key("rcpt", m))
            pipe.hgetall(self.key("block", "mailbox", m))
        for a in self.apps:
            pipe.hgetall(self.key("block", "app", a))
        res = list(await self._call("status", pipe.execute()))
        instances = []
        for iid, seen in ids:
            raw = res.pop(0)
            info = json.loads(raw) if raw else {}
            instances.append({"instance": _s(iid), "alive": raw is not None, "last_seen": round(seen / 1000, 3),
                              "sessions": info.get("sessions", {}), "pid": info.get("pid"),
                              "host": info.get("host")})
        minute = now_ms // 60_000
        out_mailboxes = []
        for m in mailboxes:
            slots, last_minute, rcpt, block = res.pop(0), res.pop(0), res.pop(0), res.pop(0)
            holders: dict[str, int] = {}
            for lease in slots:
                who = _s(lease).rsplit("/", 1)[0]
                holders[who] = holders.get(who, 0) + 1
            day = sum(int(c) for k, c in rcpt.items() if int(k) > minute - 1440)
            limits = self.limits(m) if m in self.mailboxes else (None, None)
            out_mailboxes.append({
                "mailbox": m, "slots_in_use": len(slots), "slots_limit": limits[0], "slot_holders": holders,
                "submissions_last_minute": int(last_minute), "per_minute_limit": limits[1],
                "recipients_last_24h": day, "recipients_per_day_limit": self.settings.recipients_per_day,
                "block": _block_dict(_shared_block("mailbox", m, block)) if block else None})
        apps = []
        for a in self.apps:
            block = res.pop(0)
            if block:
                apps.append(_block_dict(_shared_block("app", a, block)))
        return {"redis": _safe_url(self.settings.redis), "key_prefix": self.prefix, "instances": instances,
                "mailboxes": out_mailboxes, "app_blocks": apps}


class FleetUnavailable(Exception):
    """Redis did not answer within the deadline (or refused): use the fallback share."""


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _shared_block(scope: str, name: str, raw: dict[Any, Any]) -> SharedBlock:
    d = {_s(k): _s(v) for k, v in raw.items()}
    return SharedBlock(kind=d.get("kind", "hold"), scope=scope, name=name, reason=d.get("reason", ""),
                       reply=d.get("reply", ""), hint=d.get("hint", ""), by=d.get("by", ""),
                       since=float(d.get("since", "0")) / 1000, until=float(d.get("until", "0")) / 1000)


def _block_dict(b: SharedBlock) -> dict[str, Any]:
    return {"kind": b.kind, "scope": b.scope, "name": b.name, "reason": b.reason, "reply": b.reply,
            "by": b.by, "since": b.since, "until": b.until}


def _safe_url(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"


def _client(settings: FleetSettings) -> aioredis.Redis:
    """An asyncio Redis client: every socket step bounded by the deadline, no retries of its own
    (the relay falls back instead of waiting), TLS verified for ``rediss://``."""
    import redis.asyncio as aioredis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    kwargs: dict[str, Any] = {
        "socket_timeout": settings.deadline,
        "socket_connect_timeout": settings.deadline,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    if settings.password is not None:
        kwargs["password"] = settings.password.get_secret_value()
    if settings.redis.startswith("rediss://"):
        # Certificate and host name always verified (older redis-py did not check the name by default).
        kwargs.update(ssl_cert_reqs="required", ssl_check_hostname=True)
        if settings.ca_file is not None:
            kwargs["ssl_ca_certs"] = str(settings.ca_file)
    client: aioredis.Redis = aioredis.Redis.from_url(settings.redis, **kwargs)
    return client

