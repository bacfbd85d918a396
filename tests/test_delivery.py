"""The delivery scheduler, unit by unit, on a fake clock.

A real :class:`relay.queue.spool.Spool` (in a temporary directory) and a fake submitter whose answers are
real Exchange replies run through the real classifier. The tests call ``await delivery.tick()`` and
move the fake clock themselves, so backoff, pacing, holds and expiry take no real time.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay.config import Settings, settings_from_dict
from relay.delivery.classify import Action, Outcome, Scope, Stage, Verdict, classify_exception, classify_reply
from relay.delivery.decision import backoff
from relay.delivery.pacing import PACING_WINDOW, Pacer
from relay.delivery.scheduler import POLL_INTERVAL, Delivery
from relay.envelope import Envelope, Route
from relay.errors import SpoolError, SpoolFull, TokenError
from relay.observability import Metrics
from relay.queue.spool import Entry, Spool, State, StoreRequest
from tests.fakeclock import FakeClock

MAILBOX = "relay@contoso.com"
OTHER = "other@contoso.com"
ROUTE = Route(app="contoso", mailbox=MAILBOX, sender=MAILBOX)
OTHER_ROUTE = Route(app="contoso", mailbox=OTHER, sender=OTHER)

AUTH_FAILED = "5.7.3 Authentication unsuccessful [SIM01.prod.outlook.com 2026-01-05T09:00:00.000Z 1A2B]"
THREAD_LIMIT = "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded [SIM01 1A2B]"
TEMPORARY = "4.7.0 Temporary server error. Please try again later. PRX2"
QUOTA = ("5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message "
         "due to a permanent exception [SIM01 1A2B]")
SEND_AS_DENIED = "5.7.60 SMTP; Client does not have permissions to send as this sender [SIM01 1A2B]"
UNKNOWN_RCPT = "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup"
TOKEN_EXPIRING = "5.5.127 Token will expire soon"


def settings(tmp_path: Path, **delivery: Any) -> Settings:
    return settings_from_dict({
        "listen": [{"address": "127.0.0.1:0", "tls": "none"}],
        "accept": {"networks": ["127.0.0.1/32"], "auth": "optional"},
        "apps": [{"name": "contoso", "tenant_id": "11111111-1111-1111-1111-111111111111",
                  "client_id": "22222222-2222-2222-2222-222222222222", "client_secret": "s3cret-value"}],
        "mailboxes": [{"address": MAILBOX, "app": "contoso"}, {"address": OTHER, "app": "contoso"}],
        "sender": {"default_mailbox": MAILBOX},
        "delivery": delivery,
        "spool": {"path": str(tmp_path / "spool"), "fsync": False},
    })


def delivered(rcpts: tuple[str, ...]) -> Outcome:
    verdict = classify_reply(250, "2.0.0 OK <ABC@SIM01.prod.outlook.com> [Hostname=SIM01]", Stage.DATA)
    return Outcome(verdict=verdict, delivered=rcpts, upstream_id="ABC@SIM01.prod.outlook.com")


def refused(code: int, text: str, stage: Stage, rcpts: tuple[str, ...]) -> Outcome:
    verdict = classify_reply(code, text, stage)
    return Outcome(verdict=verdict, deferred=rcpts if verdict.action == "retry" else ())


def token_down(rcpts: tuple[str, ...]) -> Outcome:
    exc = TokenError("contoso", "temporarily_unavailable", "AADSTS90033: A transient error", transient=True)
    return Outcome(verdict=classify_exception(exc, Stage.TOKEN), deferred=rcpts)


@dataclass
class Call:
    at: float
    route: Route
    recipients: tuple[str, ...]
    message: str


Respond = Callable[[Call], Outcome]


@dataclass
class FakeSubmitter:
    """Answers each submission with ``respond(call)`` (default: delivered); records every call."""

    clock: FakeClock
    respond: Respond = lambda call: delivered(call.recipients)
    calls: list[Call] = field(default_factory=list)
    gate: asyncio.Event | None = None  # when set: every submission waits for it

    async def submit(self, route: Route, envelope: Envelope, body: bytes | Path,
                     recipients: tuple[str, ...] | None = None) -> Outcome:
        data = body.read_bytes() if isinstance(body, Path) else body
        call = Call(self.clock(), route, recipients if recipients is not None else envelope.rcpt_tos,
                    data.decode())
        self.calls.append(call)
        if self.gate is not None:
            await self.gate.wait()
        return self.respond(call)


@dataclass
class Harness:
    clock: FakeClock
    spool: Spool
    submitter: FakeSubmitter
    delivery: Delivery
    probes: list[tuple[float, Route]] = field(default_factory=list)
    dead: list[tuple[Entry, str]] = field(default_factory=list)

    def store(self, n: int = 1, route: Route = ROUTE, rcpts: tuple[str, ...] = ("to@fabrikam.example",),
              state: State = State.QUEUED) -> list[Entry]:
        return [self.spool.store(Envelope("app@contoso.com", rcpts), route, f"message {i}".encode(), state=state)
                for i in range(n)]

    async def step(self) -> None:
        """One scheduler round and everything it started."""
        await self.delivery.tick()
        async with asyncio.timeout(10):
            await self.delivery.wait_idle()

    async def run_for(self, seconds: float, step: float = 1.0) -> None:
        """Let ``seconds`` of fake time pass, one scheduler round per ``step``."""
        end = self.clock() + seconds
        while self.clock() < end:
            await self.step()
            self.clock.advance(step)
        await self.step()

    async def run_until(self, predicate: Callable[[], bool], limit: float, step: float = 1.0) -> None:
        end = self.clock() + limit
        while not predicate():
            assert self.clock() < end, f"not reached within {limit} s of fake time"
            await self.step()
            if not predicate():
                self.clock.advance(step)

    def entry(self, entry: Entry) -> Entry:
        got = self.spool.get(entry.id)
        assert got is not None, f"{entry.id} is gone"
        return got


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., Harness]]:
    spools: list[Spool] = []
    deliveries: list[Delivery] = []

    def factory(*, probe_ok: Callable[[], bool] | None = None, probe_interval: float = 30.0,
                **delivery: Any) -> Harness:
        clock = FakeClock()
        config = settings(tmp_path, **delivery)
        spool = Spool(config.spool.path, clock=clock, fsync=False)
        spool.open()
        spools.append(spool)
        submitter = FakeSubmitter(clock)
        harness: Harness

        async def probe(route: Route) -> Verdict:
            harness.probes.append((clock(), route))
            if probe_ok is not None and probe_ok():
                return Verdict(Action.DELIVERED, "probe_ok", "235 2.7.0 Authentication successful", Scope.MAILBOX)
            return classify_reply(535, AUTH_FAILED, Stage.AUTH)

        delivery_ = Delivery(config, spool, submitter, Metrics(), clock=clock, sleep=clock.sleep,
                             rng=random.Random(3), probe=probe if probe_ok is not None else None,
                             probe_interval=probe_interval)
        deliveries.append(delivery_)
        harness = Harness(clock, spool, submitter, delivery_)

        async def on_dead(entry: Entry, reason: str) -> None:
            harness.dead.append((entry, reason))

        delivery_.attempts.on_dead = on_dead
        return harness

    yield factory
    for d in deliveries:
        await d.stop(1)
    for s in spools:
        s.close()


# ---------------------------------------------------------------------------------------------- backoff


def test_backoff_first_retry_within_a_minute_then_exponential_and_capped() -> None:
    rng = random.Random(7)
    firsts = [backoff(1, 30, 3600, 2, rng) for _ in range(200)]
    assert all(24 <= d <= 36 for d in firsts)
    assert len({round(d, 3) for d in firsts}) > 100, "retries of a burst must spread out (jitter)"
    for attempt in range(1, 8):
        base = 30 * 2 ** (attempt - 1)
        for _ in range(50):
            assert base * 0.8 <= backoff(attempt, 30, 3600, 2, rng) <= base * 1.2
    capped = [backoff(n, 30, 3600, 2, rng) for n in range(8, 5000, 7)]  # no overflow however many attempts
    assert all(0.8 * 3600 <= d <= 3600 for d in capped)


async def test_retry_schedule_follows_delivery_retry_settings(make: Callable[..., Harness]) -> None:
    h = make(retry={"first": 10, "max": 100, "factor": 3}, max_age=100_000)
    h.submitter.respond = lambda call: refused(451, TEMPORARY, Stage.DATA, call.recipients)
    [entry] = h.store()
    waits: list[float] = []
    for _ in range(6):
        due = h.entry(entry).next_attempt_at
        h.clock.set(due)
        await h.step()
        waits.append(h.entry(entry).next_attempt_at - h.clock())
    assert len(h.submitter.calls) == 6
    for wait, base in zip(waits, [10, 30, 90], strict=False):
        assert base * 0.8 <= wait <= base * 1.2, waits
    assert all(80 <= w <= 100 for w in waits[3:]), waits
    got = h.entry(entry)
    assert got.state is State.QUEUED and got.attempts == 6
    assert got.last_reply.startswith("451 4.7.0")


async def test_max_age_moves_to_dead_letters_with_the_reason(make: Callable[..., Harness]) -> None:
    h = make(retry={"first": 600, "max": 600}, max_age=3600)
    h.submitter.respond = lambda call: refused(451, TEMPORARY, Stage.DATA, call.recipients)
    [entry] = h.store()
    created = h.clock()
    await h.run_until(lambda: h.entry(entry).state is State.DEAD, limit=4000, step=10)
    dead = h.entry(entry)
    assert "expired" in dead.reason and "451 4.7.0" in dead.reason
    assert dead.last_reply.startswith("451 4.7.0")
    # The last attempt happens when the message expires, not one backoff later.
    assert h.submitter.calls[-1].at == pytest.approx(created + 3600, abs=10)
    assert [e.id for e, _ in h.dead] == [entry.id]
    assert h.spool.list([State.QUEUED, State.ACTIVE]) == []


async def test_message_never_attempted_behind_a_hold_still_expires(make: Callable[..., Harness]) -> None:
    h = make(max_age=3600, probe_ok=lambda: False, probe_interval=60)
    h.submitter.respond = lambda call: refused(535, AUTH_FAILED, Stage.AUTH, call.recipients)
    h.store()
    await h.step()
    [second] = h.store()  # arrives while the mailbox is held: never attempted
    await h.run_until(lambda: h.entry(second).state is State.DEAD, limit=3700, step=30)
    assert len(h.submitter.calls) == 1
    dead = h.entry(second)
    assert "expired" in dead.reason and f"hold of mailbox {MAILBOX}: 535 5.7.3" in dead.reason


# ---------------------------------------------------------------------------------------------- pacing


def test_pacer_counts_a_submission_until_it_ends() -> None:
    clock = FakeClock()
    pacer = Pacer(2, clock)
    a, b = pacer.take(), pacer.take()
    assert a and b and pacer.take() is None
    clock.advance(100)
    assert pacer.take() is None, "slots in flight never expire"
    pacer.done(a)
    assert pacer.delay() == pytest.approx(PACING_WINDOW)
    clock.advance(PACING_WINDOW)
    assert pacer.delay() == 0 and pacer.take() is not None
    assert Pacer(0, clock).take() is not None and Pacer(0, clock).delay() == 0


async def test_pacing_30_per_minute_per_mailbox_and_other_mailboxes_unaffected(
        make: Callable[..., Harness]) -> None:
    h = make(per_mailbox={"per_minute": 30, "connections": 3})
    h.store(100)
    h.store(5, route=OTHER_ROUTE)
    start = h.clock()
    await h.run_until(lambda: len(h.submitter.calls) == 105, limit=400)
    times = [c.at for c in h.submitter.calls if c.route.mailbox == MAILBOX]
    assert len(times) == 100
    for i in range(len(times) - 30):
        assert times[i + 30] - times[i] >= 60, f"31 submissions within {times[i + 30] - times[i]} s"
    assert times[-1] - start <= 3 * PACING_WINDOW + 5, "pacing must not be much slower than the limit"
    others = [c.at for c in h.submitter.calls if c.route.mailbox == OTHER]
    assert max(others) - start <= 5, "a busy mailbox must not hold up another"
    assert h.spool.list() == []


async def test_at_most_connections_attempts_per_mailbox_at_once(make: Callable[..., Harness]) -> None:
    h = make(per_mailbox={"per_minute": 0, "connections": 3})
    h.submitter.gate = asyncio.Event()
    h.store(10)
    await h.delivery.tick()
    await asyncio.sleep(0)
    assert len(h.submitter.calls) == 3 and h.delivery.pacing.busy(MAILBOX) == 3
    await h.delivery.tick()
    await asyncio.sleep(0)
    assert len(h.submitter.calls) == 3, "a fourth attempt started while three were in flight"
    assert {e.state for e in h.spool.list()} == {State.ACTIVE, State.QUEUED}
    h.submitter.gate.set()
    await h.run_until(lambda: not h.spool.list(), limit=30)
    assert len(h.submitter.calls) == 10


# ---------------------------------------------------------------------------------------------- holds and pauses


async def test_hold_stops_attempts_probes_each_interval_and_releases_when_fixed(
        make: Callable[..., Harness]) -> None:
    fixed = False
    h = make(probe_ok=lambda: fixed, probe_interval=30, retry={"first": 600, "max": 3600})
    h.submitter.respond = lambda call: (delivered(call.recipients) if fixed
                                        else refused(535, AUTH_FAILED, Stage.CONNECT, call.recipients))
    [first] = h.store()
    await h.step()
    held_at = h.clock()
    [hold] = h.delivery.held.holds()
    assert (hold.scope, hold.name, hold.reason) == ("mailbox", MAILBOX, "auth_failed")
    assert hold.reply.startswith("535 5.7.3") and hold.hint
    got = h.entry(first)
    assert got.state is State.QUEUED and got.last_reply.startswith("535 5.7.3") and "auth_failed" in got.reason
    h.store(4)
    await h.run_for(400, step=5)
    assert len(h.submitter.calls) == 1, "nothing may be attempted while the mailbox is held"
    probe_times = [t - held_at for t, _ in h.probes]
    assert probe_times[0] == pytest.approx(30, abs=5)
    gaps = [b - a for a, b in itertools.pairwise(probe_times)]
    assert gaps == sorted(gaps) and max(gaps) <= 300 + 5, gaps  # every interval, backing off, bounded
    assert len(h.spool.list([State.DEAD])) == 0, "a configuration problem never bounces"
    fixed = True
    await h.run_until(lambda: not h.spool.list(), limit=310, step=5)
    assert h.delivery.held.holds() == []
    assert len(h.submitter.calls) == 6  # the first attempt, then all five once the fix works
    # Released messages went at once (three connections: two scheduler rounds), not after their backoff.
    assert h.submitter.calls[-1].at - h.probes[-1][0] <= 10


async def test_token_endpoint_down_pauses_the_app(make: Callable[..., Harness]) -> None:
    down = True
    h = make(retry={"first": 30, "max": 300})
    h.submitter.respond = lambda call: token_down(call.recipients) if down else delivered(call.recipients)
    [a] = h.store()
    await h.step()
    assert h.delivery.held.blocks[("app", "contoso")].kind == "pause"
    h.store(3)
    h.store(2, route=OTHER_ROUTE)  # same app: paused too
    await h.run_for(20)
    assert len(h.submitter.calls) == 1
    assert h.entry(a).reason.startswith("token_unavailable") and h.entry(a).state is State.QUEUED
    down = False
    await h.run_until(lambda: not h.spool.list(), limit=60)
    assert len(h.submitter.calls) == 7
    assert h.delivery.held.holds() == [] and h.dead == []


async def test_432_throttled_connections_pauses_that_mailbox_only(make: Callable[..., Harness]) -> None:
    throttled = True
    h = make(retry={"first": 5, "max": 3600})

    def respond(call: Call) -> Outcome:
        if throttled and call.route.mailbox == MAILBOX:
            return refused(432, THREAD_LIMIT, Stage.MAIL, call.recipients)
        return delivered(call.recipients)

    h.submitter.respond = respond
    [a] = h.store()
    await h.step()
    pause = h.delivery.held.blocks[("mailbox", MAILBOX)]
    assert pause.kind == "pause" and pause.until - h.clock() == pytest.approx(60)
    assert h.entry(a).next_attempt_at - h.clock() == pytest.approx(60)
    h.store(2)
    h.store(2, route=OTHER_ROUTE)
    await h.run_for(50)
    assert [c.route.mailbox for c in h.submitter.calls] == [MAILBOX, OTHER, OTHER]
    throttled = False
    await h.run_until(lambda: not h.spool.list(), limit=30)
    assert len(h.submitter.calls) == 6


async def test_submission_quota_is_deferred_an_hour_never_bounced(make: Callable[..., Harness]) -> None:
    h = make()  # default retry: max 3600
    h.submitter.respond = lambda call: refused(554, QUOTA, Stage.DATA, call.recipients)
    [a] = h.store()
    await h.step()
    got = h.entry(a)
    assert got.state is State.QUEUED and got.next_attempt_at - h.clock() == pytest.approx(3600)
    assert got.reason.startswith("quota_exceeded") and "SubmissionQuotaExceeded" in got.last_reply
    assert h.delivery.held.blocks[("mailbox", MAILBOX)].kind == "pause"
    assert h.dead == []


async def test_token_expiring_retries_at_once_but_not_in_a_loop(make: Callable[..., Harness]) -> None:
    h = make(retry={"first": 30, "max": 300})
    h.submitter.respond = lambda call: refused(501, TOKEN_EXPIRING, Stage.MAIL, call.recipients)
    [a] = h.store()
    await h.step()
    assert h.entry(a).next_attempt_at == pytest.approx(h.clock()), "5.5.127: a new token, at once"
    await h.step()
    assert len(h.submitter.calls) == 2
    assert 48 <= h.entry(a).next_attempt_at - h.clock() <= 72, "the same again: back off (2nd attempt)"


# ---------------------------------------------------------------------------------------------- outcomes


async def test_partial_recipient_failure_retries_only_the_pending_ones(make: Callable[..., Harness]) -> None:
    h = make(retry={"first": 30, "max": 300})
    a, b, c = "a@fabrikam.example", "b@fabrikam.example", "c@fabrikam.example"

    def respond(call: Call) -> Outcome:
        if len(h.submitter.calls) == 1:
            return Outcome(verdict=delivered((a,)).verdict, delivered=(a,),
                           failed={b: classify_reply(550, UNKNOWN_RCPT, Stage.RCPT)}, deferred=(c,),
                           upstream_id="ABC")
        return delivered(call.recipients)

    h.submitter.respond = respond
    [entry] = h.store(rcpts=(a, b, c))
    await h.step()
    got = h.entry(entry)
    assert got.state is State.QUEUED and got.recipients_done == (a,)
    assert got.recipients_failed[b].startswith("550 5.1.10") and got.pending_recipients == (c,)
    assert got.reason.startswith("partial")
    await h.run_until(lambda: h.entry(entry).state is State.DEAD, limit=60)
    assert h.submitter.calls[1].recipients == (c,), "delivered and refused recipients are never tried again"
    dead = h.entry(entry)
    assert set(dead.recipients_done) == {a, c} and set(dead.recipients_failed) == {b}
    assert "refused for 1 of 3" in dead.reason and "5.1.10" in dead.reason
    # A requeue (after the admin fixed the address) sends to the refused recipient only.
    assert h.spool.requeue(entry.id)
    await h.run_until(lambda: h.spool.get(entry.id) is None, limit=30)
    assert h.submitter.calls[-1].recipients == (b,)


async def test_permanent_failure_in_store_and_forward_is_a_dead_letter_after_one_attempt(
        make: Callable[..., Harness]) -> None:
    h = make(retry={"first": 1, "max": 5})
    h.submitter.respond = lambda call: refused(550, SEND_AS_DENIED, Stage.MAIL, call.recipients)
    [entry] = h.store()
    await h.run_for(60)
    assert len(h.submitter.calls) == 1
    dead = h.entry(entry)
    assert dead.state is State.DEAD and dead.reason.startswith("sendas_denied") and "5.7.60" in dead.reason
    assert [reason for _, reason in h.dead] == [dead.reason]


# ---------------------------------------------------------------------------------------------- the sync path


async def test_sync_permanent_refusal_goes_back_to_the_client_and_nothing_is_kept(
        make: Callable[..., Harness]) -> None:
    h = make()
    h.submitter.respond = lambda call: refused(550, SEND_AS_DENIED, Stage.MAIL, call.recipients)
    [entry] = h.store(state=State.ACTIVE)
    reply = await h.delivery.deliver_now(entry, 5)
    assert reply.startswith("550 5.7.60")
    assert h.spool.get(entry.id) is None and h.dead == []


async def test_sync_attempt_that_outlives_sync_wait_never_loses_the_message(make: Callable[..., Harness]) -> None:
    """The client heard "250 queued": a permanent refusal coming later must make a dead letter."""
    h = make()
    h.submitter.gate = asyncio.Event()
    h.submitter.respond = lambda call: refused(550, SEND_AS_DENIED, Stage.MAIL, call.recipients)
    [entry] = h.store(state=State.ACTIVE)
    reply = await h.delivery.deliver_now(entry, 0.05)
    assert reply == f"250 2.0.0 Ok: queued as {entry.id}"
    h.submitter.gate.set()
    async with asyncio.timeout(10):
        await h.delivery.wait_idle()
    assert h.entry(entry).state is State.DEAD


async def test_sync_attempt_while_held_or_paced_is_queued_at_once(make: Callable[..., Harness]) -> None:
    h = make(per_mailbox={"per_minute": 1})
    [first, second] = h.store(2, state=State.ACTIVE)
    assert (await h.delivery.deliver_now(first, 5)).startswith("250 2.0.0 Ok: delivered as")
    assert await h.delivery.deliver_now(second, 5) == f"250 2.0.0 Ok: queued as {second.id}"
    got = h.entry(second)
    assert got.state is State.QUEUED and got.attempts == 0
    assert len(h.submitter.calls) == 1


async def test_sync_attempt_that_crashes_keeps_the_message(make: Callable[..., Harness]) -> None:
    h = make()

    def boom(call: Call) -> Outcome:
        raise RuntimeError("bug")

    h.submitter.respond = boom
    [entry] = h.store(state=State.ACTIVE)
    assert await h.delivery.deliver_now(entry, 5) == f"250 2.0.0 Ok: queued as {entry.id}"
    got = h.entry(entry)
    assert got.state is State.QUEUED and got.last_reply == "local error: RuntimeError"


async def test_stop_abandons_attempts_in_flight_within_the_grace(make: Callable[..., Harness]) -> None:
    h = make()
    h.submitter.gate = asyncio.Event()  # Exchange never answers
    [entry] = h.store()
    runner = asyncio.ensure_future(h.delivery.run())
    async with asyncio.timeout(10):
        while not h.submitter.calls:
            await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await h.delivery.stop(grace=0.2)
    assert loop.time() - started < 2
    async with asyncio.timeout(5):
        await runner
    assert h.entry(entry).state is State.ACTIVE  # made due again by recovery at the next start


async def test_an_answer_the_spool_cannot_take_is_written_later_not_resent(
        make: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch) -> None:
    h = make()
    [entry] = h.store()
    original = h.spool.commit_group
    failures = [SpoolFull("spool: mark delivered: database: database or disk is full")]

    def flaky(stores: Sequence[StoreRequest], delivered: Sequence[str] = ()) -> list[Entry | SpoolError | None]:
        if delivered and failures:
            return [*original(stores, ()), *(failures.pop() for _ in delivered)]
        return original(stores, delivered)

    monkeypatch.setattr(h.spool, "commit_group", flaky)
    await h.step()
    assert h.entry(entry).state is State.ACTIVE  # Exchange has it; the spool does not know yet
    await h.run_until(lambda: h.spool.get(entry.id) is None, limit=10)
    assert len(h.submitter.calls) == 1, "a message Exchange accepted must not be sent again"


def test_spooled_message_for_an_app_removed_from_the_config_becomes_a_dead_letter(tmp_path: Path) -> None:
    """After a restart with an app removed, its queued mail is kept as a dead letter with a reason an
    admin can act on (restore and requeue, or delete), never retried forever or dropped."""
    from relay.envelope import Envelope as Env
    from relay.envelope import Route as Rt
    from relay.queue.spool import Spool as RealSpool
    from relay.testing.harness import RelayThread, relay_config, wait_until
    from relay.testing.m365 import SimulatedM365

    with SimulatedM365.standard(tmp_path / "m365") as m365:
        spool = RealSpool(tmp_path / "spool")
        spool.open()
        entry = spool.store(Env("relay@contoso.com", ("x@fabrikam.example",)),
                            Rt(app="retired", mailbox="old@contoso.com", sender="old@contoso.com"),
                            b"Subject: left behind\r\n\r\nbody\r\n")
        spool.close()
        config = relay_config(m365, tmp_path)
        with RelayThread.from_dict(config) as relay:
            def dead() -> bool:
                got = relay.relay.spool.get(entry.id)
                return got is not None and got.state.value == "dead"

            wait_until(dead, 30, "the message to become a dead letter")
            got = relay.relay.spool.get(entry.id)
            assert got is not None and "no longer configured" in got.last_reply
        assert m365.exchange.accepted == []


async def test_an_adopted_message_is_delivered_once(make: Callable[..., Harness]) -> None:
    """A message stored ACTIVE after its client left (relay.queue.committer's orphan) is delivered, not left
    ACTIVE until the next restart; adopting it twice does not send it twice."""
    h = make()
    [entry] = h.store(state=State.ACTIVE)
    await h.delivery.tick()
    assert h.submitter.calls == [], "an ACTIVE message is nobody's to claim"
    h.delivery.adopt(entry)
    h.delivery.adopt(entry)
    await h.run_until(lambda: h.spool.get(entry.id) is None, limit=10)
    assert len(h.submitter.calls) == 1


async def test_scheduler_skips_the_spool_while_nothing_new_and_still_polls_for_other_processes(
        make: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    h = make()
    looks: list[float] = []
    original = h.spool.next_due_at

    def counting() -> float | None:
        looks.append(h.clock())
        return original()

    monkeypatch.setattr(h.spool, "next_due_at", counting)
    [entry] = h.store(state=State.ACTIVE)
    await h.step()
    assert len(looks) == 1
    assert await h.delivery.deliver_now(entry, 5) != ""
    await h.step()
    await h.step()
    assert len(looks) == 1, "a finished sync delivery with nothing queued must not cost a spool query"
    h.store()  # this process queued a message: the very next round looks
    await h.step()
    assert len(looks) == 2 and len(h.submitter.calls) == 2
    # The queue CLI (another process, another Spool) makes a message due: found by the poll.
    other = Spool(h.spool.path, clock=h.clock, fsync=False)
    other.open(recover=False)
    try:
        queued = other.store(Envelope("app@contoso.com", ("x@fabrikam.example",)), ROUTE, b"from the CLI")
    finally:
        other.close()
    await h.step()
    assert len(h.submitter.calls) == 2, "not seen before the poll interval"
    h.clock.advance(POLL_INTERVAL)
    await h.step()
    assert len(h.submitter.calls) == 3
    assert h.spool.get(queued.id) is None


async def test_sync_wait_zero_starts_at_once_when_a_connection_is_free_else_queues(
        make: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch) -> None:
    h = make(per_mailbox={"per_minute": 0, "connections": 1})
    h.submitter.gate = asyncio.Event()
    unclaimed: list[str] = []
    original = h.spool.unclaim

    def recording(id: str, next_attempt_at: float, reason: str | None = None) -> bool:
        unclaimed.append(id)
        return original(id, next_attempt_at, reason)

    monkeypatch.setattr(h.spool, "unclaim", recording)
    first, second = h.store(2, state=State.ACTIVE)
    await h.step()  # the scheduler has looked: nothing queued
    assert (await h.delivery.deliver_now(first, 0)).startswith("250 2.0.0 Ok: queued as")
    await asyncio.sleep(0)
    assert [c.route.mailbox for c in h.submitter.calls] == [MAILBOX] and unclaimed == [], \
        "the free connection takes the message at once, without a round trip through the queue"
    assert (await h.delivery.deliver_now(second, 0)).startswith("250 2.0.0 Ok: queued as")
    assert unclaimed == [] and h.entry(second).state is State.ACTIVE, "no connection free: next in line"
    h.submitter.gate.set()
    await h.run_until(lambda: not h.spool.list(), limit=30)
    assert len(h.submitter.calls) == 2 and unclaimed == [], "started when the connection freed, never requeued"


async def test_waiting_new_messages_go_back_to_the_queue_on_a_hold_and_on_stop(
        make: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch) -> None:
    h = make(per_mailbox={"per_minute": 0, "connections": 1})
    h.submitter.gate = asyncio.Event()
    first, second, third = h.store(3, state=State.ACTIVE)
    await h.step()
    for entry in (first, second, third):
        await h.delivery.deliver_now(entry, 0)
    await asyncio.sleep(0)
    assert len(h.submitter.calls) == 1 and {h.entry(e).state for e in (second, third)} == {State.ACTIVE}
    verdict = classify_reply(535, AUTH_FAILED, Stage.AUTH)
    h.delivery.held.block("hold", verdict, ROUTE)
    await h.delivery.tick()
    async with asyncio.timeout(10):
        while {h.entry(e).state for e in (second, third)} != {State.QUEUED}:
            await asyncio.sleep(0.01)
    assert "hold" in h.entry(second).reason, "queue list says why it waits"
    h.delivery.held.release("mailbox", MAILBOX)
    h.submitter.gate.set()
    await h.run_until(lambda: not h.spool.list(), limit=60)
    # A message still waiting in memory when the relay stops goes back to the queue, due now.
    h.submitter.gate.clear()
    fourth, fifth = h.store(2, state=State.ACTIVE)
    await h.step()
    await h.delivery.deliver_now(fourth, 0)
    await h.delivery.deliver_now(fifth, 0)
    await h.delivery.stop(0.1)
    assert h.entry(fifth).state is State.QUEUED and h.entry(fifth).next_attempt_at <= h.clock()


async def test_new_messages_do_not_overtake_older_queued_ones(make: Callable[..., Harness]) -> None:
    """The in-memory line is for when the queue has nothing due: else a steady stream of new mail
    could keep older queued messages waiting."""
    h = make(per_mailbox={"per_minute": 0, "connections": 1})
    h.submitter.gate = asyncio.Event()
    [busy] = h.store(1, state=State.ACTIVE)
    await h.step()
    await h.delivery.deliver_now(busy, 0)  # takes the one connection
    env = Envelope("app@contoso.com", ("to@fabrikam.example",))
    h.spool.store(env, ROUTE, b"older")  # queued and due
    await h.delivery.tick()
    new = h.spool.store(env, ROUTE, b"new", state=State.ACTIVE)
    await h.delivery.deliver_now(new, 0)
    assert h.entry(new).state is State.QUEUED, "queued behind the older message, not ahead of it"
    h.submitter.gate.set()
    await h.run_until(lambda: not h.spool.list(), limit=30)
    assert [c.message for c in h.submitter.calls][1:] == ["older", "new"]
