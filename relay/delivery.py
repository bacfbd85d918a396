"""Scheduler and workers: pick due messages, pace them per mailbox, classify outcomes, retry or fail.

The spool is the truth: every decision is written there before it counts, so the process can die at
any line and the next start carries on. In memory we only keep what may be lost: pacing windows,
holds and pauses (recomputed by probing), and the tasks in flight.

- **Pacing**: at most ``per_minute`` submissions per mailbox in any 60 s window as Exchange counts
  them (it allows 30), and at most ``connections`` attempts per mailbox at once (Exchange allows 3).
  Messages beyond that are simply not claimed: a burst waits in the spool, not in memory.
- **Holds**: a configuration problem (535 5.7.3, 5.7.139, AADSTS invalid secret...) holds the mailbox
  or the whole app: nothing is attempted (so nothing bounces and Exchange does not throttle us for
  repeated errors); a cheap probe (token + AUTH, no message) runs every ``probe_interval`` (growing up
  to ten times that while the problem lasts) and lifts the hold as soon as the admin's fix works; the
  held messages are then due at once.
- **Pauses**: transient trouble that concerns everything behind an app or mailbox (token endpoint down,
  432 concurrent-connection limit, submission rate or daily quota, sender throttled) pauses it for a
  while instead of letting every queued message fail one by one.
- **Time** comes from an injected ``clock`` and the scheduler waits through an injected ``sleep``, so
  tests drive backoff, pacing and expiry with a fake clock instead of real waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from relay.classify import Action, Outcome, Scope, Verdict
from relay.committer import GroupCommitter
from relay.config import Settings
from relay.envelope import Envelope, Route
from relay.fleet import Fleet, FleetWait, SharedBlock
from relay.observability import Metrics
from relay.spool import Entry, Spool, State

log = logging.getLogger("relay.delivery")

#: While a hold lasts its probe interval doubles, up to this many times the first one (30 s -> 300 s).
PROBE_BACKOFF_LIMIT = 10.0
#: Longest pause of an app or mailbox for transient trouble (its messages keep their own backoff).
PAUSE_MAX = 600.0
#: How often queued messages are checked against ``delivery.max_age`` (also those never attempted,
#: e.g. behind a hold that nobody fixes).
EXPIRY_SWEEP_INTERVAL = 60.0
#: Retry delay after a local error (e.g. the body could not be read).
LOCAL_ERROR_RETRY = 60.0
#: The scheduler looks at the spool at least this often: the queue CLI (another process) may have made
#: something due without telling us.
POLL_INTERVAL = 1.0
#: At most this many new messages wait in memory for a connection (see Delivery._ready), enough for a
#: burst of several seconds; more go through the queue. Only the first READY_BODIES keep their body
#: in memory (at most 64 KiB each, relay.service.KEEP_IN_MEMORY); the others are read from the spool.
READY_MAX = 1024
READY_BODIES = 128

#: Pacing window. Exchange counts a submission when it accepts it; we count it from the moment it
#: starts until it ends (see :class:`Pacer`), plus one second of margin for clocks and rounding.
PACING_WINDOW = 61.0

Sleep = Callable[[float], Awaitable[Any]]


class SubmitsMessages(Protocol):
    """What the scheduler needs from :class:`relay.upstream.Submitter` (tests pass a fake)."""

    async def submit(self, route: Route, envelope: Envelope, body: bytes | Path,
                     recipients: tuple[str, ...] | None = None) -> Outcome: ...


class Pacer:
    """At most ``per_minute`` submissions in any :data:`PACING_WINDOW` (0 = unlimited). Injectable clock.

    :meth:`take` reserves a slot when a submission starts; :meth:`done` stamps it with the time it
    ended. A slot in flight counts as "now" until it ends, so a slow submission (queued behind the
    connection limit, or a big message) can never make two batches land in one Exchange minute:
    Exchange counts at acceptance, which lies between our start and our end.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._slots: dict[int, float | None] = {}  # slot -> end time (None: in flight)
        self._next = 1

    def _expire(self, now: float) -> None:
        for slot, ended in list(self._slots.items()):
            if ended is not None and ended <= now - PACING_WINDOW:
                del self._slots[slot]

    def available(self) -> int:
        """How many submissions may start now."""
        if self.per_minute <= 0:
            return 1 << 30
        self._expire(self._clock())
        return max(self.per_minute - len(self._slots), 0)

    def delay(self) -> float:
        """Seconds until a submission may start (0 = now). A full window of slots still in flight
        gives :data:`PACING_WINDOW` (the end of one of them wakes the scheduler anyway)."""
        if self.available() > 0:
            return 0.0
        ended = [e for e in self._slots.values() if e is not None]
        if not ended:
            return PACING_WINDOW
        return max(min(ended) + PACING_WINDOW - self._clock(), 0.0)

    def take(self) -> int | None:
        """Reserve a slot now if one is free; the slot to pass to :meth:`done`, or None."""
        if self.available() <= 0:
            return None
        if self.per_minute <= 0:
            return 0
        slot = self._next
        self._next += 1
        self._slots[slot] = None
        return slot

    def done(self, slot: int | None) -> None:
        """The submission of ``slot`` ended (whatever the outcome): its minute starts counting down."""
        if slot and slot in self._slots and self._slots[slot] is None:
            self._slots[slot] = self._clock()

    def cancel(self, slot: int | None) -> None:
        """Nothing was submitted for ``slot`` (the fleet said wait): it does not count."""
        if slot:
            self._slots.pop(slot, None)


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


@dataclass
class _Waiter:
    """The listener's client waiting for a sync attempt. ``committed``: the attempt has decided to hand
    the client Exchange's permanent refusal and keep nothing, so the client must get that answer."""

    waiting: bool = True
    committed: bool = False
    #: set as soon as Exchange accepted the message: the client may have its 250 before the spool
    #: has recorded the delivery (invariant 1: a 2xx means fsync'd *or* accepted by Exchange).
    accepted: asyncio.Future[str] | None = None


@dataclass
class _Flight:
    task: asyncio.Task[Any]
    mailbox: str
    slot: int | None = None


def backoff(attempts: int, first: float, maximum: float, factor: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: about first, first*factor, ... never more than ``maximum``.

    Jitter is +-20 % below the cap and 0..-20 % at the cap, so retries of a burst spread out instead of
    coming back together, and ``maximum`` really is the longest wait.
    """
    exponent = min(max(attempts - 1, 0), 64)
    base = first * factor**exponent
    if base >= maximum:
        return maximum * rng.uniform(0.8, 1.0)
    return min(base * rng.uniform(0.8, 1.2), maximum)


def _key(mailbox: str) -> str:
    return mailbox.lower()


class Delivery:
    """Delivers spooled messages; also serves the listener's immediate (sync) attempt."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        submitter: SubmitsMessages,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Sleep | None = None,
        rng: random.Random | None = None,
        probe: Callable[[Route], Awaitable[Verdict]] | None = None,
        probe_interval: float | None = None,
        max_workers: int = 32,
        committer: GroupCommitter | None = None,
    ) -> None:
        self._limits: dict[str, tuple[int, int]] = {}
        self.settings = settings
        self.spool = spool
        #: records deliveries in groups (shared with the listener's stores when the service wires it)
        self.committer = committer or GroupCommitter(spool)
        self.submitter = submitter
        self.metrics = metrics
        self.clock = clock
        self.sleep: Sleep = sleep or asyncio.sleep
        self.rng = rng or random.Random()
        self.max_workers = max_workers
        self.probe: Callable[[Route], Awaitable[Verdict]] | None = probe
        self._probe_interval = probe_interval
        self.blocks: dict[tuple[str, str], Block] = {}
        self._pacers: dict[str, Pacer] = {}
        self._inflight: dict[str, _Flight] = {}
        self._busy: dict[str, int] = {}
        self._probes: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._aux: set[asyncio.Task[Any]] = set()
        #: Outcomes the spool could not take (disk full...): written again each round until it does,
        #: so a message Exchange accepted is not sent again. Those messages stay ACTIVE meanwhile.
        self._unrecorded: dict[str, tuple[Entry, Outcome]] = {}
        #: New messages (ACTIVE, with their body if the listener kept it) that nobody waits for and
        #: that only wait for a connection of their mailbox: started when one frees, without a round
        #: trip through the queue (unclaim, then claim). Bounded; a crash leaves them ACTIVE, which
        #: spool recovery makes due again at the next start.
        self._ready: dict[str, deque[tuple[Entry, bytes | None]]] = {}  # per mailbox (lower case), oldest first
        self._ready_count = 0
        self._holds_shown: list[dict[str, Any]] = []  # what holds.json says (written in the background)
        self._holds_dirty = False
        self._holds_writing = False
        self._wake = asyncio.Event()
        self._stopping = False
        self._running = False
        self._run_done = asyncio.Event()
        self._next_sweep = 0.0
        # What the last look at the spool found: the queue's version then, when, and the next due time.
        self._seen_version = -1
        self._seen_at = float("-inf")
        self._next_due: float | None = None
        self.on_dead: Callable[[Entry, str], Awaitable[None] | None] | None = None
        #: Optional: the limits each mailbox shares with other relays (relay.fleet). None: this relay
        #: alone enforces them, as without ``fleet:`` in the config.
        self.fleet: Fleet | None = None
        #: Mailboxes the fleet has no room for right now: not started before this time.
        self._fleet_until: dict[str, float] = {}
        #: Attempts that submitted nothing because the fleet said wait: their pacing slot is given back.
        self._fleet_refund: set[str] = set()
        #: Holds the fleet has shown us (so one that disappears there was lifted by another relay).
        self._fleet_seen: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ helpers

    @property
    def probe_interval(self) -> float:
        """First probe interval of a hold: the constructor's, else ``delivery.probe_interval``."""
        if self._probe_interval is not None:
            return self._probe_interval
        return float(self.settings.delivery.probe_interval)

    @probe_interval.setter
    def probe_interval(self, seconds: float | None) -> None:
        self._probe_interval = seconds

    @property
    def settings(self) -> Settings:
        return self._settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        """A reload: the per-mailbox limits are looked up again."""
        self._settings = settings
        self._limits.clear()

    def _mailbox_limits(self, key: str) -> tuple[int, int]:
        """(connections, per_minute) this relay may use for a mailbox (lower case) on its own: as
        configured, or the fleet's fallback share while the fleet's Redis is away."""
        limits = self.configured_limits(key)
        return limits if self.fleet is None else self.fleet.local_limits(limits)

    def configured_limits(self, key: str) -> tuple[int, int]:
        """(connections, per_minute) of a mailbox (lower case), from the settings (several times a message:
        remembered until the next reload)."""
        key = _key(key)
        limits = self._limits.get(key)
        if limits is None:
            mbx = self.settings.mailbox(key)
            default = self.settings.delivery.per_mailbox
            limits = ((self.settings.mailbox_connections(mbx), self.settings.mailbox_per_minute(mbx)) if mbx
                      else (default.connections, default.per_minute))
            self._limits[key] = limits
        return limits

    def pacer(self, mailbox: str) -> Pacer:
        key = _key(mailbox)
        per_minute = self._mailbox_limits(key)[1]
        pacer = self._pacers.get(key)
        if pacer is None:
            pacer = self._pacers[key] = Pacer(per_minute, self.clock)
        pacer.per_minute = per_minute  # follows a configuration reload; the window's history stays
        return pacer

    def connections(self, mailbox: str) -> int:
        return self._mailbox_limits(_key(mailbox))[0]

    def busy(self, mailbox: str) -> int:
        """Attempts in flight for a mailbox (sync and scheduled)."""
        return self._busy.get(_key(mailbox), 0)

    def blocked(self, route: Route) -> Block | None:
        for key in (("app", route.app), ("mailbox", _key(route.mailbox))):
            block = self.blocks.get(key)
            if block is not None:
                if block.kind == "pause" and self.clock() >= block.until:
                    del self.blocks[key]
                    if block.scope == "app":
                        self._publish_holds()  # queue holds shows app pauses: this one is over
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

    def _publish_holds(self) -> None:
        """Holds changed: update the metrics, and (in the background) the spool's holds.json that
        the queue CLI shows; one writer at a time, always writing the latest state."""
        self.metrics.set_holds((b.scope, b.name, b.reason) for b in self.holds())
        shown = self._holds_snapshot()
        if shown == self._holds_shown:
            return  # a pause, or a hold's probe rescheduled: nothing the queue CLI shows has changed
        self._holds_shown = shown
        self._holds_dirty = True
        if not self._holds_writing:
            self._holds_writing = True
            self._spawn(self._write_holds())

    def _holds_snapshot(self) -> list[dict[str, Any]]:
        return [{"kind": b.kind, "scope": b.scope, "name": b.name, "reason": b.reason, "reply": b.reply,
                 "hint": b.hint, "since": b.since} for b in [*self.holds(), *self.app_pauses()]]

    async def _write_holds(self) -> None:
        try:
            while self._holds_dirty:
                self._holds_dirty = False
                try:
                    await asyncio.to_thread(self.spool.publish_holds, self._holds_shown)
                except OSError as exc:  # advisory: the metrics and /readyz still say it
                    log.warning("could not write holds.json: %s", type(exc).__name__,
                                extra={"event": "holds_file_error", "error_type": type(exc).__name__})
        finally:
            self._holds_writing = False

    def in_flight(self) -> int:
        return len(self._inflight)

    def idle(self) -> bool:
        """Nothing in flight, no probe running, no wake-up pending (tests driving a fake clock)."""
        return not (self._inflight or self._probes or self._aux or self._unrecorded or self._wake.is_set())

    def wake(self) -> None:
        self._wake.set()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._aux.add(task)
        task.add_done_callback(self._aux.discard)

    def _launch(self, entry: Entry, coro: Awaitable[str], slot: int | None, *, counts: bool) -> asyncio.Task[str]:
        """Start ``coro`` for ``entry``: tracked (for stop) and, when ``counts``, holding a connection
        of its mailbox and a pacing ``slot`` until it ends, however it ends."""
        mailbox = _key(entry.route.mailbox)
        task: asyncio.Task[str] = asyncio.ensure_future(coro)
        self._inflight[entry.id] = _Flight(task, mailbox, slot)
        if counts:
            self._busy[mailbox] = self._busy.get(mailbox, 0) + 1

        def finished(_: asyncio.Task[str]) -> None:
            if self._inflight.get(entry.id) is not None and self._inflight[entry.id].task is task:
                del self._inflight[entry.id]
            if counts:
                self._busy[mailbox] = max(self._busy.get(mailbox, 1) - 1, 0)
                if entry.id in self._fleet_refund:
                    self._fleet_refund.discard(entry.id)
                    self.pacer(mailbox).cancel(slot)
                else:
                    self.pacer(mailbox).done(slot)
            self.wake()

        task.add_done_callback(finished)
        return task

    # ------------------------------------------------------------------ the sync path

    async def deliver_now(self, entry: Entry, wait: float, body: bytes | None = None) -> str:
        """The listener's immediate attempt for a message stored as ACTIVE. Returns the SMTP reply.

        ``body``: the message itself when the listener still has it in memory (a small one), so the
        attempt need not read the spool file back.

        If Exchange has not answered within ``wait`` seconds the attempt goes on in the background
        and the client hears ``250 queued``; the outcome is recorded when it comes (a permanent
        refusal then makes a dead letter: the client was told the message is ours).
        """
        route = entry.route
        slot: int | None = None
        if wait > 0 and not self._stopping and self.blocked(route) is None and not self._fleet_waiting(route.mailbox):
            slot = self.pacer(route.mailbox).take()
        elif wait <= 0 and self._may_start(route):
            # Nobody waits (sync_wait 0), but a connection and a pacing slot are free: start the
            # attempt in the background now, as the scheduler would a moment later, without handing
            # the message back to the queue and claiming it again (two transactions saved).
            slot = self.pacer(route.mailbox).take()
            if slot is not None:
                self._launch(entry, self._deliver(entry, None, body), slot, counts=True)
                return self.queued_reply(entry)
        elif (wait <= 0 and not self._stopping and self.blocked(route) is None and self._ready_count < READY_MAX
              and not self._fleet_waiting(route.mailbox)
              and self.pacer(route.mailbox).available() > 0 and self._queue_idle(self.clock())):
            # Every connection busy and nothing older waiting in the queue (which must not be
            # overtaken for long): next in line when a connection frees.
            line = self._ready.setdefault(_key(route.mailbox), deque())
            line.append((entry, body if self._ready_count < READY_BODIES else None))
            self._ready_count += 1
            return self.queued_reply(entry)
        if slot is None:
            block = self.blocked(route)
            why = f"{block.kind} {block.scope} {block.name}: {block.reason}" if block is not None else None
            await asyncio.to_thread(self.spool.unclaim, entry.id, self.clock(), why)
            self.wake()
            return self.queued_reply(entry)
        waiter = _Waiter(accepted=asyncio.get_running_loop().create_future())
        assert waiter.accepted is not None
        task = self._launch(entry, self._deliver(entry, waiter, body), slot, counts=True)
        try:
            await asyncio.wait({task, waiter.accepted}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done() and not waiter.committed:
                waiter.waiting = False  # too late (or the client went away): it is the queue's now
        if waiter.accepted.done() and not waiter.accepted.cancelled():
            return waiter.accepted.result()  # the spool records the delivery in the background
        if not task.done():
            if not waiter.committed:
                return self.queued_reply(entry)
            # The attempt is writing down the refusal it owes the client: a short local step.
            await asyncio.wait({task}, timeout=30)
            if not task.done():
                # Never "250 queued" for a message that is being dropped: let the client try again.
                return "451 4.3.0 Local delay, try again later"
        if task.cancelled():
            return self.queued_reply(entry)
        return task.result()

    @staticmethod
    def queued_reply(entry: Entry) -> str:
        return f"250 2.0.0 Ok: queued as {entry.id}"

    # ------------------------------------------------------------------ one attempt

    async def _deliver(self, entry: Entry, waiter: _Waiter | None = None, body: bytes | None = None) -> str:
        """One attempt and its bookkeeping. Never raises but for cancellation (stop): a message whose
        attempt was cancelled stays ACTIVE and is due again at the next start (spool recovery)."""
        outcome: Outcome | None = None
        fleet, shared = self.fleet, None
        try:
            # Unless the listener still holds a small body: the path, not the bytes (upstream streams
            # the body from the spool file, so memory does not grow with message size).
            source = body if body is not None else self.spool.body_path(entry.id)
            if fleet is not None:  # beside the local pacer: the mailbox's minute across the fleet
                shared = await fleet.take(entry.route.mailbox, len(entry.pending_recipients))
            try:
                outcome = await self.submitter.submit(entry.route, entry.envelope, source, entry.pending_recipients)
                if fleet is not None and not outcome.delivered and outcome.verdict.code:
                    # Exchange answered with a refusal: it did not count this one in its minute either.
                    await fleet.cancel(shared)
                    shared = None
            except FleetWait:
                if fleet is not None:
                    await fleet.cancel(shared)
                shared = None
                raise
            finally:
                if fleet is not None:
                    fleet.done(shared)
            return await self._record(entry, outcome, waiter)
        except FleetWait as wait:
            return await self._fleet_wait(entry, wait)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let one message stop the scheduler; it stays in the spool
            log.error("delivery attempt crashed: %s", type(exc).__name__,
                      extra={"event": "attempt_error", "queue_id": entry.id, "error_type": type(exc).__name__})
            if outcome is not None:
                # Exchange has answered but the spool did not take the answer: keep it and write it
                # again next round (forgetting a 250 would send the message twice).
                self._unrecorded[entry.id] = (entry, outcome)
                return self.queued_reply(entry)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.spool.defer, entry.id, next_attempt_at=self.clock() + LOCAL_ERROR_RETRY,
                                        reply=f"local error: {type(exc).__name__}", reason="local_error")
            return self.queued_reply(entry)

    async def _fleet_wait(self, entry: Entry, wait: FleetWait) -> str:
        """The fleet had no room (session slots, the minute, the daily recipients): nothing was sent.
        The message goes back to the queue untouched (no attempt counted) and the mailbox waits."""
        mailbox = _key(entry.route.mailbox)
        now = self.clock()
        self._fleet_refund.add(entry.id)
        self._fleet_until[mailbox] = max(self._fleet_until.get(mailbox, 0.0), now + wait.seconds)
        if wait.reason == "recipients_per_day" and ("mailbox", mailbox) not in self.blocks:
            # Spent for the day: the mailbox waits (a hold that says why and when it frees), nothing bounces.
            verdict = Verdict(Action.HOLD, "recipients_per_day",
                              f"452 4.5.3 daily recipient budget of {mailbox} spent fleet-wide", Scope.MAILBOX,
                              hint=f"frees in {round(wait.seconds / 60)} min; Exchange allows 10,000 a day")
            self._block("hold", verdict, entry.route, until=now + wait.seconds)
        await asyncio.to_thread(self.spool.unclaim, entry.id, now + wait.seconds, f"fleet: {wait.reason}")
        self.wake()
        return self.queued_reply(entry)

    def _fleet_waiting(self, mailbox: str) -> bool:
        until = self._fleet_until.get(_key(mailbox))
        if until is None:
            return False
        if self.clock() >= until:
            del self._fleet_until[_key(mailbox)]
            return False
        return True

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
            if local is not None and local.kind == "hold" and key not in self._probes:
                self.release(*key, share=False)  # another relay's probe succeeded
        if changed:
            self._publish_holds()
            self.wake()

    async def _record(self, entry: Entry, outcome: Outcome, waiter: _Waiter | None) -> str:
        verdict = outcome.verdict
        now = self.clock()
        self.metrics.attempt(entry.route.mailbox, verdict.reason, outcome.duration)
        failed = {r: v.reply for r, v in outcome.failed.items()}
        delivered = outcome.delivered
        all_failed = {**entry.recipients_failed, **failed}
        done = set(entry.recipients_done) | set(delivered) | set(all_failed)
        pending = [r for r in entry.envelope.rcpt_tos if r not in done]
        base = {"queue_id": entry.id, "message_id": entry.message_id, "mailbox": entry.route.mailbox,
                "recipients": len(entry.envelope.rcpt_tos), "attempt": entry.attempts + 1,
                "duration_ms": round(outcome.duration * 1000), "reply": verdict.reply}

        if not pending and (delivered or entry.recipients_done):
            # Every recipient has its answer and Exchange took the message for some of them.
            reply = f"250 2.0.0 Ok: delivered as {outcome.upstream_id or entry.id} (queue id {entry.id})"
            if waiter is not None and waiter.accepted is not None and not waiter.accepted.done():
                waiter.accepted.set_result(reply)
            self.metrics.delivered(entry.route.mailbox)
            log.info("delivered", extra={"event": "delivered", **base, "upstream_id": outcome.upstream_id,
                                         "failed_recipients": len(all_failed)})
            if all_failed:
                # Keep the refused part as a dead letter: an admin sees who did not get it (and a DSN
                # can go out); ``queue requeue`` sends it to those recipients only.
                self._report_failed_recipients(entry, failed)
                first = next(iter(all_failed.values()))
                await self._kill(entry, "recipients_refused",
                                 f"refused for {len(all_failed)} of {len(entry.envelope.rcpt_tos)} recipient(s): "
                                 f"{first}", first, delivered=delivered, failed=failed, attempted=True)
            else:
                await self.committer.mark_delivered(entry.id)
            return reply

        if verdict.action is Action.FAILED and not outcome.deferred:
            self.metrics.failed(verdict.reason)
            log.warning("refused permanently by Exchange", extra={"event": "failed", **base,
                                                                  "reason": verdict.reason, "hint": verdict.hint})
            self._report_failed_recipients(entry, failed)
            untouched = not entry.recipients_done and not entry.recipients_failed
            if waiter is not None and waiter.waiting and untouched:
                # The client is still waiting: pass Exchange's refusal back and keep nothing.
                waiter.committed = True
                await asyncio.to_thread(self.spool.delete_active, entry.id)
                return _as_reply(verdict)
            await self._kill(entry, verdict.reason, f"{verdict.reason}: {verdict.reply}", verdict.reply,
                             delivered=delivered, failed=failed, attempted=True)
            return _as_reply(verdict) if waiter is not None and waiter.waiting else self.queued_reply(entry)

        # Something to try again: for all pending recipients, or only the deferred ones.
        if verdict.action is Action.HOLD:
            self._block("hold", verdict, entry.route)
        elif verdict.action is Action.RETRY and verdict.scope in (Scope.MAILBOX, Scope.APP):
            self._block("pause", verdict, entry.route)
        max_age = self.settings.delivery.max_age
        if now - entry.created_at >= max_age:
            await self._kill(entry, "expired", f"expired after {entry.attempts + 1} attempts: {verdict.reply}",
                             verdict.reply, delivered=delivered, failed=failed, attempted=True)
            return self.queued_reply(entry)
        delay = self._retry_delay(entry, verdict)
        # The last attempt happens when the message expires, not after.
        delay = max(min(delay, entry.created_at + max_age - now), 0.0)
        partial = delivered or failed
        if verdict.action is Action.DELIVERED:
            reason = f"partial: {len(pending)} recipient(s) pending"
        else:
            reason = f"{verdict.reason}: {verdict.hint}" if verdict.hint else verdict.reason
        await asyncio.to_thread(self.spool.defer, entry.id, next_attempt_at=now + delay, reply=verdict.reply,
                                delivered=delivered, failed=failed, reason=reason)
        if partial:
            self._report_failed_recipients(entry, failed)
        self.metrics.deferred(verdict.reason)
        held = verdict.action is Action.HOLD
        log.log(logging.ERROR if held else logging.INFO, "held: configuration problem" if held else "deferred",
                extra={"event": "held" if held else "deferred", **base, "reason": verdict.reason,
                       "retry_in": round(delay, 1), "hint": verdict.hint, "delivered_now": len(delivered)})
        self.wake()
        return self.queued_reply(entry)

    def _retry_delay(self, entry: Entry, verdict: Verdict) -> float:
        """What the classifier dictates (never more than ``delivery.retry.max``), else the backoff.

        A "retry at once" (5.5.127 token expiring) that follows the same reason backs off instead:
        a fresh token did not help, so hammering Exchange will not either.
        """
        retry = self.settings.delivery.retry
        after = verdict.retry_after
        previous_reason = entry.reason.split(":", 1)[0]
        if after is not None and not (after <= 0 and previous_reason == verdict.reason):
            return min(after, retry.max)
        return backoff(entry.attempts + 1, retry.first, retry.max, retry.factor, self.rng)

    def _report_failed_recipients(self, entry: Entry, failed: dict[str, str]) -> None:
        for rcpt, reply in failed.items():
            log.warning("recipient refused permanently", extra={
                "event": "recipient_failed", "queue_id": entry.id, "message_id": entry.message_id,
                "recipient": rcpt, "reply": reply})

    async def _kill(self, entry: Entry, kind: str, reason: str, reply: str, *, delivered: tuple[str, ...] = (),
                    failed: dict[str, str] | None = None, attempted: bool = False) -> None:
        """Move to dead letters. ``kind`` is a short token (metrics label), ``reason`` the whole story."""
        dead = await asyncio.to_thread(self.spool.kill, entry.id, reason, reply, delivered=delivered,
                                       failed=failed or {}, attempted=attempted)
        self.metrics.dead(kind)
        log.error("moved to dead letters", extra={"event": "dead_letter", "queue_id": entry.id,
                                                  "message_id": entry.message_id, "reason": reason})
        if self.on_dead is not None:
            try:
                result = self.on_dead(dead, reason)
                if result is not None:
                    await result
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the dead letter is recorded; a failed notice must not undo that
                log.error("dead-letter notice failed: %s", type(exc).__name__,
                          extra={"event": "dead_letter_notice_failed", "queue_id": entry.id})

    # ------------------------------------------------------------------ holds and pauses

    def _block(self, kind: str, verdict: Verdict, route: Route, until: float | None = None) -> None:
        """Hold or pause the verdict's scope. A block already in force keeps its timing: ten messages
        failing at once for one reason are one event, not ten."""
        scope = "app" if verdict.scope is Scope.APP else "mailbox"
        name = route.app if scope == "app" else _key(route.mailbox)
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
        self._publish_holds()

    def release(self, scope: str, name: str, *, share: bool = True) -> None:
        """Lift a hold or pause; the messages waiting behind it are due at once (fleet-wide unless
        ``share`` is False: the fleet already knows)."""
        if scope == "mailbox":
            name = _key(name)
        block = self.blocks.pop((scope, name), None)
        if share and self.fleet is not None:
            self.fleet.lift(scope, name)
        if block is None:
            return
        log.info(f"{scope} {name} released", extra={"event": f"{scope}_released", scope: name,
                                                    "held_seconds": round(self.clock() - block.since)})
        self._publish_holds()
        self._spawn(self._make_due(scope, name))

    async def _make_due(self, scope: str, name: str) -> None:
        def run() -> int:
            n = 0
            for entry in self.spool.list([State.QUEUED]):
                match = entry.route.app == name if scope == "app" else _key(entry.route.mailbox) == name
                if match and entry.next_attempt_at > self.clock():
                    n += self.spool.retry(entry.id)
            return n

        try:
            await asyncio.to_thread(run)
        except Exception as exc:  # they come due by their own backoff anyway
            log.warning("could not make held messages due: %s", type(exc).__name__,
                        extra={"event": "release_error", "error_type": type(exc).__name__})
        self.wake()

    def _probe_holds(self) -> None:
        """Start a probe for each hold whose probe is due (in the background: a probe may take as long
        as a connection timeout, and other mailboxes must not wait for it)."""
        now = self.clock()
        for key, block in list(self.blocks.items()):
            if block.kind != "hold" or now < block.until or key in self._probes:
                continue
            if self.probe is None:
                # No probe: lift the hold on time; the next message due is the probe (it holds again
                # if the problem is still there).
                del self.blocks[key]
                self._publish_holds()
                continue
            route = self._route_for(block)
            if route is None:  # that app or mailbox is no longer configured
                del self.blocks[key]
                continue
            task = asyncio.ensure_future(self._run_probe(key, route))
            self._probes[key] = task

    async def _run_probe(self, key: tuple[str, str], route: Route) -> None:
        assert self.probe is not None
        fleet = self.fleet
        if fleet is not None:
            block = self.blocks.get(key)
            lease = max(block.interval if block else self.probe_interval, self.settings.delivery.timeout * 2)
            if not await fleet.may_probe(*key, lease):
                # Another relay probes it (or did, and its next probe is not due): ours waits one interval.
                self._probes.pop(key, None)
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
            self._probes.pop(key, None)
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
            if (block.scope == "mailbox" and _key(mbx.address) == block.name) or (
                    block.scope == "app" and mbx.app == block.name):
                return Route(app=mbx.app, mailbox=mbx.address, sender=mbx.address)
        return None

    # ------------------------------------------------------------------ expiry

    async def _expire(self, now: float) -> None:
        """Dead-letter queued messages older than ``max_age`` that no attempt expired (held, paused)."""
        max_age = self.settings.delivery.max_age
        entries = await asyncio.to_thread(self.spool.list, [State.QUEUED])
        for entry in entries:
            if now - entry.created_at < max_age or entry.id in self._inflight:
                continue
            why = entry.last_reply or entry.reason or "never attempted"
            held = self.blocked(entry.route)
            if held is not None:
                why = f"{held.kind} of {held.scope} {held.name}: {held.reply or held.reason}"
            await self._kill(entry, "expired",
                             f"expired after {round(now - entry.created_at)} s and {entry.attempts} attempts: {why}",
                             entry.last_reply)

    # ------------------------------------------------------------------ the scheduler

    def _plan(self) -> dict[str, int]:
        """How many messages each configured mailbox can start now (not held or paused, a connection
        free, a pacing slot free). Mailboxes with nothing to give are left out."""
        plan: dict[str, int] = {}
        for mbx in self.settings.mailboxes:
            address = _key(mbx.address)
            if self.blocked(Route(app=mbx.app, mailbox=address, sender=address)) is not None:
                continue
            if self._fleet_waiting(address):
                continue
            room = min(self.connections(address) - self.busy(address), self.pacer(address).available())
            if room > 0:
                plan[address] = room
        return plan

    def _claim(self, now: float, free: int, plan: dict[str, int]) -> list[Entry]:
        """(worker thread) Claim due messages mailbox by mailbox, each up to its room."""
        configured = {_key(m.address) for m in self.settings.mailboxes}
        out: list[Entry] = []
        for mailbox, room in plan.items():
            if free <= 0:
                break
            # Leaving out every other configured mailbox also picks up messages of mailboxes that are
            # no longer configured; _start checks those one by one.
            got = self.spool.claim_due(now, min(room, free), skip_mailboxes=configured - {mailbox})
            out += got
            free -= len(got)
        return out

    async def _record_again(self) -> None:
        for id, (entry, outcome) in list(self._unrecorded.items()):
            try:
                await self._record(entry, outcome, None)
            except Exception as exc:
                log.warning("outcome still not recorded: %s", type(exc).__name__,
                            extra={"event": "record_retry_failed", "queue_id": id, "error_type": type(exc).__name__})
                return  # the spool is still unwell: try again next round
            del self._unrecorded[id]

    async def tick(self) -> float:
        """One scheduling round. Returns how long the scheduler may sleep before the next round."""
        if self._unrecorded:
            await self._record_again()
        self._probe_holds()
        now = self.clock()
        if self._ready:
            self._start_ready()
        if self._nothing_new(now):
            # Woken by a finished attempt (sync mode: every message), nothing queued is due and this
            # process changed no queued message since the last look: no need to ask the spool.
            return self._next_wake(self._next_due)
        version = self.spool.queue_version
        free = self.max_workers - len(self._inflight)
        if free > 0 and not self._stopping:
            plan = self._plan()
            if plan:
                for entry in await asyncio.to_thread(self._claim, now, free, plan):
                    self._start(entry)
        # After claiming: a message due for its last attempt gets it; what could not go expires.
        if now >= self._next_sweep:
            self._next_sweep = now + EXPIRY_SWEEP_INTERVAL
            await self._expire(now)
        self._next_due = await asyncio.to_thread(self.spool.next_due_at)
        self._seen_version, self._seen_at = version, now
        return self._next_wake(self._next_due)

    def _start_ready(self) -> None:
        """Start the waiting new messages whose mailbox has a connection free (oldest first); those
        of a mailbox now held, paused or out of pacing slots go back to the queue."""
        for mailbox, line in list(self._ready.items()):
            while line:
                entry, body = line[0]
                route = entry.route
                if not self._stopping and self.blocked(route) is None and (
                        self.busy(mailbox) >= self.connections(mailbox)):
                    break  # still no connection free for this mailbox
                line.popleft()
                self._ready_count -= 1
                slot = self.pacer(mailbox).take() if self._may_start(route) else None
                if slot is None:
                    self._launch(entry, self._requeue(entry), None, counts=False)
                else:
                    self._launch(entry, self._deliver(entry, None, body), slot, counts=True)
            if not line:
                del self._ready[mailbox]

    def _nothing_new(self, now: float) -> bool:
        """True when the spool cannot have due work we do not know of: nothing due at the last look,
        no change by this process since, and that look is less than POLL_INTERVAL old (changes by
        the queue CLI, another process, are found by that poll)."""
        return now - self._seen_at < POLL_INTERVAL and now < self._next_sweep and self._queue_idle(now)

    def _queue_idle(self, now: float) -> bool:
        """Nothing queued was due at the last look and this process has queued nothing since."""
        return self.spool.queue_version == self._seen_version and (self._next_due is None or self._next_due > now)

    def adopt(self, entry: Entry) -> None:
        """Take over an ACTIVE message that was stored after its client stopped waiting (the
        connection dropped during the final fsync): deliver it now or put it back in the queue."""
        if entry.id not in self._inflight:
            self._start(entry)

    def _may_start(self, route: Route) -> bool:
        """Not stopping, not held or paused, and a connection of the mailbox free."""
        return (not self._stopping and self.blocked(route) is None and not self._fleet_waiting(route.mailbox)
                and self.busy(route.mailbox) < self.connections(route.mailbox))

    def _start(self, entry: Entry) -> None:
        route = entry.route
        slot: int | None = None
        if self._may_start(route):
            slot = self.pacer(route.mailbox).take()
        if slot is None:
            # Claimed but cannot go now: back to the queue, untouched.
            self._launch(entry, self._requeue(entry), None, counts=False)
        else:
            self._launch(entry, self._deliver(entry), slot, counts=True)

    async def _requeue(self, entry: Entry) -> str:
        delay = self.pacer(entry.route.mailbox).delay()
        delay = max(delay, self._fleet_until.get(_key(entry.route.mailbox), 0.0) - self.clock())
        block = self.blocked(entry.route)
        why = None
        if block is not None:
            delay = max(delay, block.until - self.clock())
            why = f"{block.kind} {block.scope} {block.name}: {block.reason}"
        await asyncio.to_thread(self.spool.unclaim, entry.id, self.clock() + max(delay, 0.0), why)
        return self.queued_reply(entry)

    def _next_wake(self, next_due: float | None) -> float:
        now = self.clock()
        candidates = [POLL_INTERVAL, self._next_sweep - now]
        candidates += [b.until - now for b in self.blocks.values()]
        candidates += [t - now for t in self._fleet_until.values()]
        if next_due is not None and next_due > now:
            candidates.append(next_due - now)
        candidates += [d for p in self._pacers.values() if (d := p.delay()) > 0]
        return max(min(candidates), 0.01)

    async def run(self) -> None:
        """The scheduler loop; returns when :meth:`stop` is called."""
        self._running = True
        self._run_done.clear()
        try:
            while not self._stopping:
                self._wake.clear()
                try:
                    delay = await self.tick()
                except Exception as exc:
                    log.error("scheduler round failed: %s", type(exc).__name__,
                              extra={"event": "scheduler_error", "error_type": type(exc).__name__})
                    delay = 5.0
                if self._stopping:
                    break
                await self._idle(delay)
        finally:
            self._running = False
            self._run_done.set()

    async def _idle(self, delay: float) -> None:
        """Wait until woken or ``delay`` (by the injected sleep) has passed."""
        if self._wake.is_set():
            return
        waiter = asyncio.ensure_future(self._wake.wait())
        sleeper = asyncio.ensure_future(self.sleep(delay))
        try:
            await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()

    async def wait_idle(self) -> None:
        """Wait for the attempts in flight, running probes and background steps to end (tests that
        drive :meth:`tick` themselves; bound it with ``asyncio.timeout``)."""
        while self._inflight or self._probes or self._aux:
            pending = [f.task for f in self._inflight.values()] + list(self._probes.values()) + list(self._aux)
            await asyncio.wait(pending)

    async def stop(self, grace: float) -> None:
        """Stop scheduling; give in-flight attempts ``grace`` seconds, then abandon them (they stay
        ACTIVE in the spool and are made due again at the next start). Returns within about
        ``grace`` + 5 seconds."""
        started = time.monotonic()
        self._stopping = True
        self._wake.set()
        if self._running:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._run_done.wait(), timeout=max(grace, 0.1))
        if self._ready:
            # Not started: back to the queue (QUEUED, due now) so the queue CLI sees them as waiting.
            waiting = [entry.id for line in self._ready.values() for entry, _ in line]
            self._ready.clear()
            self._ready_count = 0
            with contextlib.suppress(Exception):
                await asyncio.to_thread(lambda: [self.spool.unclaim(id, self.clock()) for id in waiting])
        for task in [*self._probes.values(), *self._aux]:
            task.cancel()
        tasks = [f.task for f in self._inflight.values()]
        if tasks:
            left = max(grace - (time.monotonic() - started), 0.0)
            _done, pending = await asyncio.wait(tasks, timeout=left) if left > 0 else (set(), set(tasks))
            for task in pending:
                task.cancel()
            if pending:
                log.warning("abandoned deliveries in flight; they stay in the spool",
                            extra={"event": "abandoned", "count": len(pending)})
                await asyncio.wait(pending, timeout=5)
        leftovers = [*self._probes.values(), *self._aux]
        if leftovers:
            await asyncio.wait(leftovers, timeout=1)


def _as_reply(verdict: Verdict) -> str:
    """Exchange's refusal as an SMTP reply line for our client."""
    code = verdict.code if verdict.code and 500 <= verdict.code < 600 else 554
    text = verdict.reply
    if text.startswith(str(code)):
        text = text[3:].strip()
    if not verdict.enhanced and not text[:1].isdigit():
        text = f"5.0.0 {text}"
    return f"{code} {text}"[:510]
