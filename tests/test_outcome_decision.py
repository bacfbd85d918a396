"""The outcome decision (relay.delivery.decision.decide), row by row: what happens to a message after an attempt.

Each row names the attempt (the spool entry before it, Exchange's outcome, whether the client still
waits) and what must follow. The backoff is a fixed function of the attempt number here, so a row can
tell a dictated delay from a backoff and see which attempt the backoff was asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from relay.config import Settings, settings_from_dict
from relay.delivery.classify import Action, Outcome, Scope, Stage, Verdict, classify_reply
from relay.delivery.decision import DeadLetter, Decision, Step, decide
from relay.envelope import Envelope, Route
from relay.queue.spool import Entry, State

MAILBOX = "relay@contoso.com"
A, B, C = "a@example.com", "b@example.com", "c@example.com"
NOW = 1_000_000.0
MAX_AGE = 86400.0
RETRY_MAX = 3600.0

def make_settings(max_age: float = MAX_AGE) -> Settings:
    return settings_from_dict({
    "listen": [{"address": "127.0.0.1:0", "tls": "none"}],
    "accept": {"networks": ["127.0.0.1/32"], "auth": "optional"},
    "apps": [{"name": "contoso", "tenant_id": "11111111-1111-1111-1111-111111111111",
              "client_id": "22222222-2222-2222-2222-222222222222", "client_secret": "s3cret-value"}],
    "mailboxes": [{"address": MAILBOX, "app": "contoso"}],
    "sender": {"default_mailbox": MAILBOX},
    "delivery": {"max_age": max_age, "retry": {"first": 30, "max": RETRY_MAX, "factor": 2}},
    "spool": {"path": "/nonexistent/spool", "fsync": False},
})


SETTINGS = make_settings()


def jittered(attempt: int) -> float:
    """The backoff before ``attempt``: distinct per attempt, so a row shows which one was asked for."""
    return 1000.0 + attempt


OK = Verdict(Action.DELIVERED, "delivered", "250 2.0.0 OK Queued mail for delivery", Scope.MESSAGE)
REFUSED = classify_reply(550, "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found", Stage.RCPT)
REJECTED = classify_reply(554, "5.6.211 Invalid MIME Content: Single text value size (32768) exceeded", Stage.DATA)
HOLD = classify_reply(535, "5.7.3 Authentication unsuccessful", Stage.AUTH)
TRANSIENT = Verdict(Action.RETRY, "upstream_unavailable", "421 4.3.2 Service not available", Scope.MESSAGE)
DICTATED = Verdict(Action.RETRY, "rate_limited", "450 4.7.0 try later", Scope.MESSAGE, retry_after=900.0)
DICTATED_LONG = Verdict(Action.RETRY, "quota", "452 4.5.3 quota", Scope.MESSAGE, retry_after=2 * RETRY_MAX)
MAILBOX_PAUSE = Verdict(Action.RETRY, "throttled", "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
                        Scope.MAILBOX, retry_after=60.0)
APP_PAUSE = Verdict(Action.RETRY, "token_endpoint", "token endpoint: no answer", Scope.APP)
AT_ONCE = Verdict(Action.RETRY, "token_expiring", "535 5.5.127 token expiring", Scope.MESSAGE, retry_after=0.0)


@dataclass(frozen=True)
class Before:
    """The spool entry before the attempt."""

    rcpts: tuple[str, ...] = (A,)
    age: float = 60.0
    attempts: int = 0
    reason: str = ""
    done: tuple[str, ...] = ()
    failed: dict[str, str] = field(default_factory=dict)

    def entry(self) -> Entry:
        return Entry(id="q1", envelope=Envelope("app@contoso.com", self.rcpts),
                     route=Route(app="contoso", mailbox=MAILBOX, sender=MAILBOX), state=State.ACTIVE,
                     created_at=NOW - self.age, next_attempt_at=NOW, attempts=self.attempts, last_reply="",
                     reason=self.reason, message_id="<m@contoso.com>", size=100, client="127.0.0.1",
                     recipients_done=self.done, recipients_failed=dict(self.failed))


@dataclass(frozen=True)
class Row:
    name: str
    before: Before
    outcome: Outcome
    expect: Decision
    client_waiting: bool = False


ROWS = [
    Row("all delivered", Before(rcpts=(A, B)), Outcome(OK, delivered=(A, B)),
        Decision(Step.DELIVERED)),
    Row("the rest delivered after an earlier partial", Before(rcpts=(A, B), done=(A,), attempts=1),
        Outcome(OK, delivered=(B,)), Decision(Step.DELIVERED)),
    Row("delivered to some, refused for others: dead letter for the refused part", Before(rcpts=(A, B)),
        Outcome(OK, delivered=(A,), failed={B: REFUSED}),
        Decision(Step.DELIVERED, failed={B: REFUSED.reply}, dead=DeadLetter(
            "recipients_refused", f"refused for 1 of 2 recipient(s): {REFUSED.reply}", REFUSED.reply))),
    Row("an earlier refusal counts in the dead letter", Before(rcpts=(A, B), failed={A: "550 5.1.1 no"}, attempts=1),
        Outcome(OK, delivered=(B,)),
        Decision(Step.DELIVERED, dead=DeadLetter("recipients_refused", "refused for 1 of 2 recipient(s): 550 5.1.1 no",
                                                 "550 5.1.1 no"))),
    Row("a waiting client gets the refusal back and nothing is kept", Before(),
        Outcome(REJECTED), Decision(Step.HAND_BACK, pending=(A,)), client_waiting=True),
    Row("a refusal nobody waits for is a dead letter", Before(),
        Outcome(REJECTED), Decision(Step.FAIL, pending=(A,), dead=DeadLetter(
            REJECTED.reason, f"{REJECTED.reason}: {REJECTED.reply}", REJECTED.reply))),
    Row("a refusal after a partial delivery is a dead letter even for a waiting client",
        Before(rcpts=(A, B), done=(A,), attempts=1), Outcome(REJECTED),
        Decision(Step.FAIL, pending=(B,), dead=DeadLetter(
            REJECTED.reason, f"{REJECTED.reason}: {REJECTED.reply}", REJECTED.reply)), client_waiting=True),
    Row("refused for one, deferred for another: tried again, by backoff", Before(rcpts=(A, B)),
        Outcome(REFUSED, failed={A: REFUSED}, deferred=(B,)),
        Decision(Step.DEFER, failed={A: REFUSED.reply}, pending=(B,), delay=1001.0, reason=REFUSED.reason)),
    Row("transient trouble: the backoff for the next attempt", Before(attempts=2), Outcome(TRANSIENT),
        Decision(Step.DEFER, pending=(A,), delay=1003.0, reason="upstream_unavailable")),
    Row("a transient client does not change a retry", Before(), Outcome(TRANSIENT),
        Decision(Step.DEFER, pending=(A,), delay=1001.0, reason="upstream_unavailable"), client_waiting=True),
    Row("the classifier's delay wins over the backoff", Before(), Outcome(DICTATED),
        Decision(Step.DEFER, pending=(A,), delay=900.0, reason="rate_limited")),
    Row("a dictated delay is never longer than retry.max", Before(), Outcome(DICTATED_LONG),
        Decision(Step.DEFER, pending=(A,), delay=RETRY_MAX, reason="quota")),
    Row("mailbox trouble pauses the mailbox", Before(), Outcome(MAILBOX_PAUSE),
        Decision(Step.DEFER, pending=(A,), block="pause", delay=60.0, reason="throttled")),
    Row("app trouble pauses the app", Before(), Outcome(APP_PAUSE),
        Decision(Step.DEFER, pending=(A,), block="pause", delay=1001.0, reason="token_endpoint")),
    Row("a configuration problem holds, the reason carries the hint", Before(), Outcome(HOLD),
        Decision(Step.DEFER, pending=(A,), block="hold", delay=1001.0, reason=f"{HOLD.reason}: {HOLD.hint}")),
    Row("retry at once the first time", Before(reason="upstream_unavailable"), Outcome(AT_ONCE),
        Decision(Step.DEFER, pending=(A,), delay=0.0, reason="token_expiring")),
    Row("retry at once again for the same reason backs off", Before(attempts=1, reason="token_expiring"),
        Outcome(AT_ONCE), Decision(Step.DEFER, pending=(A,), delay=1002.0, reason="token_expiring")),
    Row("the last attempt is when the message expires, not after", Before(age=MAX_AGE - 100.0), Outcome(TRANSIENT),
        Decision(Step.DEFER, pending=(A,), delay=100.0, reason="upstream_unavailable")),
    Row("too old to try again: dead letter", Before(age=MAX_AGE, attempts=4), Outcome(TRANSIENT),
        Decision(Step.EXPIRE, pending=(A,), dead=DeadLetter(
            "expired", f"expired after 5 attempts: {TRANSIENT.reply}", TRANSIENT.reply))),
    Row("too old and held: still holds, and expires", Before(age=MAX_AGE + 1), Outcome(HOLD),
        Decision(Step.EXPIRE, pending=(A,), block="hold", dead=DeadLetter(
            "expired", f"expired after 1 attempts: {HOLD.reply}", HOLD.reply))),
    Row("partial delivery: the rest is tried again", Before(rcpts=(A, B, C)),
        Outcome(TRANSIENT, delivered=(A,), failed={B: REFUSED}, deferred=(C,)),
        Decision(Step.DEFER, failed={B: REFUSED.reply}, pending=(C,), delay=1001.0, reason="upstream_unavailable")),
    Row("delivered for some, nothing said for the others", Before(rcpts=(A, B)),
        Outcome(OK, delivered=(A,)),
        Decision(Step.DEFER, pending=(B,), delay=1001.0, reason="partial: 1 recipient(s) pending")),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_decision_table(row: Row) -> None:
    entry = row.before.entry()
    got = decide(entry, row.outcome, NOW, SETTINGS, client_waiting=row.client_waiting, jittered=jittered)
    assert got == row.expect
    assert entry == row.before.entry(), "deciding must not change the entry"


def test_row_names_are_unique() -> None:
    assert len({r.name for r in ROWS}) == len(ROWS)


def test_every_step_and_block_is_covered() -> None:
    assert {r.expect.step for r in ROWS} == set(Step)
    assert {r.expect.block for r in ROWS} == {None, "hold", "pause"}


def test_a_dictated_delay_does_not_ask_for_a_backoff() -> None:
    asked: list[int] = []

    def counting(attempt: int) -> float:
        asked.append(attempt)
        return 5.0

    got = decide(Before().entry(), Outcome(DICTATED), NOW, SETTINGS, client_waiting=False, jittered=counting)
    assert (got.delay, asked) == (900.0, [])
    got = decide(Before(attempts=6).entry(), Outcome(TRANSIENT), NOW, SETTINGS, client_waiting=False,
                 jittered=counting)
    assert (got.delay, asked) == (5.0, [7])


def test_max_age_comes_from_the_settings() -> None:
    entry = Before(age=600.0).entry()
    shorter = make_settings(max_age=600.0)
    assert decide(entry, Outcome(TRANSIENT), NOW, shorter, client_waiting=False, jittered=jittered).step is Step.EXPIRE
    assert decide(entry, Outcome(TRANSIENT), NOW, SETTINGS, client_waiting=False, jittered=jittered).step is Step.DEFER
