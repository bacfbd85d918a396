"""Holds, pauses and probes of an app or a mailbox.

- **Holds**: a configuration problem (535 5.7.3, 5.7.139, AADSTS invalid secret...) holds the mailbox
  or the whole app: nothing is attempted (so nothing bounces and Exchange does not throttle us for
  repeated errors); a cheap probe (token + AUTH, no message) runs every ``probe_interval`` (growing up
  to ten times that while the problem lasts) and lifts the hold as soon as the admin's fix works; the
  held messages are then due at once.
- **Pauses**: transient trouble that concerns everything behind an app or mailbox (token endpoint down,
  432 concurrent-connection limit, submission rate or daily quota, sender throttled) pauses it for a
  while instead of letting every queued message fail one by one.
- **Publishing**: the holds (and app pauses) go to the metrics and, in the background, to the spool's
  holds.json that the queue CLI shows. With a fleet, a block one relay finds is shared with all.

All of this lives in memory and may be lost: after a restart the next failing attempt holds again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from relay.config import Settings
from relay.delivery.classify import Action, Scope, Verdict
from relay.delivery.pacing import mailbox_key
from relay.envelope import Route
from relay.fleet import Fleet, SharedBlock
from relay.observability import Metrics
from relay.queue.spool import Spool, State

log = logging.getLogger("relay.delivery")

#: While a hold lasts its probe interval doubles, up to this many times the first one (30 s -> 300 s).
PROBE_BACKOFF_LIMIT = 10.0
#: Longest pause of an app or mailbox for transient trouble (its messages keep their own backoff).
PAUSE_MAX = 600.0

Probe = Callable[[Route], Awaitable[Verdict]]


@dataclass
class Block:
    """A hold (needs an admin, probed) or a pause (transient, expires) on an app or a mailbox."""

    kind: str  # "hold" | "pause"
    scope: str  # "app" | "mailbox"
    name: str
    reason: str
    reply: str
    hint: str
    since: float
    until: float  # pause: when it ends; hold: when the next probe is due
    interval: float


class Holds:
    """The holds and pauses in force, keyed by (scope, name), and the probes that lift holds.

    ``wake`` tells the scheduler something changed; ``spawn`` runs a background step the owner tracks.
    """

    def __init__(self, settings: Settings, spool: Spool, metrics: Metrics, clock: Callable[[], float], *,
                 wake: Callable[[], None], spawn: Callable[[Awaitable[Any]], None],
                 probe: Probe | None = None, probe_interval: float | None = None) -> None:
        self.settings = settings
        self.spool = spool
        self.metrics = metrics
        self.clock = clock
        self.wake = wake
        self._spawn = spawn
        self.probe = probe
        self._probe_interval = probe_interval
        self.fleet: Fleet | None = None
        self.blocks: dict[tuple[str, str], Block] = {}
        self.probes: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._shown: list[dict[str, Any]] = []  # what holds.json says (written in the background)
        self._dirty = False
        self._writing = False
        #: Holds the fleet has shown us (so one that disappears there was lifted by another relay).
        self._fleet_seen: set[tuple[str, str]] = set()

    @property
    def probe_interval(self) -> float:
        """First probe interval of a hold: the constructor's, else ``delivery.probe_interval``."""
        if self._probe_interval is not None:
            return self._probe_interval
        return float(self.settings.delivery.probe_interval)

    @probe_interval.setter
    def probe_interval(self, seconds: float | None) -> None:
        self._probe_interval = seconds

    # ------------------------------------------------------------------ looking

    def blocked(self, route: Route) -> Block | None:
        for key in (("app", route.app), ("mailbox", mailbox_key(route.mailbox))):
            block = self.blocks.get(key)
            if block is not None:
                if block.kind == "pause" and self.clock() >= block.until:
                    del self.blocks[key]
                    if block.scope == "app":
                        self.publish()  # queue holds shows app pauses: this one is over
                    continue
                return block
        return None

    def holds(self) -> list[Block]:
        return [b for b in self.blocks.values() if b.kind == "hold"]

    def app_pauses(self) -> list[Block]:
        """Pauses of a whole app still in force (its token endpoint or upstream does not answer):
        nothing moves through that app meanwhile, so /readyz and ``queue holds`` show them."""
        now = self.clock()
        return [b for b in self.blocks.values() if b.kind == "pause" and b.scope == "app" and now < b.until]

    # ------------------------------------------------------------------ publishing

    def publish(self) -> None:
        """Holds changed: update the metrics, and (in the background) the spool's holds.json that
        the queue CLI shows; one writer at a time, always writing the latest state."""
        self.metrics.set_holds((b.scope, b.name, b.reason) for b in self.holds())
        shown = self._snapshot()
        if shown == self._shown:
            return  # a pause, or a hold's probe rescheduled: nothing the queue CLI shows has changed
        self._shown = shown
        self._dirty = True
        if not self._writing:
            self._writing = True
            self._spawn(self._write())

    def _snapshot(self) -> list[dict[str, Any]]:
        return [{"kind": b.kind, "scope": b.scope, "name": b.name, "reason": b.reason, "reply": b.reply,
                 "hint": b.hint, "since": b.since} for b in [*self.holds(), *self.app_pauses()]]

    async def _write(self) -> None:
        try:
            while self._dirty:
                self._dirty = False
                try:
                    await asyncio.to_thread(self.spool.publish_holds, self._shown)
                except OSError as exc:  # advisory: the metrics and /readyz still say it
                    log.warning("could not write holds.json: %s", type(exc).__name__,
                                extra={"event": "holds_file_error", "error_type": type(exc).__name__})
        finally:
            self._writing = False

    # ------------------------------------------------------------------ holding and releasing

    def block(self, kind: str, verdict: Verdict, route: Route, until: float | None = None) -> None:
        """Hold or pause the verdict's scope. A block already in force keeps its timing: ten messages
        failing at once for one reason are one event, not ten."""
        scope = "app" if verdict.scope is Scope.APP else "mailbox"
        name = route.app if scope == "app" else mailbox_key(route.mailbox)
        key = (scope, name)
        now = self.clock()
        previous = self.blocks.get(key)
        if previous is not None and previous.kind == "pause" and now >= previous.until:
            previous = None
        if kind == "hold":
            if previous is not None and previous.kind == "hold":
                interval, until = previous.interval, previous.until
            else:
                interval = self.probe_interval
                until = now + interval
        else:
            if previous is not None and previous.kind == "hold":
                return  # a hold outranks a pause; its probe finds out when things work again
            retry = self.settings.delivery.retry
            interval = min(verdict.retry_after or retry.first, retry.max, PAUSE_MAX)
            until = now + interval if previous is None else max(previous.until, now + interval)
        if kind == "hold" and until is not None and previous is None:
            interval = max(until - now, self.probe_interval)
            until = now + interval
        if previous is None or previous.kind != kind:
            if self.fleet is not None:  # one relay found it: the whole fleet holds or pauses
                self.fleet.share_block(kind, scope, name, verdict.reason, verdict.reply, verdict.hint, until - now)
            level = logging.ERROR if kind == "hold" else logging.WARNING
            log.log(level, f"{scope} {name} {'on hold' if kind == 'hold' else 'paused'}: {verdict.reason}", extra={
                "event": f"{scope}_{kind}", scope: name, "reason": verdict.reason, "reply": verdict.reply,
                "hint": verdict.hint, "seconds": round(interval, 1)})
        self.blocks[key] = Block(kind=kind, scope=scope, name=name, reason=verdict.reason, reply=verdict.reply,
                                 hint=verdict.hint, since=previous.since if previous else now,
                                 until=until, interval=interval)
        self.publish()

    def release(self, scope: str, name: str, *, share: bool = True) -> None:
        """Lift a hold or pause; the messages waiting behind it are due at once (fleet-wide unless
        ``share`` is False: the fleet already knows)."""
        if scope == "mailbox":
            name = mailbox_key(name)
        block = self.blocks.pop((scope, name), None)
        if share and self.fleet is not None:
            self.fleet.lift(scope, name)
        if block is None:
            return
        log.info(f"{scope} {name} released", extra={"event": f"{scope}_released", scope: name,
                                                    "held_seconds": round(self.clock() - block.since)})
        self.publish()
        self._spawn(self._make_due(scope, name))

    async def _make_due(self, scope: str, name: str) -> None:
        def run() -> int:
            n = 0
            for entry in self.spool.list([State.QUEUED]):
                match = entry.route.app == name if scope == "app" else mailbox_key(entry.route.mailbox) == name
                if match and entry.next_attempt_at > self.clock():
                    n += self.spool.retry(entry.id)
            return n

        try:
            await asyncio.to_thread(run)
        except Exception as exc:  # they come due by their own backoff anyway
            log.warning("could not make held messages due: %s", type(exc).__name__,
                        extra={"event": "release_error", "error_type": type(exc).__name__})
        self.wake()

    def fleet_blocks(self, shared: dict[tuple[str, str], SharedBlock]) -> None:
        """The fleet's holds and pauses (after each sync): take on those found by other relays, lift
        the holds another relay's probe has released."""
        now = self.clock()
        changed = False
        for key, remote in shared.items():
            self._fleet_seen.add(key)
            local = self.blocks.get(key)
            if local is not None and (local.kind == "hold" or remote.kind == "pause"):
                if remote.kind == "pause" and local.kind == "pause" and remote.until > local.until:
                    local.until = remote.until
                continue
            if remote.kind == "pause" and remote.until <= now:
                continue
            until = now + self.probe_interval if remote.kind == "hold" else remote.until
            self.blocks[key] = Block(kind=remote.kind, scope=remote.scope, name=remote.name, reason=remote.reason,
                                     reply=remote.reply, hint=remote.hint, since=remote.since or now, until=until,
                                     interval=self.probe_interval if remote.kind == "hold" else until - now)
            log.log(logging.ERROR if remote.kind == "hold" else logging.WARNING,
                    f"{remote.scope} {remote.name} {'on hold' if remote.kind == 'hold' else 'paused'} by the fleet: "
                    f"{remote.reason}", extra={"event": f"fleet_{remote.kind}", remote.scope: remote.name,
                                               "reason": remote.reason, "found_by": remote.by})
            changed = True
        for key in list(self._fleet_seen):
            if key in shared:
                continue
            self._fleet_seen.discard(key)
            local = self.blocks.get(key)
            if local is not None and local.kind == "hold" and key not in self.probes:
                self.release(*key, share=False)  # another relay's probe succeeded
        if changed:
            self.publish()
            self.wake()

    # ------------------------------------------------------------------ probes

    def probe_due(self) -> None:
        """Start a probe for each hold whose probe is due (in the background: a probe may take as long
        as a connection timeout, and other mailboxes must not wait for it)."""
        now = self.clock()
        for key, block in list(self.blocks.items()):
            if block.kind != "hold" or now < block.until or key in self.probes:
                continue
            if self.probe is None:
                # No probe: lift the hold on time; the next message due is the probe (it holds again
                # if the problem is still there).
                del self.blocks[key]
                self.publish()
                continue
            route = self._route_for(block)
            if route is None:  # that app or mailbox is no longer configured
                del self.blocks[key]
                continue
            task = asyncio.ensure_future(self._run_probe(key, route))
            self.probes[key] = task

    async def _run_probe(self, key: tuple[str, str], route: Route) -> None:
        assert self.probe is not None
        fleet = self.fleet
        if fleet is not None:
            block = self.blocks.get(key)
            lease = max(block.interval if block else self.probe_interval, self.settings.delivery.timeout * 2)
            if not await fleet.may_probe(*key, lease):
                # Another relay probes it (or did, and its next probe is not due): ours waits one interval.
                self.probes.pop(key, None)
                if block is not None and block is self.blocks.get(key):
                    block.until = self.clock() + block.interval
                self.wake()
                return
        try:
            verdict = await self.probe(route)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            verdict = Verdict(Action.RETRY, "probe_error", f"probe failed: {type(exc).__name__}", Scope.MESSAGE)
        finally:
            self.probes.pop(key, None)
        block = self.blocks.get(key)
        if fleet is not None:
            # Success lifts the hold fleet-wide; a failure keeps the probe lease until the next probe
            # is due, so the fleet probes once per interval, not once per relay.
            next_in = min((block.interval if block else self.probe_interval) * 2,
                          self.probe_interval * PROBE_BACKOFF_LIMIT)
            await fleet.probe_done(*key, verdict.action is Action.DELIVERED, next_in)
        if block is None or block.kind != "hold":
            return
        if verdict.action is Action.DELIVERED:
            self.release(block.scope, block.name, share=False)
            return
        now = self.clock()
        block.interval = min(block.interval * 2, self.probe_interval * PROBE_BACKOFF_LIMIT)
        block.until = now + block.interval
        if verdict.action is Action.HOLD:
            block.reason, block.reply, block.hint = verdict.reason, verdict.reply, verdict.hint or block.hint
        log.info("hold probe: still failing", extra={"event": "probe_failed", block.scope: block.name,
                                                     "reason": verdict.reason, "reply": verdict.reply,
                                                     "next_probe_in": round(block.interval, 1)})
        self.wake()

    def _route_for(self, block: Block) -> Route | None:
        for mbx in self.settings.mailboxes:
            if (block.scope == "mailbox" and mailbox_key(mbx.address) == block.name) or (
                    block.scope == "app" and mbx.app == block.name):
                return Route(app=mbx.app, mailbox=mbx.address, sender=mbx.address)
        return None

    def waits(self, now: float) -> list[float]:
        """Seconds until each block's next change (a pause ends, a probe is due)."""
        return [b.until - now for b in self.blocks.values()]
