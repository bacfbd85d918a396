"""Upstream sessions: reused across messages, at most N per mailbox, dead ones replaced; no blocking on the loop."""

from __future__ import annotations

import asyncio
import logging
import smtplib
from concurrent.futures import ThreadPoolExecutor

import pytest

from relay.testing.harness import wait_until
from relay.testing.m365 import STANDARD_MAILBOX, SimulatedM365
from tests.conftest import RelayFactory


def _send(port: int, n: int) -> None:
    raw = (f"From: {STANDARD_MAILBOX}\r\nTo: x@fabrikam.example\r\nSubject: pool {n}\r\n\r\nbody {n}\r\n").encode()
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.sendmail(STANDARD_MAILBOX, ["x@fabrikam.example"], raw)


def test_sessions_are_reused_and_limited_per_mailbox(m365: SimulatedM365, relay_factory: RelayFactory) -> None:
    m365.exchange.limits.messages_per_minute = 10_000
    relay = relay_factory(delivery={"per_mailbox": {"connections": 3, "per_minute": 0}})
    with ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda n: _send(relay.port, n), range(60)))
    wait_until(lambda: len(m365.exchange.accepted) == 60, 60, "60 messages at Exchange")
    stats = m365.exchange.stats()
    assert stats.connections <= 3, f"{stats.connections} connections for 60 messages"
    assert stats.max_concurrent_sessions.get(STANDARD_MAILBOX, 0) <= 3
    assert m365.entra.token_requests == 1


def test_no_blocking_call_on_the_event_loop(m365: SimulatedM365, relay_factory: RelayFactory,
                                            monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """The known blocking calls (password hashing, fsync, CA loading, sleeping, DNS) must never run
    on the relay's event loop thread; asyncio debug mode also reports any step that took long."""
    import hashlib
    import os
    import socket
    import ssl
    import threading
    import time

    relay = relay_factory(users=[{"name": "erp", "password_hash": __import__(
        "relay.testing.harness", fromlist=["quick_hash"]).quick_hash("pw-1"), "may_send_as": []}])
    loop_thread: list[int] = []
    relay.loop.call_soon_threadsafe(lambda: loop_thread.append(threading.get_ident()))
    relay.call(asyncio.sleep(0))
    on_loop: list[str] = []

    def guard(name: str, fn: object) -> object:
        def wrapper(*args: object, **kwargs: object) -> object:
            if threading.get_ident() in loop_thread:
                on_loop.append(name)
            return fn(*args, **kwargs)  # type: ignore[operator]
        return wrapper

    monkeypatch.setattr(hashlib, "scrypt", guard("hashlib.scrypt", hashlib.scrypt))
    monkeypatch.setattr(os, "fsync", guard("os.fsync", os.fsync))
    monkeypatch.setattr(time, "sleep", guard("time.sleep", time.sleep))
    monkeypatch.setattr(socket, "getaddrinfo", guard("socket.getaddrinfo", socket.getaddrinfo))
    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations",
                        guard("SSLContext.load_verify_locations", ssl.SSLContext.load_verify_locations))
    loop = relay.loop
    loop.call_soon_threadsafe(loop.set_debug, True)
    loop.slow_callback_duration = 1.0
    caplog.set_level(logging.WARNING, logger="asyncio")
    for n in range(10):
        _send(relay.port, n)
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as c:
        c.login("erp", "pw-1")
        c.sendmail(STANDARD_MAILBOX, ["x@fabrikam.example"], b"Subject: auth\r\n\r\nbody\r\n")
    wait_until(lambda: len(m365.exchange.accepted) == 11, 30, "11 messages")
    assert not on_loop, f"blocking calls on the event loop: {sorted(set(on_loop))}"
    slow = [r.getMessage() for r in caplog.records if r.name == "asyncio" and "took" in r.getMessage()]
    assert not slow, slow
