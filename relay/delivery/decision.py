"""What to do with a message after an attempt: a pure function of the attempt and the settings.

:func:`decide` takes the spool entry, Exchange's outcome, the time and the settings and says what
happens next; it writes nothing, logs nothing and counts nothing. ``relay.delivery.scheduler`` carries the
decision out (spool, metrics, logs, the waiting client), so the rules can be read and table-tested
in one place:

- every recipient has its answer and Exchange took the message for some: **delivered** (a dead
  letter keeps the refused part, if any);
- a permanent refusal: **handed back** to a client still waiting for a message nobody got yet (the
  spool keeps nothing and the client hears Exchange's refusal), else a **dead letter**;
- anything else is tried again: a hold or pause of the verdict's scope when the classifier says so,
  then a **dead letter** if the message is older than ``delivery.max_age``, else **deferred** by what
  the classifier dictates or the backoff, never past the message's expiry.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from relay.config import Settings
from relay.delivery.classify import Action, Outcome, Scope, Verdict
from relay.queue.spool import Entry


class Step(StrEnum):
    DELIVERED = "delivered"  # recorded as delivered (with a dead letter for refused recipients, if any)
    HAND_BACK = "hand_back"  # the waiting client gets Exchange's refusal; the spool keeps nothing
    FAIL = "fail"  # refused permanently: a dead letter
    EXPIRE = "expire"  # to be tried again, but older than delivery.max_age: a dead letter
    DEFER = "defer"  # tried again after ``delay``


@dataclass(frozen=True)
class DeadLetter:
    """What a dead letter records: ``kind`` a short token (metrics label), ``reason`` the whole story."""

    kind: str
    reason: str
    reply: str


@dataclass(frozen=True)
class Decision:
    step: Step
    #: recipients Exchange refused in this attempt (recipient -> reply)
    failed: dict[str, str] = field(default_factory=dict)
    #: recipients still without an answer after this attempt
    pending: tuple[str, ...] = ()
    #: "hold" or "pause" of the verdict's scope (app or mailbox) before the message is deferred or expires
    block: str | None = None
    #: DEFER: seconds until the next attempt
    delay: float = 0.0
    #: DEFER: the reason the spool records
    reason: str = ""
    #: DELIVERED with refused recipients, FAIL, EXPIRE
    dead: DeadLetter | None = None


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


def retry_delay(entry: Entry, verdict: Verdict, settings: Settings, jittered: Callable[[int], float]) -> float:
    """What the classifier dictates (never more than ``delivery.retry.max``), else ``jittered(attempt)``,
    the backoff for this attempt.

    A "retry at once" (5.5.127 token expiring) that follows the same reason backs off instead:
    a fresh token did not help, so hammering Exchange will not either.
    """
    retry = settings.delivery.retry
    after = verdict.retry_after
    previous_reason = entry.reason.split(":", 1)[0]
    if after is not None and not (after <= 0 and previous_reason == verdict.reason):
        return min(after, retry.max)
    return jittered(entry.attempts + 1)


def decide(entry: Entry, outcome: Outcome, now: float, settings: Settings, *, client_waiting: bool,
           jittered: Callable[[int], float]) -> Decision:
    """What to do after ``outcome``. ``client_waiting``: the listener's client still waits for this
    attempt; ``jittered(attempt)``: the backoff delay before that attempt (randomised by the caller)."""
    verdict = outcome.verdict
    failed = {r: v.reply for r, v in outcome.failed.items()}
    delivered = outcome.delivered
    all_failed = {**entry.recipients_failed, **failed}
    done = set(entry.recipients_done) | set(delivered) | set(all_failed)
    pending = tuple(r for r in entry.envelope.rcpt_tos if r not in done)

    if not pending and (delivered or entry.recipients_done):
        dead = None
        if all_failed:
            first = next(iter(all_failed.values()))
            dead = DeadLetter("recipients_refused", f"refused for {len(all_failed)} of "
                              f"{len(entry.envelope.rcpt_tos)} recipient(s): {first}", first)
        return Decision(Step.DELIVERED, failed, pending, dead=dead)

    if verdict.action is Action.FAILED and not outcome.deferred:
        untouched = not entry.recipients_done and not entry.recipients_failed
        if client_waiting and untouched:
            return Decision(Step.HAND_BACK, failed, pending)
        return Decision(Step.FAIL, failed, pending,
                        dead=DeadLetter(verdict.reason, f"{verdict.reason}: {verdict.reply}", verdict.reply))

    block = None
    if verdict.action is Action.HOLD:
        block = "hold"
    elif verdict.action is Action.RETRY and verdict.scope in (Scope.MAILBOX, Scope.APP):
        block = "pause"
    max_age = settings.delivery.max_age
    if now - entry.created_at >= max_age:
        return Decision(Step.EXPIRE, failed, pending, block, dead=DeadLetter(
            "expired", f"expired after {entry.attempts + 1} attempts: {verdict.reply}", verdict.reply))
    delay = retry_delay(entry, verdict, settings, jittered)
    # The last attempt happens when the message expires, not after.
    delay = max(min(delay, entry.created_at + max_age - now), 0.0)
    if verdict.action is Action.DELIVERED:
        reason = f"partial: {len(pending)} recipient(s) pending"
    else:
        reason = f"{verdict.reason}: {verdict.hint}" if verdict.hint else verdict.reason
    return Decision(Step.DEFER, failed, pending, block, delay=delay, reason=reason)
