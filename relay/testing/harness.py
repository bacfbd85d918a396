"""Run the real relay against the simulated Microsoft 365: shared by tests, ``demo`` and ``bench``.

- :func:`relay_config` builds a config mapping pointing the relay at a :class:`SimulatedM365`.
- :class:`RelayThread` runs a :class:`relay.service.Relay` on its own event loop in a thread, so a
  synchronous caller (smtplib, swaks, the demo) can talk to it on real sockets.
- :class:`RelayProcess` runs ``python -m relay serve`` as a real subprocess (crash tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from relay.config import Settings, settings_from_dict
from relay.intake.passwords import hash_password
from relay.service import Relay
from relay.testing.m365 import (
    STANDARD_CLIENT_ID,
    STANDARD_MAILBOX,
    STANDARD_SECRET,
    STANDARD_SEND_AS,
    STANDARD_TENANT,
    SimulatedM365,
)

#: The local user the demo and the tests log in as.
DEMO_USER = "erp"
DEMO_PASSWORD = "demo-password-Zq7"

_HASH_CACHE: dict[str, str] = {}


def quick_hash(password: str) -> str:
    """A scrypt hash with cheap parameters (tests and demo only), cached per process."""
    if password not in _HASH_CACHE:
        _HASH_CACHE[password] = hash_password(password, log_n=10)
    return _HASH_CACHE[password]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now, chosen *below* the kernel's ephemeral range.

    A port the kernel hands out with ``bind(0)`` comes from the ephemeral range, and once released it
    may be reused at once as the source port of some outgoing connection, so the server started on it
    a moment later cannot bind (a test-suite race seen under pytest -n). Ports below that range are
    never given to outgoing connections.
    """
    low, _high = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # fall back to the kernel's choice
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def relay_config(
    sim: SimulatedM365,
    workdir: Path,
    *,
    port: int = 0,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A complete config mapping for the standard simulated tenant; ``overrides`` merged per section."""
    config: dict[str, Any] = {
        "listen": [{"address": f"127.0.0.1:{port}", "tls": "none"}],
        "hostname": "relay.test",
        "accept": {"networks": ["127.0.0.1/32"], "auth": "optional"},
        "users": [{"name": DEMO_USER, "password_hash": quick_hash(DEMO_PASSWORD),
                   "may_send_as": [STANDARD_MAILBOX, STANDARD_SEND_AS]}],
        "apps": [{
            "name": "contoso",
            "tenant_id": STANDARD_TENANT,
            "client_id": STANDARD_CLIENT_ID,
            "client_secret": STANDARD_SECRET,
            "authority_host": sim.authority_host,
            "smtp_host": sim.smtp_host,
            "smtp_port": sim.smtp_port,
            "token_ca_file": str(sim.ca_file),
            "smtp_ca_file": str(sim.ca_file),
            "timeout": 10,
        }],
        # The service principal has FullAccess on relay@ (a mailbox, XOAUTH2 user=) and SendAs on
        # alerts@ (a From address carried by relay@).
        "mailboxes": [{"address": STANDARD_MAILBOX, "app": "contoso"}],
        "sender": {"default_mailbox": STANDARD_MAILBOX, "rewrite_from": "when-not-allowed"},
        "delivery": {"sync_wait": 10, "timeout": 10, "retry": {"first": 1, "max": 30}},
        "spool": {"path": str(workdir / "spool")},
        "observability": {"log_format": "json", "log_level": "info"},
    }
    for section, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(config.get(section), dict):
            merged = copy.deepcopy(config[section])
            merged.update(value)
            config[section] = merged
        else:
            config[section] = value
    return config


def write_config(config: Mapping[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    path.chmod(0o600)
    return path


class RelayThread:
    """The real relay on its own event loop in a daemon thread."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time,
                 config_path: str | None = None) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.relay = Relay(settings, clock=clock, config_path=config_path)
        self._thread = threading.Thread(target=self._run, name="relay", daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], **kwargs: Any) -> RelayThread:
        return cls(settings_from_dict(config), **kwargs)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.relay.start())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()

    def start(self, timeout: float = 30.0) -> RelayThread:
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("relay did not start in time")
        if self._error is not None:
            raise self._error
        return self

    @property
    def port(self) -> int:
        return self.relay.ports[0]

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine on the relay's loop and wait for its result."""
        fut: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.call(self.relay.stop(grace=5), timeout)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)

    def __enter__(self) -> RelayThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RelayProcess:
    """``python -m relay serve -c CONFIG`` as a real child process."""

    def __init__(self, config_path: Path, *, log_path: Path | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.config_path = config_path
        self.log_path = log_path or config_path.with_suffix(".log")
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int, timeout: float = 30.0) -> RelayProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "-c", str(self.config_path), "--log-format", "json"],
            stdout=log, stderr=log, env=self.env,
        )
        log.close()
        wait_for_port("127.0.0.1", port, timeout, self.proc)
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Bounded wait until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"relay process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` seconds. Every wait in tests is bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


__all__ = [
    "DEMO_PASSWORD",
    "DEMO_USER",
    "RelayProcess",
    "RelayThread",
    "free_port",
    "quick_hash",
    "relay_config",
    "wait_for_port",
    "wait_until",
    "write_config",
]


def http_get(url: str) -> tuple[int, str]:
    """(status, body) of a GET on the relay's health endpoint, errors included (bounded by 10 s)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
