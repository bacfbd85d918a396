"""Faults of the simulated Microsoft 365, end to end through the real listener.

Each test flips a switch of the simulated Exchange or Entra ID the way the world would (a throttle, a
dropped connection, an admin revoking or granting a permission), sends mail with smtplib and checks
what the client heard, what Exchange got, and what the spool, ``queue`` and readiness say meanwhile.
Retries are short (``delivery.retry.first`` 0.2 s) so nothing waits long; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.queue.spool import Entry, Spool, State
from relay.testing.exchange import THREAD_LIMIT
from relay.testing.harness import (
    DEMO_PASSWORD,
    DEMO_USER,
    RelayProcess,
    RelayThread,
    free_port,
    relay_config,
    wait_until,
    write_config,
)
from relay.testing.m365 import STANDARD_CLIENT_ID, STANDARD_MAILBOX, STANDARD_SEND_AS, SimulatedM365
from tests.conftest import RelayFactory

FAST_RETRY = {"first": 0.2, "max": 1}
TEMPORARY = "451 4.7.0 Temporary server error. Please try again later. PRX2"

Starter = Callable[..., RelayThread]


@pytest.fixture
def start(relay_factory: RelayFactory) -> Starter:
    """``start(section=overrides)``: a relay in a thread with fast retries and probes (0.2 s)."""

    def make(**overrides: Any) -> RelayThread:
        delivery = {"retry": FAST_RETRY, "probe_interval": 0.2, **overrides.pop("delivery", {})}
        return relay_factory(delivery=delivery, **overrides)

    return make


def raw_message(subject: str, sender: str = STANDARD_MAILBOX, to: str = "someone@fabrikam.example",
                size: int = 0) -> bytes:
    body = f"{subject}\r\n" + ("x" * 76 + "\r\n") * (size // 78)
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{subject.replace(' ', '.')}@app.test>"
            f"\r\n\r\n{body}").encode()


def send(port: int, raw: bytes, rcpts: tuple[str, ...] = ("someone@fabrikam.example",),
         sender: str = STANDARD_MAILBOX) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.login(DEMO_USER, DEMO_PASSWORD)
        code, resp = client.mail(sender)
        assert code == 250, resp
        for rcpt in rcpts:
            code, resp = client.rcpt(rcpt)
            assert code == 250, resp
        try:
            code, resp = client.data(raw)
        except smtplib.SMTPDataError as refused:  # refused at DATA itself (e.g. 452: spool full)
            error = refused.smtp_error
            return refused.smtp_code, error.decode() if isinstance(error, bytes) else error
        return code, resp.decode()


def queue_id(reply: str) -> str:
    assert "queued as " in reply, reply
    return reply.split("queued as ")[1].split()[0]


def spool_of(relay: RelayThread) -> Spool:
    return relay.relay.spool


def entry(relay: RelayThread, id: str) -> Entry | None:
    return spool_of(relay).get(id)


def readiness(relay: RelayThread) -> tuple[bool, dict[str, Any]]:
    async def ask() -> tuple[bool, dict[str, Any]]:
        return relay.relay.readiness()

    result: tuple[bool, dict[str, Any]] = relay.call(ask())
    return result


def queue_cli(spool: Path, *args: str) -> Any:
    out = subprocess.run([sys.executable, "-m", "relay", "queue", "--spool", str(spool), "--json", *args],
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def accepted_subjects(m365: SimulatedM365) -> list[str]:
    return [a.content.split(b"Subject: ")[1].split(b"\r\n")[0].decode() for a in m365.exchange.accepted]


# ---------------------------------------------------------------------------------------------- transient


def test_exchange_432_is_retried_and_delivered_later(start: Starter, m365: SimulatedM365) -> None:
    relay = start()
    m365.exchange.inject("mail", THREAD_LIMIT)
    code, reply = send(relay.port, raw_message("throttled"))
    assert code == 250 and "queued as" in reply  # Exchange said 432: ours now, not the client's problem
    id = queue_id(reply)
    wait_until(lambda: len(m365.exchange.accepted) == 1, 15, "delivery after the 432")
    assert accepted_subjects(m365) == ["throttled"]
    wait_until(lambda: entry(relay, id) is None, 5, "the spool to forget the message")


@pytest.mark.parametrize("fault", ["421 at connect", "drop mid-DATA"])
def test_421_and_disconnect_mid_data_are_retried_and_delivered_once(start: Starter, m365: SimulatedM365,
                                                                   fault: str) -> None:
    relay = start()
    if fault == "421 at connect":
        m365.exchange.inject("connect")  # 421 4.3.2 Service not available, closing transmission channel
    else:
        m365.exchange.drop_mid_data()
    raw = raw_message(f"fault {fault}", size=200_000)
    code, reply = send(relay.port, raw)
    assert code == 250, reply
    wait_until(lambda: len(m365.exchange.accepted) >= 1, 15, "delivery after the fault")
    id = queue_id(reply)
    wait_until(lambda: entry(relay, id) is None, 5, "the spool to forget the message")
    [accepted] = m365.exchange.accepted  # once
    assert accepted.content == raw


def test_token_endpoint_down_then_back(start: Starter, m365: SimulatedM365) -> None:
    m365.entra.set_down(True)
    relay = start()
    code, reply = send(relay.port, raw_message("no token yet"))
    assert code == 250 and "queued as" in reply, reply
    id = queue_id(reply)
    wait_until(lambda: (e := entry(relay, id)) is not None and e.attempts >= 1, 15, "a failed attempt")
    got = entry(relay, id)
    assert got is not None and got.reason.startswith("token_unavailable")
    assert m365.exchange.accepted == []
    m365.entra.set_down(False)
    wait_until(lambda: len(m365.exchange.accepted) == 1, 15, "delivery once Entra ID is back")
    assert accepted_subjects(m365) == ["no token yet"]


def test_token_will_expire_soon_evicts_and_refetches_the_token(start: Starter, m365: SimulatedM365) -> None:
    relay = start()
    assert send(relay.port, raw_message("warm up"))[0] == 250  # a token in hand, a session in the pool
    requests = m365.entra.token_requests
    auths = len(m365.exchange.auth_attempts)

    async def drop_sessions() -> None:  # so the next message authenticates anew
        await relay.relay.pool.close_idle()

    relay.call(drop_sessions())
    m365.exchange.inject("auth", "501 5.5.127 Token will expire soon")
    code, reply = send(relay.port, raw_message("fresh token"))
    assert code == 250 and "delivered as" in reply, reply
    assert m365.entra.token_requests == requests + 1, "the rejected token is evicted and a new one fetched"
    old = m365.exchange.auth_attempts[auths - 1]  # the warm-up's (the refused AUTH is not recorded)
    [new] = m365.exchange.auth_attempts[auths:]
    assert old.success and new.success and old.raw != new.raw, "the retry must carry the new token"
    assert accepted_subjects(m365) == ["warm up", "fresh token"]


# ---------------------------------------------------------------------------------------------- configuration


def test_535_holds_the_queue_until_the_admin_grants_full_access(start: Starter, m365: SimulatedM365,
                                                                tmp_path: Path) -> None:
    relay = start()
    m365.revoke_full_access(STANDARD_MAILBOX, STANDARD_CLIENT_ID)
    replies = [send(relay.port, raw_message(f"held {i}")) for i in range(3)]
    assert all(code == 250 and "queued as" in text for code, text in replies), replies  # never bounced
    ids = [queue_id(text) for _, text in replies]

    ready, details = readiness(relay)
    assert not ready
    [hold] = details["holds"]
    assert hold["scope"] == "mailbox" and hold["name"] == STANDARD_MAILBOX and hold["reason"] == "auth_failed"
    assert hold["reply"].startswith("535 5.7.3") and "FullAccess" in hold["hint"]

    listed = {m["id"]: m for m in queue_cli(relay.settings.spool.path, "list")}
    assert set(listed) == set(ids) and {m["state"] for m in listed.values()} <= {"queued", "active"}
    first = listed[ids[0]]
    assert first["last_reply"].startswith("535 5.7.3") and "FullAccess" in first["reason"]
    assert queue_cli(relay.settings.spool.path, "dead-letters") == []

    auth_failures = m365.exchange.stats().auth_failures
    wait_until(lambda: m365.exchange.stats().auth_failures > auth_failures, 10, "a probe of the hold")
    assert m365.exchange.accepted == []

    m365.grant_full_access(STANDARD_MAILBOX, STANDARD_CLIENT_ID)  # the admin's fix; no restart
    wait_until(lambda: len(m365.exchange.accepted) == 3, 20, "the held mail to flow")
    assert sorted(accepted_subjects(m365)) == ["held 0", "held 1", "held 2"]
    wait_until(lambda: readiness(relay)[0], 5, "readiness to turn green")
    wait_until(lambda: spool_of(relay).list() == [], 5, "an empty spool")


def test_submission_quota_is_deferred_about_an_hour_not_bounced(start: Starter, m365: SimulatedM365) -> None:
    relay = start(delivery={"retry": {"first": 0.2, "max": 3600}})
    m365.set_quota_exhausted(STANDARD_MAILBOX, True)
    code, reply = send(relay.port, raw_message("over quota"))
    assert code == 250 and "queued as" in reply, reply
    id = queue_id(reply)
    got = entry(relay, id)
    assert got is not None and got.state is State.QUEUED
    assert "SubmissionQuotaExceededException" in got.last_reply and got.reason.startswith("quota_exceeded")
    assert 3590 <= got.next_attempt_at - time.time() <= 3600
    assert spool_of(relay).list([State.DEAD]) == []

    m365.set_quota_exhausted(STANDARD_MAILBOX, False)

    async def admin_retry() -> None:  # what `queue retry` does, plus the end of the mailbox's pause
        relay.relay.delivery.held.release("mailbox", STANDARD_MAILBOX)
        spool_of(relay).retry(id)
        relay.relay.delivery.wake()

    relay.call(admin_retry())
    wait_until(lambda: len(m365.exchange.accepted) == 1, 15, "delivery after the quota recovered")


# ---------------------------------------------------------------------------------------------- permanent


def count_mail_commands(m365: SimulatedM365, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the sender of every MAIL FROM the simulated Exchange checks."""
    seen: list[str] = []
    original = m365.exchange.check_mail

    def counting(protocol: Any, auth: Any, sender: str, size: int | None) -> str | None:
        seen.append(sender)
        return original(protocol, auth, sender, size)

    monkeypatch.setattr(m365.exchange, "check_mail", counting)
    return seen


def test_send_as_denied_store_and_forward_is_not_retried_and_becomes_a_dead_letter(
        start: Starter, m365: SimulatedM365, monkeypatch: pytest.MonkeyPatch) -> None:
    relay = start(delivery={"sync_wait": 0})
    m365.revoke_send_as(STANDARD_SEND_AS, STANDARD_CLIENT_ID)
    mails = count_mail_commands(m365, monkeypatch)
    code, reply = send(relay.port, raw_message("denied", sender=STANDARD_SEND_AS), sender=STANDARD_SEND_AS)
    assert code == 250 and "queued as" in reply, reply
    id = queue_id(reply)
    wait_until(lambda: (e := entry(relay, id)) is not None and e.state is State.DEAD, 15, "a dead letter")
    dead = entry(relay, id)
    assert dead is not None and dead.reason.startswith("sendas_denied") and "5.7.60" in dead.reason
    [listed] = queue_cli(relay.settings.spool.path, "dead-letters")
    assert listed["id"] == id and "5.7.60" in listed["reason"]
    # A later message goes through the same scheduler: had the refused one been retried, it would show.
    assert send(relay.port, raw_message("allowed"))[0] == 250
    wait_until(lambda: len(m365.exchange.accepted) == 1, 15, "the next message")
    assert mails == [STANDARD_SEND_AS, STANDARD_MAILBOX], "exactly one attempt for the refused message"


def test_send_as_denied_in_sync_mode_is_passed_back_and_nothing_kept(start: Starter,
                                                                     m365: SimulatedM365) -> None:
    relay = start()
    m365.revoke_send_as(STANDARD_SEND_AS, STANDARD_CLIENT_ID)
    code, reply = send(relay.port, raw_message("denied", sender=STANDARD_SEND_AS), sender=STANDARD_SEND_AS)
    assert code == 550 and reply.startswith("5.7.60"), (code, reply)
    assert spool_of(relay).list() == []


# ---------------------------------------------------------------------------------------------- local trouble


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                            capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30, check=False)


def test_full_spool_filesystem_gives_452_and_loses_nothing(start: Starter, m365: SimulatedM365,
                                                           small_fs: Path) -> None:
    relay = start(spool={"path": str(small_fs / "spool"), "min_free": "512KiB"},
                  delivery={"sync_wait": 0, "retry": {"first": 60}, "per_mailbox": {"per_minute": 0}})
    m365.exchange.inject("mail", TEMPORARY, times=None)  # Exchange down: everything stays in the spool
    replies: list[tuple[int, str]] = []
    for i in range(40):
        code, reply = send(relay.port, raw_message(f"fill {i}", size=150_000))
        replies.append((code, reply))
        if code != 250:
            break
    codes = [code for code, _ in replies]
    assert codes[-1] == 452 and replies[-1][1].startswith("4.3.1"), replies[-1]
    assert set(codes[:-1]) == {250} and len(codes) > 3
    kept = [queue_id(reply) for code, reply in replies if code == 250]
    # Once Exchange is back every acknowledged message is delivered; then there is room again.
    m365.exchange.clear_faults()

    async def retry_all() -> None:
        spool_of(relay).retry(None)
        relay.relay.delivery.wake()

    relay.call(retry_all())
    wait_until(lambda: len(m365.exchange.accepted) == len(kept), 60, "every acknowledged message")
    assert sorted(accepted_subjects(m365)) == sorted(f"fill {i}" for i in range(len(kept)))
    wait_until(lambda: spool_of(relay).list() == [], 10, "an empty spool")
    # (The tmpfs is 4 MB, not 2, because SQLite's WAL keeps its high-water size: about 30 KB per
    # message here, more under load with more retry rounds; it must not eat the room we test for.
    # Pacing is off so that the ~20 messages' second attempts are not spread over the next minute.)
    again = send(relay.port, raw_message("room again", size=150_000))
    files = {p.name: p.stat().st_size for p in (small_fs / "spool").rglob("*") if p.is_file()}
    assert again[0] == 250, f"{again}: {spool_of(relay).free_bytes()} bytes free, spool files {files}"


def test_sigterm_with_a_delivery_in_flight_exits_in_bounded_time_and_keeps_the_message(
        m365: SimulatedM365, tmp_path: Path) -> None:
    port = free_port()
    config = write_config(relay_config(m365, tmp_path, port=port, overrides={"delivery": {"sync_wait": 0}}),
                          tmp_path / "relay.yaml")
    m365.exchange.set_reply_delay(5)  # a very slow Exchange: the attempt cannot finish in the grace time
    daemon = RelayProcess(config).start(port)
    try:
        code, reply = send(port, raw_message("in flight"))
        assert code == 250, reply
        id = queue_id(reply)
        wait_until(lambda: m365.exchange.stats().connections >= 1, 15, "the delivery to start")
        started = time.monotonic()
        assert daemon.terminate(timeout=30) == 0
        assert time.monotonic() - started < 20  # the 10 s grace + slack for a loaded test machine
    finally:
        daemon.kill()
    spool = Spool(tmp_path / "spool")
    spool.open(recover=False)
    try:
        kept = spool.get(id)
        assert kept is not None and kept.state in (State.ACTIVE, State.QUEUED)
    finally:
        spool.close()
    assert m365.exchange.accepted == []

    m365.exchange.set_reply_delay(0)
    daemon = RelayProcess(config).start(port)
    try:
        wait_until(lambda: len(m365.exchange.accepted) == 1, 30, "delivery after the restart")
        assert accepted_subjects(m365) == ["in flight"]
        assert daemon.terminate(timeout=30) == 0
    finally:
        daemon.kill()
