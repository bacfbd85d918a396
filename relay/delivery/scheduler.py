"""The scheduler: pick due messages, start each within its mailbox's room, serve the immediate attempt.

The spool is the truth: every decision is written there before it counts, so the process can die at
any line and the next start carries on. In memory we only keep what may be lost: pacing windows,
holds and pauses (recomputed by probing), and the tasks in flight.

- **Pacing** (relay.delivery.pacing): a mailbox's messages are claimed only while it has a connection and a
  pacing slot free; a burst waits in the spool, not in memory.
- **Holds and pauses** (relay.delivery.holds): nothing is attempted for a held or paused app or mailbox.
- **Attempts** (relay.delivery.attempt): one submission and its bookkeeping; what follows an outcome is the
  pure function relay.delivery.decision.decide, carried out there (spool, metrics, logs, the waiting client).
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
from typing import Any

from relay.config import Settings
from relay.delivery.attempt import Attempts, SubmitsMessages, Waiter, queued_reply
from relay.delivery.holds import Holds, Probe
from relay.delivery.pacing import MailboxPacing, mailbox_key
from relay.envelope import Route
from relay.fleet import Fleet
from relay.observability import Metrics
from relay.queue.committer import GroupCommitter
from relay.queue.spool import Entry, Spool

log = logging.getLogger("relay.delivery")

#: How often queued messages are checked against ``delivery.max_age`` (also those never attempted,
#: e.g. behind a hold that nobody fixes).
EXPIRY_SWEEP_INTERVAL = 60.0
#: The scheduler looks at the spool at least this often: the queue CLI (another process) may have made
#: something due without telling us.
POLL_INTERVAL = 1.0
#: At most this many new messages wait in memory for a connection (see Delivery._ready), enough for a
#: burst of several seconds; more go through the queue. Only the first READY_BODIES keep their body
#: in memory (at most 64 KiB each, relay.service.KEEP_IN_MEMORY); the others are read from the spool.
READY_MAX = 1024
READY_BODIES = 128

Sleep = Callable[[float], Awaitable[Any]]


@dataclass
class _Flight:
    task: asyncio.Task[Any]
    mailbox: str
    slot: int | None = None


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
        probe: Probe | None = None,
        probe_interval: float | None = None,
        max_workers: int = 32,
        committer: GroupCommitter | None = None,
    ) -> None:
        self.clock = clock
        #: per mailbox: limits, pacing windows, connections in use, fleet waits (relay.delivery.pacing)
        self.pacing = MailboxPacing(settings, clock)
        #: holds and pauses of apps and mailboxes, and the probes that lift holds (relay.delivery.holds)
        self.held = Holds(settings, spool, metrics, clock, wake=self.wake, spawn=self._spawn,
                          probe=probe, probe_interval=probe_interval)
        #: one attempt and its bookkeeping (relay.delivery.attempt); deliveries are recorded in groups by the
        #: committer (shared with the listener's stores when the service wires it)
        self.attempts = Attempts(settings, spool, submitter, metrics, committer=committer or GroupCommitter(spool),
                                 clock=clock, rng=rng or random.Random(), pacing=self.pacing, held=self.held,
                                 wake=self.wake)
        self.settings = settings
        self.spool = spool
        self.sleep: Sleep = sleep or asyncio.sleep
        self.max_workers = max_workers
        self._inflight: dict[str, _Flight] = {}
        self._aux: set[asyncio.Task[Any]] = set()
        #: New messages (ACTIVE, with their body if the listener kept it) that nobody waits for and
        #: that only wait for a connection of their mailbox: started when one frees, without a round
        #: trip through the queue (unclaim, then claim). Bounded; a crash leaves them ACTIVE, which
        #: spool recovery makes due again at the next start.
        self._ready: dict[str, deque[tuple[Entry, bytes | None]]] = {}  # per mailbox (lower case), oldest first
        self._ready_count = 0
        self._wake = asyncio.Event()
        self._stopping = False
        self._running = False
        self._run_done = asyncio.Event()
        self._next_sweep = 0.0
        # What the last look at the spool found: the queue's version then, when, and the next due time.
        self._seen_version = -1
        self._seen_at = float("-inf")
        self._next_due: float | None = None

    # ------------------------------------------------------------------ helpers

    @property
    def settings(self) -> Settings:
        return self._settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        """A reload: pacing and holds follow (the per-mailbox limits are looked up again)."""
        self._settings = self.pacing.settings = self.held.settings = self.attempts.settings = settings

    @property
    def fleet(self) -> Fleet | None:
        """Optional: the limits each mailbox shares with other relays (relay.fleet). None: this relay
        alone enforces them, as without ``fleet:`` in the config."""
        return self.pacing.fleet

    @fleet.setter
    def fleet(self, fleet: Fleet | None) -> None:
        self.pacing.fleet = self.held.fleet = fleet

    def idle(self) -> bool:
        """Nothing in flight, no probe running, no wake-up pending (tests driving a fake clock)."""
        return not (self._inflight or self.held.probes or self._aux or self.attempts.unrecorded or self._wake.is_set())

    def wake(self) -> None:
        self._wake.set()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._aux.add(task)
        task.add_done_callback(self._aux.discard)

    def _launch(self, entry: Entry, coro: Awaitable[str], slot: int | None, *, counts: bool) -> asyncio.Task[str]:
        """Start ``coro`` for ``entry``: tracked (for stop) and, when ``counts``, holding a connection
        of its mailbox and a pacing ``slot`` until it ends, however it ends."""
        mailbox = mailbox_key(entry.route.mailbox)
        task: asyncio.Task[str] = asyncio.ensure_future(coro)
        self._inflight[entry.id] = _Flight(task, mailbox, slot)
        if counts:
            self.pacing.started(mailbox)

        def finished(_: asyncio.Task[str]) -> None:
            if self._inflight.get(entry.id) is not None and self._inflight[entry.id].task is task:
                del self._inflight[entry.id]
            if counts:
                self.pacing.ended(mailbox, slot, entry.id)
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
        if (wait > 0 and not self._stopping and self.held.blocked(route) is None
                and not self.pacing.fleet_waiting(route.mailbox)):
            slot = self.pacing.pacer(route.mailbox).take()
        elif wait <= 0 and self._may_start(route):
            # Nobody waits (sync_wait 0), but a connection and a pacing slot are free: start the
            # attempt in the background now, as the scheduler would a moment later, without handing
            # the message back to the queue and claiming it again (two transactions saved).
            slot = self.pacing.pacer(route.mailbox).take()
            if slot is not None:
                self._launch(entry, self.attempts.attempt(entry, None, body), slot, counts=True)
                return queued_reply(entry)
        elif (wait <= 0 and not self._stopping and self.held.blocked(route) is None and self._ready_count < READY_MAX
              and not self.pacing.fleet_waiting(route.mailbox)
              and self.pacing.pacer(route.mailbox).available() > 0 and self._queue_idle(self.clock())):
            # Every connection busy and nothing older waiting in the queue (which must not be
            # overtaken for long): next in line when a connection frees.
            line = self._ready.setdefault(mailbox_key(route.mailbox), deque())
            line.append((entry, body if self._ready_count < READY_BODIES else None))
            self._ready_count += 1
            return queued_reply(entry)
        if slot is None:
            block = self.held.blocked(route)
            why = f"{block.kind} {block.scope} {block.name}: {block.reason}" if block is not None else None
            await asyncio.to_thread(self.spool.unclaim, entry.id, self.clock(), why)
            self.wake()
            return queued_reply(entry)
        waiter = Waiter(accepted=asyncio.get_running_loop().create_future())
        assert waiter.accepted is not None
        task = self._launch(entry, self.attempts.attempt(entry, waiter, body), slot, counts=True)
        try:
            await asyncio.wait({task, waiter.accepted}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done() and not waiter.committed:
                waiter.waiting = False  # too late (or the client went away): it is the queue's now
        if waiter.accepted.done() and not waiter.accepted.cancelled():
            return waiter.accepted.result()  # the spool records the delivery in the background
        if not task.done():
            if not waiter.committed:
                return queued_reply(entry)
            # The attempt is writing down the refusal it owes the client: a short local step.
            await asyncio.wait({task}, timeout=30)
            if not task.done():
                # Never "250 queued" for a message that is being dropped: let the client try again.
                return "451 4.3.0 Local delay, try again later"
        if task.cancelled():
            return queued_reply(entry)
        return task.result()

    # ------------------------------------------------------------------ the scheduler

    def _plan(self) -> dict[str, int]:
        """How many messages each configured mailbox can start now (not held or paused, a connection
        free, a pacing slot free). Mailboxes with nothing to give are left out."""
        plan: dict[str, int] = {}
        for mbx in self.settings.mailboxes:
            address = mailbox_key(mbx.address)
            if self.held.blocked(Route(app=mbx.app, mailbox=address, sender=address)) is not None:
                continue
            if self.pacing.fleet_waiting(address):
                continue
            free = self.pacing.connections(address) - self.pacing.busy(address)
            room = min(free, self.pacing.pacer(address).available())
            if room > 0:
                plan[address] = room
        return plan

    def _claim(self, now: float, free: int, plan: dict[str, int]) -> list[Entry]:
        """(worker thread) Claim due messages mailbox by mailbox, each up to its room."""
        configured = {mailbox_key(m.address) for m in self.settings.mailboxes}
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

    async def tick(self) -> float:
        """One scheduling round. Returns how long the scheduler may sleep before the next round."""
        if self.attempts.unrecorded:
            await self.attempts.record_again()
        self.held.probe_due()
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
            await self.attempts.expire(now, self._inflight)
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
                if not self._stopping and self.held.blocked(route) is None and (
                        self.pacing.busy(mailbox) >= self.pacing.connections(mailbox)):
                    break  # still no connection free for this mailbox
                line.popleft()
                self._ready_count -= 1
                slot = self.pacing.pacer(mailbox).take() if self._may_start(route) else None
                if slot is None:
                    self._launch(entry, self._requeue(entry), None, counts=False)
                else:
                    self._launch(entry, self.attempts.attempt(entry, None, body), slot, counts=True)
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
        return (not self._stopping and self.held.blocked(route) is None and not self.pacing.fleet_waiting(route.mailbox)
                and self.pacing.busy(route.mailbox) < self.pacing.connections(route.mailbox))

    def _start(self, entry: Entry) -> None:
        route = entry.route
        slot: int | None = None
        if self._may_start(route):
            slot = self.pacing.pacer(route.mailbox).take()
        if slot is None:
            # Claimed but cannot go now: back to the queue, untouched.
            self._launch(entry, self._requeue(entry), None, counts=False)
        else:
            self._launch(entry, self.attempts.attempt(entry), slot, counts=True)

    async def _requeue(self, entry: Entry) -> str:
        delay = self.pacing.pacer(entry.route.mailbox).delay()
        delay = max(delay, self.pacing.fleet_until(entry.route.mailbox) - self.clock())
        block = self.held.blocked(entry.route)
        why = None
        if block is not None:
            delay = max(delay, block.until - self.clock())
            why = f"{block.kind} {block.scope} {block.name}: {block.reason}"
        await asyncio.to_thread(self.spool.unclaim, entry.id, self.clock() + max(delay, 0.0), why)
        return queued_reply(entry)

    def _next_wake(self, next_due: float | None) -> float:
        now = self.clock()
        candidates = [POLL_INTERVAL, self._next_sweep - now]
        candidates += self.held.waits(now)
        if next_due is not None and next_due > now:
            candidates.append(next_due - now)
        candidates += self.pacing.waits(now)
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
        while self._inflight or self.held.probes or self._aux:
            pending = [f.task for f in self._inflight.values()] + list(self.held.probes.values()) + list(self._aux)
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
        for task in [*self.held.probes.values(), *self._aux]:
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
        leftovers = [*self.held.probes.values(), *self._aux]
        if leftovers:
            await asyncio.wait(leftovers, timeout=1)
