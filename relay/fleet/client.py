"""The fleet client: one relay's membership of a fleet (session slots, the minute and day budgets,
shared holds, the sync loop). The package docstring (relay/fleet/__init__.py) tells the design."""

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
from relay.fleet import scripts
from relay.fleet.link import Link
from relay.fleet.scripts import DAY_MS, RATE_WINDOW_MS

if TYPE_CHECKING:
    import redis.asyncio as aioredis

# redis is imported when a fleet is configured, not by every relay (about 6 MB of memory at start).

log = logging.getLogger("relay.fleet")

#: A hold written to Redis lives this long unless a probe refreshes or lifts it (a relay that found
#: it may die; the hold must not outlive everyone who knows about it by much).
HOLD_TTL_MS = 24 * 3_600_000
#: How long to wait before asking again for a session slot when the fleet has none free.
SLOT_RETRY = 0.5
#: A start waits this long for a slot in place (asking every SLOT_POLL) before it goes back to the queue.
SLOT_WAIT = 1.0
SLOT_POLL = 0.05


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
        #: connected or not, and the fallback share while not (relay.fleet.link)
        self.link = Link(settings, self.instance_id, metrics)
        self.counters = FleetCounters()
        self._leases: dict[str, str] = {}  # lease id -> mailbox (sessions this relay has open)
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._aux: set[asyncio.Task[Any]] = set()
        self._started_at = time.time()
        #: (monotonic) per mailbox: another relay asked for a session slot and waits, until then.
        self._wanted: dict[str, float] = {}
        self.blocks: dict[tuple[str, str], SharedBlock] = {}
        #: called after each sync with the blocks the fleet holds (the delivery reconciles its own)
        self.on_blocks: Callable[[dict[tuple[str, str], SharedBlock]], None] | None = None
        self._acquire = self.redis.register_script(scripts.SLOT_ACQUIRE)
        self._renew = self.redis.register_script(scripts.SLOT_RENEW)
        self._take = self.redis.register_script(scripts.RATE_TAKE)
        self._done = self.redis.register_script(scripts.RATE_DONE)
        self._cancel = self.redis.register_script(scripts.RATE_CANCEL)
        self._block_set = self.redis.register_script(scripts.BLOCK_SET)
        self._epoch = self.redis.register_script(scripts.EPOCH)
        self.mailboxes: tuple[str, ...] = ()
        self.apps: tuple[str, ...] = ()

    # ------------------------------------------------------------------ keys

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # ------------------------------------------------------------------ calls with a deadline

    async def call(self, what: str, coro: Awaitable[Any]) -> Any:
        """One Redis round trip within ``fleet.deadline``. Raises FleetUnavailable (and switches to the
        fallback share) on any trouble."""
        started = time.perf_counter()
        self.counters.calls += 1
        try:
            return await asyncio.wait_for(coro, self.settings.deadline)
        except (self._redis_error, OSError, TimeoutError) as exc:
            self.counters.failures += 1
            self.link.lost(what, exc)
            raise FleetUnavailable(what) from None
        finally:
            spent = time.perf_counter() - started
            self.counters.seconds += spent
            if self.metrics is not None:
                self.metrics.fleet_calls.labels(what).inc()
                self.metrics.fleet_call_seconds.labels(what).inc(spent)

    # ------------------------------------------------------------------ session slots

    async def open_session(self, mailbox: str) -> str:
        """A lease on one of the mailbox's session slots, fleet-wide. Raises FleetWait when every
        slot is taken. Disconnected: a local lease (the fallback share limits it)."""
        mailbox = mailbox.lower()
        lease = f"{self.instance_id}/{next(self._ids)}"
        if not self.link.connected and time.monotonic() < self.link.settle_until:
            raise FleetWait(self.link.settle_until - time.monotonic(), "fallback_settling")
        if self.link.connected:
            connections = self.limits(mailbox)[0]
            give_up = time.monotonic() + SLOT_WAIT
            while True:
                try:
                    got = await self.call("slot", self._acquire(
                        keys=[self.key("slots", mailbox), self.key("mailboxes"), self.key("epoch"),
                              self.key("want", mailbox)],
                        args=[lease, connections, int(self.settings.lease_ttl * 1000), mailbox,
                              self.settings.fallback.connections, self.instance_id]))
                except FleetUnavailable:
                    raise FleetWait(self.link.settle_until - time.monotonic(), "fallback_settling") from None
                if got or time.monotonic() >= give_up:
                    break
                await asyncio.sleep(SLOT_POLL)  # another relay's session ends soon: it was asked to
            if got == 2:  # Redis is new or restarted empty: the others' leases may not be back yet
                self.link.forming_until = max(self.link.forming_until, time.monotonic() + self.link.grace)
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
        if mailbox is None or not self.link.connected:
            return
        self._spawn(self._release(mailbox, lease))

    async def _release(self, mailbox: str, lease: str) -> None:
        with contextlib.suppress(FleetUnavailable):
            await self.call("slot_release", self.redis.zrem(self.key("slots", mailbox), lease))

    def wanted(self, mailbox: str) -> bool:
        """Another relay waits for one of this mailbox's session slots: an idle session should close."""
        return time.monotonic() < self._wanted.get(mailbox.lower(), 0.0)

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
        if not self.link.connected:
            return sub
        per_minute = self.limits(mailbox)[1]
        try:
            ok, wait_ms, why = await self.call("rate", self._take(
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
        if sub is None or not sub.shared or not self.link.connected:
            return
        self._spawn(self._stamp(sub))

    async def _stamp(self, sub: _Submission) -> None:
        with contextlib.suppress(FleetUnavailable):
            await self.call("rate_done", self._done(keys=[self.key("rate", sub.mailbox)],
                                                     args=[sub.id, RATE_WINDOW_MS]))

    async def cancel(self, sub: _Submission | None) -> None:
        """The submission never reached Exchange: give back its place."""
        if sub is None or not sub.shared or not self.link.connected:
            return
        with contextlib.suppress(FleetUnavailable):
            await self.call("rate_cancel", self._cancel(
                keys=[self.key("rate", sub.mailbox), self.key("rcpt", sub.mailbox)],
                args=[sub.id, sub.recipients, sub.minute]))

    def _count_wait(self, mailbox: str, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.fleet_waits.labels(mailbox, reason).inc()

    # ------------------------------------------------------------------ holds, pauses, probes

    def share_block(self, kind: str, scope: str, name: str, reason: str, reply: str, hint: str,
                    seconds: float) -> None:
        """Tell the fleet about a hold or pause this relay found (in the background)."""
        if not self.link.connected:
            return
        ttl = HOLD_TTL_MS if kind == "hold" else max(int(seconds * 1000), 1)
        self._spawn(self._write_block(kind, scope, name, reason, reply, hint, ttl))

    async def _write_block(self, kind: str, scope: str, name: str, reason: str, reply: str, hint: str,
                           ttl: int) -> None:
        with contextlib.suppress(FleetUnavailable):
            await self.call("block", self._block_set(keys=[self.key("block", scope, name)],
                                                      args=[kind, reason, reply[:500], hint[:500],
                                                            self.instance_id, ttl]))

    async def may_probe(self, scope: str, name: str, seconds: float) -> bool:
        """Exactly one relay probes a held app or mailbox at a time: the one that gets this lease."""
        if not self.link.connected:
            return True
        try:
            got = await self.call("probe", self.redis.set(self.key("probe", scope, name), self.instance_id,
                                                           nx=True, px=max(int(seconds * 1000), 1000)))
        except FleetUnavailable:
            return True
        return bool(got)

    async def probe_done(self, scope: str, name: str, ok: bool, next_in: float = 0.0) -> None:
        """A probe ended. Success lifts the hold for the whole fleet; a failure keeps the probe lease
        for ``next_in`` seconds, so the fleet probes once per interval, not once per relay."""
        if not self.link.connected:
            return
        with contextlib.suppress(FleetUnavailable):
            if ok:  # one DEL of both keys: atomic without MULTI
                await self.call("release", self.redis.delete(self.key("block", scope, name),
                                                              self.key("probe", scope, name)))
            elif next_in > 0:
                await self.call("probe_end", self.redis.set(self.key("probe", scope, name), self.instance_id,
                                                             px=max(int(next_in * 1000), 1)))
            else:
                await self.call("probe_end", self.redis.delete(self.key("probe", scope, name)))

    def lift(self, scope: str, name: str) -> None:
        """Lift a hold or pause fleet-wide (an admin released it here)."""
        if self.link.connected:
            self._spawn(self.probe_done(scope, name, True))

    # ------------------------------------------------------------------ the sync loop

    async def start(self, mailboxes: Iterable[str], apps: Iterable[str]) -> None:
        """Join (or start disconnected: mail flows on the fallback share) and run the sync loop."""
        self.mailboxes = tuple(m.lower() for m in mailboxes)
        self.apps = tuple(apps)
        self.link.gauge()
        await self.sync()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="fleet-sync")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=self.settings.deadline * 2)
        if self._aux:
            await asyncio.wait(self._aux, timeout=self.settings.deadline * 2)
        if self.link.connected:
            with contextlib.suppress(FleetUnavailable):
                pipe = self.redis.pipeline(transaction=False)
                for lease, mailbox in self._leases.items():
                    pipe.zrem(self.key("slots", mailbox), lease)
                pipe.delete(self.key("instance", self.instance_id))
                pipe.zrem(self.key("instances"), self.instance_id)
                await self.call("leave", pipe.execute())
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
        await self._epoch(keys=[self.key("epoch")], args=[int(self.link.grace * 1000)], client=pipe)
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
            results = await self.call("sync", pipe.execute())
        except FleetUnavailable:
            return
        except self._redis_error as exc:  # e.g. NOSCRIPT inside a pipeline after a Redis restart
            self.link.lost("sync", exc)
            return
        forming = int(results[0])
        if forming > 0:
            self.link.forming_until = max(self.link.forming_until, time.monotonic() + forming / 1000)
        self.link.joined()
        budgets = results[len(results) - 4 * len(self.mailboxes):]
        shown = results[len(results) - 4 * len(self.mailboxes) - len(names):len(results) - 4 * len(self.mailboxes)]
        blocks: dict[tuple[str, str], SharedBlock] = {}
        for (scope, name), raw in zip(names, shown, strict=True):
            if raw:
                blocks[(scope, name)] = shared_block(scope, name, raw)
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

class FleetUnavailable(Exception):
    """Redis did not answer within the deadline (or refused): use the fallback share."""


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def shared_block(scope: str, name: str, raw: dict[Any, Any]) -> SharedBlock:
    d = {as_text(k): as_text(v) for k, v in raw.items()}
    return SharedBlock(kind=d.get("kind", "hold"), scope=scope, name=name, reason=d.get("reason", ""),
                       reply=d.get("reply", ""), hint=d.get("hint", ""), by=d.get("by", ""),
                       since=float(d.get("since", "0")) / 1000, until=float(d.get("until", "0")) / 1000)


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

