"""The queue commands: ``oauth-smtp-relay queue ...`` against a live daemon (a real ``python -m relay serve``).

The daemon keeps running while the commands change its spool: a held message is not delivered, a
released or retried one is, a requeued dead letter gets a new life. A few commands run as their own
process exactly as an admin types them; the rest call the same entry point in-process (same code,
no interpreter start-up per command) while the daemon runs in its own process.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.cli import main as cli_main
from relay.queue.spool import Spool, State
from relay.testing.harness import (
    DEMO_PASSWORD,
    DEMO_USER,
    RelayProcess,
    free_port,
    relay_config,
    wait_until,
    write_config,
)
from relay.testing.m365 import STANDARD_MAILBOX, SimulatedM365

TEMPORARY = "451 4.7.0 Temporary server error. Please try again later. PRX2"
NOBODY = "nobody@fabrikam.example"


class Daemon:
    def __init__(self, m365: SimulatedM365, tmp_path: Path) -> None:
        self.port = free_port()
        # Store and forward, and a long retry so deferred messages stay put while the test looks.
        overrides = {"delivery": {"sync_wait": 0, "retry": {"first": 60, "max": 60}}}
        self.config = write_config(relay_config(m365, tmp_path, port=self.port, overrides=overrides),
                                   tmp_path / "relay.yaml")
        self.spool_path = tmp_path / "spool"
        self.process = RelayProcess(self.config).start(self.port)
        self.reader = Spool(self.spool_path)
        self.reader.open(recover=False)

    def close(self) -> None:
        self.reader.close()
        try:
            self.process.terminate(timeout=30)
        finally:
            self.process.kill()

    def send(self, subject: str, to: str = "someone@fabrikam.example") -> str:
        raw = f"From: {STANDARD_MAILBOX}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\n{subject}\r\n".encode()
        with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as client:
            client.login(DEMO_USER, DEMO_PASSWORD)
            assert client.mail(STANDARD_MAILBOX)[0] == 250
            assert client.rcpt(to)[0] == 250
            code, reply = client.data(raw)
        assert code == 250 and b"queued as " in reply, reply
        return reply.decode().split("queued as ")[1].split()[0]

    def state(self, id: str) -> State | None:
        entry = self.reader.get(id)
        return entry.state if entry else None

    def queue(self, *args: str) -> tuple[int, Any]:
        """``queue --json ARGS`` as its own process: (exit status, parsed output)."""
        out = subprocess.run([sys.executable, "-m", "relay", "queue", "-c", str(self.config), "--json", *args],
                             capture_output=True, text=True, timeout=60, check=False)
        return out.returncode, json.loads(out.stdout) if out.stdout.strip() else None


@pytest.fixture
def daemon(m365: SimulatedM365, tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(m365, tmp_path)
    try:
        yield d
    finally:
        d.close()


def queue(capsys: pytest.CaptureFixture[str], daemon: Daemon, *args: str, json_out: bool = True) -> tuple[int, Any]:
    """The same command through the same entry point, in this process."""
    capsys.readouterr()
    rc = cli_main(["queue", "-c", str(daemon.config), *(["--json"] if json_out else []), *args])
    out = capsys.readouterr().out
    return rc, (json.loads(out) if json_out and out.strip() else out)


def subjects(m365: SimulatedM365) -> list[str]:
    return [a.content.split(b"Subject: ")[1].split(b"\r\n")[0].decode() for a in m365.exchange.accepted]


def test_queue_commands_against_a_running_daemon(daemon: Daemon, m365: SimulatedM365,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # A dead letter: Exchange refuses the only recipient permanently.
    m365.exchange.add_unknown_recipient(NOBODY)
    d = daemon.send("to nobody", to=NOBODY)
    wait_until(lambda: daemon.state(d) is State.DEAD, 15, "a dead letter")

    # Exchange in trouble: three messages wait in the queue.
    m365.exchange.inject("mail", TEMPORARY, times=None)
    ids = [daemon.send(f"msg {n}") for n in "abc"]
    wait_until(lambda: all((e := daemon.reader.get(i)) is not None and e.attempts == 1 and e.state is State.QUEUED
                           for i in ids), 15, "three deferred messages")
    a, b, c = ids

    rc, listed = daemon.queue("list")
    assert rc == 0 and [m["id"] for m in listed] == ids
    first = listed[0]
    assert first["state"] == "queued" and first["attempts"] == 1 and first["last_reply"].startswith("451 4.7.0")
    assert first["sender"] == STANDARD_MAILBOX and first["recipients"] == ["someone@fabrikam.example"]
    assert first["mailbox"] == STANDARD_MAILBOX and 40 <= first["next_attempt_in"] <= 60
    assert {"id", "age_seconds", "sender", "recipients", "state", "attempts", "last_reply"} <= set(first)

    rc, shown = queue(capsys, daemon, "show", a)
    assert rc == 0 and shown["id"] == a and shown["recipients_pending"] == ["someone@fabrikam.example"]

    assert queue(capsys, daemon, "hold", a) == (0, {"id": a, "ok": True, "state": "hold"})
    assert queue(capsys, daemon, "delete", c) == (0, {"id": c, "ok": True, "state": "deleted"})
    assert daemon.state(c) is None
    rc, shown = queue(capsys, daemon, "show", c)
    assert rc == 1 and "no message" in shown["error"]

    # Exchange is back; retry one message now: it goes, the held one does not.
    m365.exchange.clear_faults()
    assert queue(capsys, daemon, "retry", b) == (0, {"retried": 1})
    wait_until(lambda: daemon.state(b) is None, 15, "the retried message to be delivered")
    assert subjects(m365) == ["msg b"]
    assert daemon.state(a) is State.HOLD
    rc, listed = queue(capsys, daemon, "list")
    assert [(m["id"], m["state"]) for m in listed] == [(a, "hold")]

    # Released, it goes too.
    assert queue(capsys, daemon, "release", a) == (0, {"id": a, "ok": True, "state": "queued"})
    wait_until(lambda: daemon.state(a) is None, 15, "the released message to be delivered")
    assert subjects(m365) == ["msg b", "msg a"]

    # The dead letter, with its reason; after the admin's fix a requeue delivers it.
    rc, dead = daemon.queue("dead-letters")
    assert rc == 0 and [m["id"] for m in dead] == [d]
    assert dead[0]["state"] == "dead" and "5.1.10" in dead[0]["reason"]
    assert dead[0]["recipients_failed"][NOBODY].startswith("550 5.1.10")
    m365.exchange.unknown_recipients.discard(NOBODY)
    assert queue(capsys, daemon, "requeue", d) == (0, {"id": d, "ok": True, "state": "queued"})
    wait_until(lambda: daemon.state(d) is None, 15, "the requeued message to be delivered")
    assert subjects(m365) == ["msg b", "msg a", "to nobody"]

    # Nothing left; refusals are machine-readable too, and the text output is for people.
    assert queue(capsys, daemon, "retry", "--all") == (0, {"retried": 0})
    rc, refused = queue(capsys, daemon, "release", a)
    assert rc == 1 and refused["ok"] is False and "no message" in refused["error"]
    assert queue(capsys, daemon, "list", json_out=False) == (0, "queue is empty\n")
    assert queue(capsys, daemon, "dead-letters") == (0, [])


def test_queue_refuses_to_touch_a_message_in_flight_and_says_why(daemon: Daemon, m365: SimulatedM365,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    m365.exchange.set_reply_delay(1.0)  # the attempt takes a few seconds: the message is ACTIVE meanwhile
    try:
        id = daemon.send("slow")
        wait_until(lambda: daemon.state(id) is State.ACTIVE, 15, "the attempt to start")
        for cmd in ("hold", "delete"):
            rc, out = queue(capsys, daemon, cmd, id)
            assert rc == 1 and "being delivered, or next in line" in out["error"], out
    finally:
        m365.exchange.set_reply_delay(0)
    wait_until(lambda: daemon.state(id) is None, 30, "the delivery")
    assert subjects(m365) == ["slow"]


def test_queue_does_not_create_a_spool_where_there_is_none(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    assert cli_main(["queue", "--spool", str(missing), "list"]) == 1
    assert "no spool at" in capsys.readouterr().err
    assert not missing.exists()
