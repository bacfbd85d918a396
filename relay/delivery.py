"""Scheduler and workers: pick due messages, pace them per mailbox, classify outcomes, retry or fail.

The spool is the truth: every decision is written there before it counts, so the process can die at
any line and the next start carries on. In memory we only keep what may be lost: pacing windows,
holds and pauses (recomputed by probing), and the tasks in flight.

- **Pacing**: at most ``per_minute`` submissions per mailbox in any 60 s window (Exchange allows 30),
  and at most ``connections`` sessions per mailbox (the upstream pool enforces that).
- **Holds**: a configuration problem (535 5.7.3, 5.7.139, AADSTS invalid secret...) holds the mailbox
  or the whole app: nothing is attempted (so nothing bounces and Exchange does not throttle us for
  repeated errors); a cheap probe (token + AUTH, no message) runs every ``probe`` interval and lifts
  the hold as soon as the admin's fix works.
- **Pauses**: transient trouble that concerns everything behind an app or mailbox (token endpoint down,
  432 concurrent-connection limit, sender throttled) pauses it for a backoff instead of letting every
  queued message fail one by one.
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

from relay.classify import Action, Scope, Verdict
from relay.config import Settings
from relay.envelope import Route
from relay.observability import Metrics
from relay.spool import Entry, Spool
from relay.upstream import Outcome, Submitter

log = logging.getLogger("relay.delivery")

_PROBE_FIRST = 30.0
_PROBE_MAX = 600.0
_PAUSE_FIRST = 15.0
_PAUSE_MAX = 600.0


#: Pacing window. Exchange counts submissions when it accepts them, we when we start them; one extra
#: second keeps a message that took a while to submit from landing inside Exchange's previous minute.
PACING_WINDOW = 61.0


class Pacer:
    """At most ``per_minute`` events in any :data:`PACING_WINDOW` (0 = unlimited). Injectable clock."""

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._sent: deque[float] = deque()

    def delay(self) -> float:
        """Seconds until a submission may start (0 = now)."""
        if self.per_minute <= 0:
            return 0.0
        now = self._clock()
        while self._sent and self._sent[0] <= now - PACING_WINDOW:
            self._sent.popleft()
        if len(self._sent) < self.per_minute:
            return 0.0
        return self._sent[0] + PACING_WINDOW - now

    def take(self) -> bool:
        """Reserve a slot now if one is free."""
        if self.delay() > 0:
            return False
        if self.per_minute > 0:
            self._sent.append(self._clock())
        return True


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


def backoff(attempts: int, first: float, maximum: float, factor: float, rng: random.Random) -> float:
    """Exponential backoff with +-20 % jitter: first, first*factor, ... capped at maximum."""
    base = min(first * factor ** max(attempts - 1, 0), maximum)
    return base * rng.uniform(0.8, 1.2)


class Delivery:
    """Delivers spooled messages; also serves the listener's immediate (sync) attempt."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        submitter: Submitter,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        probe: Callable[[Route], Awaitable[Verdict]] | None = None,
        max_workers: int = 32,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.submitter = submitter
        self.metrics = metrics
        self.clock = clock
        self.rng = rng or random.Random()
        self.max_workers = max_workers
        self.probe: Callable[[Route], Awaitable[Verdict]] | None = probe
        self.blocks: dict[tuple[str, str], Block] = {}
        self._pacers: dict[str, Pacer] = {}
        self._inflight: dict[str, asyncio.Task[Any]] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self.on_dead: Callable[[Entry, str], asyncio.Future[None] | None] | None = None

    # ------------------------------------------------------------------ helpers

    def pacer(self, mailbox: str) -> Pacer:
        pacer = self._pacers.get(mailbox)
        if pacer is None:
            mbx = self.settings.mailbox(mailbox)
            per_minute = self.settings.mailbox_per_minute(mbx) if mbx else self.settings.delivery.per_mailbox.per_minute
            pacer = self._pacers[mailbox] = Pacer(per_minute, self.clock)
        return pacer

    def blocked(self, route: Route) -> Block | None:
        for key in (("app", route.app), ("mailbox", route.mailbox)):
            block = self.blocks.get(key)
            if block is not None:
                if block.kind == "pause" and self.clock() >= block.until:
                    del self.blocks[key]
                    continue
                return block
        return None

    def holds(self) -> list[Block]:
        return [b for b in self.blocks.values() if b.kind == "hold"]

    def _track(self, queue_id: str, task: asyncio.Task[Any]) -> None:
        self._inflight[queue_id] = task

        def forget(_: asyncio.Task[Any]) -> None:
            self._inflight.pop(queue_id, None)

        task.add_done_callback(forget)

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ the sync path

    async def deliver_now(self, entry: Entry, wait: float) -> str:
        """The listener's immediate attempt for a message stored as ACTIVE. Returns the SMTP reply.

        If Exchange has not answered within ``wait`` seconds the attempt goes on in the background
        and the client hears ``250 queued``; the outcome is recorded when it comes.
        """
        route = entry.route
        if wait <= 0 or self.blocked(route) is not None or not self.pacer(route.mailbox).take():
            await asyncio.to_thread(self.spool.unclaim, entry.id, self.clock())
            self.wake()
            return self.queued_reply(entry)
        task = asyncio.get_running_loop().create_task(self._attempt(entry, sync=True))
        done, _ = await asyncio.wait({task}, timeout=wait)
        if not done:
            self._track(entry.id, task)
            return self.queued_reply(entry)
        return task.result()

    @staticmethod
    def queued_reply(entry: Entry) -> str:
        return f"250 2.0.0 Ok: queued as {entry.id}"

    # ------------------------------------------------------------------ one attempt

    async def _attempt(self, entry: Entry, *, sync: bool) -> str:
        body = await asyncio.to_thread(self.spool.body_path(entry.id).read_bytes)
        outcome = await self.submitter.submit(entry.route, entry.envelope, body, entry.pending_recipients)
        return await self._record(entry, outcome, sync=sync)

    async def _record(self, entry: Entry, outcome: Outcome, *, sync: bool) -> str:
        verdict = outcome.verdict
        now = self.clock()
        self.metrics.attempt(entry.route.mailbox, verdict.reason, outcome.duration)
        failed = {r: v.reply for r, v in outcome.failed.items()}
        delivered = outcome.delivered
        done = set(entry.recipients_done) | set(delivered) | set(failed) | set(entry.recipients_failed)
        all_done = all(r in done for r in entry.envelope.rcpt_tos)
        base = {"queue_id": entry.id, "message_id": entry.message_id, "mailbox": entry.route.mailbox,
                "recipients": len(entry.envelope.rcpt_tos), "attempt": entry.attempts + 1,
                "duration_ms": round(outcome.duration * 1000), "reply": verdict.reply}

        if delivered and all_done:
            await asyncio.to_thread(self.spool.mark_delivered, entry.id, verdict.reply)
            self.metrics.delivered(entry.route.mailbox)
            log.info("delivered", extra={"event": "delivered", **base, "upstream_id": outcome.upstream_id,
                                         "failed_recipients": len(failed)})
            if failed:
                self._report_failed_recipients(entry, failed)
            return f"250 2.0.0 Ok: delivered as {outcome.upstream_id or entry.id} (queue id {entry.id})"

        if verdict.action is Action.FAILED and not outcome.deferred and not delivered:
            reason = f"{verdict.reason}: {verdict.reply}"
            self.metrics.failed(verdict.reason)
            log.warning("refused permanently by Exchange", extra={"event": "failed", **base,
                                                                  "reason": verdict.reason, "hint": verdict.hint})
            if sync and not entry.recipients_done:
                # The client is still waiting: pass Exchange's refusal back and keep nothing.
                await asyncio.to_thread(self.spool.delete_active, entry.id)
                return _as_reply(verdict)
            await self._kill(entry, reason, verdict.reply)
            return _as_reply(verdict)

        # Something to try again: for all pending recipients, or only the deferred ones.
        if verdict.action is Action.HOLD:
            self._block("hold", verdict, entry.route)
        elif verdict.reason in {"token_unavailable", "throttled_connections", "sender_throttled",
                                "rate_limited"}:
            self._block("pause", verdict, entry.route)
        if now - entry.created_at >= self.settings.delivery.max_age:
            await self._kill(entry, f"expired after {entry.attempts + 1} attempts: {verdict.reply}",
                             verdict.reply, delivered=delivered, failed=failed)
            return self.queued_reply(entry)
        delay = verdict.retry_after
        if delay is None:
            retry = self.settings.delivery.retry
            delay = backoff(entry.attempts + 1, retry.first, retry.max, retry.factor, self.rng)
        await asyncio.to_thread(self.spool.defer, entry.id, next_attempt_at=now + delay, reply=verdict.reply,
                                delivered=delivered, failed=failed,
                                reason=verdict.hint if verdict.action is Action.HOLD else verdict.reason)
        self.metrics.deferred(verdict.reason)
        level = logging.ERROR if verdict.action is Action.HOLD else logging.INFO
        log.log(level, "held: configuration problem" if verdict.action is Action.HOLD else "deferred",
                extra={"event": "held" if verdict.action is Action.HOLD else "deferred", **base,
                       "reason": verdict.reason, "retry_in": round(delay), "hint": verdict.hint})
        self.wake()
        return self.queued_reply(entry)

    def _report_failed_recipients(self, entry: Entry, failed: dict[str, str]) -> None:
        for rcpt, reply in failed.items():
            log.warning("recipient refused permanently", extra={
                "event": "recipient_failed", "queue_id": entry.id, "message_id": entry.message_id,
                "recipient": rcpt, "reply": reply})

    async def _kill(self, entry: Entry, reason: str, reply: str, *, delivered: tuple[str, ...] = (),
                    failed: dict[str, str] | None = None) -> None:
        dead = await asyncio.to_thread(self.spool.kill, entry.id, reason, reply, delivered=delivered,
                                       failed=failed or {})
        self.metrics.dead(reason.split(":", 1)[0])
        log.error("moved to dead letters", extra={"event": "dead_letter", "queue_id": entry.id,
                                                  "message_id": entry.message_id, "reason": reason})
        if self.on_dead is not None:
            result = self.on_dead(dead, reason)
            if result is not None:
                await result

    def _block(self, kind: str, verdict: Verdict, route: Route) -> None:
        scope = "app" if verdict.scope is Scope.APP else "mailbox"
        name = route.app if scope == "app" else route.mailbox
        key = (scope, name)
        now = self.clock()
        previous = self.blocks.get(key)
        if kind == "hold":
            interval = _PROBE_FIRST if previous is None else min(previous.interval * 2, _PROBE_MAX)
        else:
            first = verdict.retry_after or _PAUSE_FIRST
            interval = first if previous is None else min(max(previous.interval * 2, first), _PAUSE_MAX)
        if previous is None or previous.kind != kind:
            level = logging.ERROR if kind == "hold" else logging.WARNING
            log.log(level, f"{scope} {name} {'on hold' if kind == 'hold' else 'paused'}: {verdict.reason}", extra={
                "event": f"{scope}_{kind}", scope: name, "reason": verdict.reason, "reply": verdict.reply,
                "hint": verdict.hint})
        self.blocks[key] = Block(kind=kind, scope=scope, name=name, reason=verdict.reason, reply=verdict.reply,
                                 hint=verdict.hint, since=previous.since if previous else now,
                                 until=now + interval, interval=interval)
        self.metrics.set_holds(len(self.holds()))

    def release(self, scope: str, name: str) -> None:
        block = self.blocks.pop((scope, name), None)
        if block is not None:
            log.info(f"{scope} {name} released", extra={"event": f"{scope}_released", scope: name,
                                                        "held_seconds": round(self.clock() - block.since)})
            self.metrics.set_holds(len(self.holds()))
            self.wake()

    async def _probe_holds(self) -> None:
        """Probe each hold whose probe is due; lift it when the probe passes."""
        if self.probe is None:
            return
        for key, block in list(self.blocks.items()):
            if block.kind != "hold" or self.clock() < block.until:
                continue
            route = self._route_for(block)
            if route is None:
                self.blocks.pop(key, None)
                continue
            verdict = await self.probe(route)
            if verdict.action is Action.DELIVERED:
                self.release(block.scope, block.name)
            else:
                self._block("hold", verdict, route)

    def _route_for(self, block: Block) -> Route | None:
        for mbx in self.settings.mailboxes:
            if (block.scope == "mailbox" and mbx.address == block.name) or (
                    block.scope == "app" and mbx.app == block.name):
                return Route(app=mbx.app, mailbox=mbx.address, sender=mbx.address)
        return None

    # ------------------------------------------------------------------ the scheduler

    def _skip(self) -> set[str]:
        """Mailboxes that cannot take a message right now (held, paused, paced, busy)."""
        skip: set[str] = set()
        for mbx in self.settings.mailboxes:
            route = Route(app=mbx.app, mailbox=mbx.address, sender=mbx.address)
            if self.blocked(route) is not None or self.pacer(mbx.address).delay() > 0:
                skip.add(mbx.address)
        return skip

    async def tick(self) -> float:
        """One scheduling round. Returns how long the scheduler may sleep before the next round."""
        await self._probe_holds()
        free = self.max_workers - len(self._inflight)
        if free > 0:
            skip = self._skip()
            entries = await asyncio.to_thread(self.spool.claim_due, self.clock(), free, skip_mailboxes=skip)
            for entry in entries:
                self._start(entry)
        return self._next_wake()

    def _start(self, entry: Entry) -> None:
        route = entry.route
        block = self.blocked(route)
        pacer = self.pacer(route.mailbox)
        if block is not None or not pacer.take():
            # Claimed but cannot go now (several due for one mailbox): back to the queue, untouched.
            task = asyncio.get_running_loop().create_task(self._requeue(entry))
        else:
            task = asyncio.get_running_loop().create_task(self._run(entry))
        self._track(entry.id, task)

    async def _requeue(self, entry: Entry) -> None:
        delay = self.pacer(entry.route.mailbox).delay()
        block = self.blocked(entry.route)
        if block is not None:
            delay = max(delay, block.until - self.clock())
        await asyncio.to_thread(self.spool.unclaim, entry.id, self.clock() + max(delay, 0.0))

    async def _run(self, entry: Entry) -> None:
        try:
            await self._attempt(entry, sync=False)
        except Exception as exc:  # never let one message stop the scheduler; it stays in the spool
            log.error("delivery attempt crashed: %s", type(exc).__name__,
                      extra={"event": "attempt_error", "queue_id": entry.id, "error_type": type(exc).__name__})
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.spool.defer, entry.id, next_attempt_at=self.clock() + 60.0,
                                        reply=f"local error: {type(exc).__name__}")
        finally:
            self.wake()

    def _next_wake(self) -> float:
        now = self.clock()
        candidates = [1.0]
        candidates += [b.until - now for b in self.blocks.values()]
        return max(min(candidates), 0.01)

    async def run(self) -> None:
        """The scheduler loop; returns when :meth:`stop` is called."""
        while not self._stopping:
            try:
                sleep = await self.tick()
            except Exception as exc:
                log.error("scheduler round failed: %s", type(exc).__name__,
                          extra={"event": "scheduler_error", "error_type": type(exc).__name__})
                sleep = 5.0
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=sleep)

    async def stop(self, grace: float) -> None:
        """Stop scheduling; give in-flight attempts ``grace`` seconds, then abandon them (they stay
        ACTIVE in the spool and are made due again at the next start)."""
        self._stopping = True
        self._wake.set()
        tasks = list(self._inflight.values())
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)


def _as_reply(verdict: Verdict) -> str:
    """Exchange's refusal as an SMTP reply line for our client."""
    code = verdict.code if verdict.code and 500 <= verdict.code < 600 else 554
    text = verdict.reply
    if text.startswith(str(code)):
        text = text[3:].strip()
    if not verdict.enhanced and not text[:1].isdigit():
        text = f"5.0.0 {text}"
    return f"{code} {text}"[:510]

