"""One delivery attempt and what it leaves behind: spool writes, metrics, logs, the waiting client.

:meth:`Attempts.attempt` submits a message (with the fleet's check beside the local pacer) and
:meth:`Attempts.record` carries out what :func:`relay.delivery.decision.decide` says about the outcome. The
spool is the truth: every outcome is written there before it counts; one the spool could not take
(disk full...) is kept in memory and written again each round, so a message Exchange accepted is not
sent again. Dead letters (refused, expired) go through :meth:`Attempts.kill`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from relay.config import Settings
from relay.delivery.classify import Action, Outcome, Scope, Verdict
from relay.delivery.decision import DeadLetter, Decision, Step, backoff, decide
from relay.delivery.holds import Holds
from relay.delivery.pacing import MailboxPacing, mailbox_key
from relay.envelope import Envelope, Route
from relay.fleet import FleetWait
from relay.observability import Metrics
from relay.queue.committer import GroupCommitter
from relay.queue.spool import Entry, Spool, State

log = logging.getLogger("relay.delivery")

#: Retry delay after a local error (e.g. the body could not be read).
LOCAL_ERROR_RETRY = 60.0


class SubmitsMessages(Protocol):
    """What the scheduler needs from :class:`relay.microsoft.upstream.Submitter` (tests pass a fake)."""

    async def submit(self, route: Route, envelope: Envelope, body: bytes | Path,
                     recipients: tuple[str, ...] | None = None) -> Outcome: ...


@dataclass
class Waiter:
    """The listener's client waiting for a sync attempt. ``committed``: the attempt has decided to hand
    the client Exchange's permanent refusal and keep nothing, so the client must get that answer."""

    waiting: bool = True
    committed: bool = False
    #: set as soon as Exchange accepted the message: the client may have its 250 before the spool
    #: has recorded the delivery (invariant 1: a 2xx means fsync'd *or* accepted by Exchange).
    accepted: asyncio.Future[str] | None = None


def queued_reply(entry: Entry) -> str:
    return f"250 2.0.0 Ok: queued as {entry.id}"


class Attempts:
    """Runs attempts and records their outcomes. ``wake`` tells the scheduler something changed."""

    def __init__(self, settings: Settings, spool: Spool, submitter: SubmitsMessages, metrics: Metrics, *,
                 committer: GroupCommitter, clock: Callable[[], float], rng: random.Random,
                 pacing: MailboxPacing, held: Holds, wake: Callable[[], None]) -> None:
        self.settings = settings
        self.spool = spool
        self.submitter = submitter
        self.metrics = metrics
        self.committer = committer
        self.clock = clock
        self.rng = rng
        self.pacing = pacing
        self.held = held
        self.wake = wake
        #: Outcomes the spool could not take (disk full...): written again each round until it does,
        #: so a message Exchange accepted is not sent again. Those messages stay ACTIVE meanwhile.
        self.unrecorded: dict[str, tuple[Entry, Outcome]] = {}
        self.on_dead: Callable[[Entry, str], Awaitable[None] | None] | None = None

    async def attempt(self, entry: Entry, waiter: Waiter | None = None, body: bytes | None = None) -> str:
        """One attempt and its bookkeeping. Never raises but for cancellation (stop): a message whose
        attempt was cancelled stays ACTIVE and is due again at the next start (spool recovery)."""
        outcome: Outcome | None = None
        fleet, shared = self.pacing.fleet, None
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
            return await self.record(entry, outcome, waiter)
        except FleetWait as wait:
            return await self.fleet_wait(entry, wait)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let one message stop the scheduler; it stays in the spool
            log.error("delivery attempt crashed: %s", type(exc).__name__,
                      extra={"event": "attempt_error", "queue_id": entry.id, "error_type": type(exc).__name__})
            if outcome is not None:
                # Exchange has answered but the spool did not take the answer: keep it and write it
                # again next round (forgetting a 250 would send the message twice).
                self.unrecorded[entry.id] = (entry, outcome)
                return queued_reply(entry)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.spool.defer, entry.id, next_attempt_at=self.clock() + LOCAL_ERROR_RETRY,
                                        reply=f"local error: {type(exc).__name__}", reason="local_error")
            return queued_reply(entry)

    async def fleet_wait(self, entry: Entry, wait: FleetWait) -> str:
        """The fleet had no room (session slots, the minute, the daily recipients): nothing was sent.
        The message goes back to the queue untouched (no attempt counted) and the mailbox waits."""
        mailbox = mailbox_key(entry.route.mailbox)
        now = self.clock()
        self.pacing.fleet_wait(mailbox, entry.id, now + wait.seconds)
        if wait.reason == "recipients_per_day" and ("mailbox", mailbox) not in self.held.blocks:
            # Spent for the day: the mailbox waits (a hold that says why and when it frees), nothing bounces.
            verdict = Verdict(Action.HOLD, "recipients_per_day",
                              f"452 4.5.3 daily recipient budget of {mailbox} spent fleet-wide", Scope.MAILBOX,
                              hint=f"frees in {round(wait.seconds / 60)} min; Exchange allows 10,000 a day")
            self.held.block("hold", verdict, entry.route, until=now + wait.seconds)
        await asyncio.to_thread(self.spool.unclaim, entry.id, now + wait.seconds, f"fleet: {wait.reason}")
        self.wake()
        return queued_reply(entry)

    async def record(self, entry: Entry, outcome: Outcome, waiter: Waiter | None) -> str:
        """Carry out what :func:`~relay.delivery.decision.decide` says: spool writes, metrics, logs,
        the waiting client."""
        verdict = outcome.verdict
        now = self.clock()
        self.metrics.attempt(entry.route.mailbox, verdict.reason, outcome.duration)
        decision = decide(entry, outcome, now, self.settings, client_waiting=waiter is not None and waiter.waiting,
                          jittered=self._backoff)
        base = {"queue_id": entry.id, "message_id": entry.message_id, "mailbox": entry.route.mailbox,
                "recipients": len(entry.envelope.rcpt_tos), "attempt": entry.attempts + 1,
                "duration_ms": round(outcome.duration * 1000), "reply": verdict.reply}
        if decision.step is Step.DELIVERED:
            return await self._record_delivered(entry, outcome, decision, waiter, base)
        if decision.step in (Step.HAND_BACK, Step.FAIL):
            return await self._record_failed(entry, outcome, decision, waiter, base)
        # Something to try again: for all pending recipients, or only the deferred ones.
        if decision.block is not None:
            self.held.block(decision.block, verdict, entry.route)
        if decision.dead is not None:  # expired
            await self.kill(entry, decision.dead, delivered=outcome.delivered, failed=decision.failed, attempted=True)
            return queued_reply(entry)
        await asyncio.to_thread(self.spool.defer, entry.id, next_attempt_at=now + decision.delay, reply=verdict.reply,
                                delivered=outcome.delivered, failed=decision.failed, reason=decision.reason)
        if outcome.delivered or decision.failed:
            self._report_failed_recipients(entry, decision.failed)
        self.metrics.deferred(verdict.reason)
        held = verdict.action is Action.HOLD
        log.log(logging.ERROR if held else logging.INFO, "held: configuration problem" if held else "deferred",
                extra={"event": "held" if held else "deferred", **base, "reason": verdict.reason,
                       "retry_in": round(decision.delay, 1), "hint": verdict.hint,
                       "delivered_now": len(outcome.delivered)})
        self.wake()
        return queued_reply(entry)

    async def _record_delivered(self, entry: Entry, outcome: Outcome, decision: Decision, waiter: Waiter | None,
                                base: dict[str, Any]) -> str:
        """Every recipient has its answer and Exchange took the message for some of them."""
        reply = f"250 2.0.0 Ok: delivered as {outcome.upstream_id or entry.id} (queue id {entry.id})"
        if waiter is not None and waiter.accepted is not None and not waiter.accepted.done():
            waiter.accepted.set_result(reply)
        self.metrics.delivered(entry.route.mailbox)
        log.info("delivered", extra={"event": "delivered", **base, "upstream_id": outcome.upstream_id,
                                     "failed_recipients": len({**entry.recipients_failed, **decision.failed})})
        if decision.dead is not None:
            # Keep the refused part as a dead letter: an admin sees who did not get it (and a DSN
            # can go out); ``queue requeue`` sends it to those recipients only.
            self._report_failed_recipients(entry, decision.failed)
            await self.kill(entry, decision.dead, delivered=outcome.delivered, failed=decision.failed, attempted=True)
        else:
            await self.committer.mark_delivered(entry.id)
        return reply

    async def _record_failed(self, entry: Entry, outcome: Outcome, decision: Decision, waiter: Waiter | None,
                             base: dict[str, Any]) -> str:
        """Refused permanently by Exchange: back to the waiting client, or a dead letter."""
        verdict = outcome.verdict
        self.metrics.failed(verdict.reason)
        log.warning("refused permanently by Exchange", extra={"event": "failed", **base,
                                                              "reason": verdict.reason, "hint": verdict.hint})
        self._report_failed_recipients(entry, decision.failed)
        if decision.step is Step.HAND_BACK and waiter is not None:
            # The client is still waiting: pass Exchange's refusal back and keep nothing.
            waiter.committed = True
            await asyncio.to_thread(self.spool.delete_active, entry.id)
            return _as_reply(verdict)
        assert decision.dead is not None
        await self.kill(entry, decision.dead, delivered=outcome.delivered, failed=decision.failed, attempted=True)
        return _as_reply(verdict) if waiter is not None and waiter.waiting else queued_reply(entry)

    def _backoff(self, attempt: int) -> float:
        retry = self.settings.delivery.retry
        return backoff(attempt, retry.first, retry.max, retry.factor, self.rng)

    def _report_failed_recipients(self, entry: Entry, failed: dict[str, str]) -> None:
        for rcpt, reply in failed.items():
            log.warning("recipient refused permanently", extra={
                "event": "recipient_failed", "queue_id": entry.id, "message_id": entry.message_id,
                "recipient": rcpt, "reply": reply})

    async def kill(self, entry: Entry, letter: DeadLetter, *, delivered: tuple[str, ...] = (),
                    failed: dict[str, str] | None = None, attempted: bool = False) -> None:
        """Move to dead letters, as ``letter`` says."""
        dead = await asyncio.to_thread(self.spool.kill, entry.id, letter.reason, letter.reply, delivered=delivered,
                                       failed=failed or {}, attempted=attempted)
        self.metrics.dead(letter.kind)
        log.error("moved to dead letters", extra={"event": "dead_letter", "queue_id": entry.id,
                                                  "message_id": entry.message_id, "reason": letter.reason})
        if self.on_dead is not None:
            try:
                result = self.on_dead(dead, letter.reason)
                if result is not None:
                    await result
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the dead letter is recorded; a failed notice must not undo that
                log.error("dead-letter notice failed: %s", type(exc).__name__,
                          extra={"event": "dead_letter_notice_failed", "queue_id": entry.id})

    async def record_again(self) -> None:
        for id, (entry, outcome) in list(self.unrecorded.items()):
            try:
                await self.record(entry, outcome, None)
            except Exception as exc:
                log.warning("outcome still not recorded: %s", type(exc).__name__,
                            extra={"event": "record_retry_failed", "queue_id": id, "error_type": type(exc).__name__})
                return  # the spool is still unwell: try again next round
            del self.unrecorded[id]

    async def expire(self, now: float, in_flight: Container[str]) -> None:
        """Dead-letter queued messages older than ``max_age`` that no attempt expired (held, paused)."""
        max_age = self.settings.delivery.max_age
        entries = await asyncio.to_thread(self.spool.list, [State.QUEUED])
        for entry in entries:
            if now - entry.created_at < max_age or entry.id in in_flight:
                continue
            why = entry.last_reply or entry.reason or "never attempted"
            held = self.held.blocked(entry.route)
            if held is not None:
                why = f"{held.kind} of {held.scope} {held.name}: {held.reply or held.reason}"
            await self.kill(entry, DeadLetter(
                "expired", f"expired after {round(now - entry.created_at)} s and {entry.attempts} attempts: {why}",
                entry.last_reply))


def _as_reply(verdict: Verdict) -> str:
    """Exchange's refusal as an SMTP reply line for our client."""
    code = verdict.code if verdict.code and 500 <= verdict.code < 600 else 554
    text = verdict.reply
    if text.startswith(str(code)):
        text = text[3:].strip()
    if not verdict.enhanced and not text[:1].isdigit():
        text = f"5.0.0 {text}"
    return f"{code} {text}"[:510]
