"""Invariant 1 under fire: SIGKILL the daemon at random points while clients send; nothing acknowledged is lost.

The relay runs as a real subprocess; 10 client threads send 500 messages in all; a killer thread
SIGKILLs the relay at seeded-random moments at least 20 times and restarts it. Clients that get no
2xx send again (a new attempt id), as a careful app would. At the end every attempt that got a 2xx
must have reached the simulated Exchange. Attempts delivered twice are counted: that may happen only
when the relay died between Exchange's 250 and recording it in the spool.
"""

from __future__ import annotations

import random
import re
import smtplib
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from relay.testing.harness import RelayProcess, free_port, relay_config, wait_until, write_config
from relay.testing.m365 import STANDARD_MAILBOX, SimulatedM365

SEED = 20261126
CLIENTS = 10
PER_CLIENT = 50
MIN_KILLS = 20

_ATTEMPT_RE = re.compile(rb"^X-Attempt: (\S+)\r$", re.MULTILINE)


def _message(attempt: str, logical: str) -> bytes:
    return (f"From: {STANDARD_MAILBOX}\r\nTo: crash@fabrikam.example\r\nSubject: crash test {logical}\r\n"
            f"Message-ID: <{attempt}@crash.test>\r\nX-Attempt: {attempt}\r\n\r\n"
            f"body of {logical}\r\n" + "x" * 2000 + "\r\n").encode()


@pytest.mark.timeout(400)
@pytest.mark.parametrize("upstream", ["chunking", "step-by-step"])
def test_sigkill_at_random_points_loses_no_acknowledged_message(tmp_path: Path, upstream: str) -> None:
    """With BDAT in one flight (what Exchange Online offers) and with MAIL/RCPT/DATA one at a time."""
    rng = random.Random(SEED)
    sim = SimulatedM365.standard(tmp_path / "m365")
    sim.exchange.limits.messages_per_minute = 1_000_000
    sim.exchange.wire.pipelining = sim.exchange.wire.chunking = upstream == "chunking"
    sim.start()
    port = free_port()
    config = relay_config(sim, tmp_path, port=port, overrides={
        "delivery": {"sync_wait": 0.5, "timeout": 10, "retry": {"first": 0.2, "max": 1.0},
                     "per_mailbox": {"connections": 3, "per_minute": 0}},
    })
    cfg = write_config(config, tmp_path / "relay.yaml")
    relay = RelayProcess(cfg).start(port)

    acked: set[str] = set()
    attempts_sent = Counter[str]()
    lock = threading.Lock()
    done = threading.Event()

    def client(n: int) -> None:
        rng_gap = random.Random(SEED + n)
        for i in range(PER_CLIENT):
            logical = f"c{n}m{i}"
            deadline = time.monotonic() + 240
            attempt_no = 0
            while time.monotonic() < deadline:
                attempt_no += 1
                attempt = f"{logical}a{attempt_no}"
                with lock:
                    attempts_sent[logical] += 1
                try:
                    with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
                        c.ehlo("crash.test")
                        c.mail(STANDARD_MAILBOX)
                        c.rcpt("crash@fabrikam.example")
                        code, _ = c.data(_message(attempt, logical))
                    if 200 <= code < 300:
                        with lock:
                            acked.add(attempt)
                        time.sleep(rng_gap.uniform(0.1, 0.6))  # an app's pace, so traffic spans the kills
                        break
                except (OSError, smtplib.SMTPException):
                    pass
                time.sleep(0.05)  # back off from a dead relay before the next attempt (not synchronisation)
            else:
                raise AssertionError(f"{logical} never acknowledged")

    kills = 0

    def killer() -> None:
        nonlocal kills
        while (kills < MIN_KILLS or not done.is_set()) and kills < 2 * MIN_KILLS:
            time.sleep(rng.uniform(0.05, 1.2))  # a random moment to strike
            relay.kill()
            kills += 1
            relay.start(port)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    kill_thread = threading.Thread(target=killer)
    for t in threads:
        t.start()
    kill_thread.start()
    for t in threads:
        t.join(300)
    done.set()
    kill_thread.join(120)
    assert not any(t.is_alive() for t in threads), "clients did not finish"
    assert kills >= MIN_KILLS, f"only {kills} kills before the clients finished"

    def delivered_attempts() -> Counter[str]:
        seen = Counter[str]()
        for accepted in sim.exchange.accepted:
            m = _ATTEMPT_RE.search(accepted.content)
            if m:
                seen[m.group(1).decode()] += 1
        return seen

    try:
        wait_until(lambda: acked <= set(delivered_attempts()), 180, "every acknowledged message at Exchange")
    finally:
        relay.terminate()
        sim.stop()
    seen = delivered_attempts()
    bdat = sum(1 for t in sim.exchange.wire.transactions if t.bdat_chunks)
    assert (bdat > 0) == (upstream == "chunking"), f"{bdat} transactions with BDAT"
    missing = acked - set(seen)
    duplicates = {a: n for a, n in seen.items() if n > 1}
    logical_acked = {a.rsplit("a", 1)[0] for a in acked}
    print(f"\ncrash test: {kills} SIGKILLs, {len(acked)} acknowledged attempts for {len(logical_acked)} messages, "
          f"{sum(attempts_sent.values())} attempts sent, {len(seen)} distinct attempts delivered, "
          f"{len(duplicates)} delivered twice (relay killed between Exchange's 250 and the spool update)")
    assert not missing, f"acknowledged but never delivered: {sorted(missing)[:10]}"
    assert len(logical_acked) == CLIENTS * PER_CLIENT
    # A duplicate needs a kill inside the window between Exchange's 250 and the spool update.
    assert len(duplicates) <= kills
