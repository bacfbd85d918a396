"""The fleet coordination client (relay.fleet) against a real redis-server on loopback.

Each test starts its own Redis on a free port (nothing persisted) and stops it by PID. Skipped when
redis-server is not installed; CI installs it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from relay.config import FleetSettings, settings_from_dict
from relay.errors import ConfigError
from relay.fleet import Fleet, FleetWait
from relay.fleet.status import read_status
from relay.observability import Metrics
from relay.testing.m365 import SimulatedM365
from relay.testing.redis import RedisServer, redis_available
from tests.conftest import RelayFactory

needs_redis = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")

MAILBOX = "relay@contoso.com"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if not redis_available():
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


def fleet_settings(url: str, **kw: Any) -> FleetSettings:
    return FleetSettings.model_validate({"redis": url, "key_prefix": "t:", "lease_ttl": 3, "sync_interval": 0.5,
                                         "deadline": 0.5, **kw})


def make(url: str, name: str, connections: int = 3, per_minute: int = 30, **kw: Any) -> Fleet:
    return Fleet(fleet_settings(url, instance_id=name, **kw), lambda _m: (connections, per_minute), metrics=Metrics())


async def joined(*fleets: Fleet) -> None:
    for f in fleets:
        await f.start([MAILBOX], ["contoso"])
        assert f.link.connected
    await until_shared(*fleets)


async def until_shared(*fleets: Fleet) -> None:
    """A new (or restarted) Redis: the registry is complete after one grace period."""
    deadline = time.monotonic() + 5
    while not all(f.link.shared for f in fleets):
        assert time.monotonic() < deadline, "the fleet did not form"
        await asyncio.sleep(0.1)


async def leave(*fleets: Fleet) -> None:
    for f in fleets:
        await f.stop()


# ------------------------------------------------------------------ config

BASE = {
    "apps": [{"name": "a", "tenant_id": "contoso.onmicrosoft.com", "client_id": "11111111-2222-3333-4444-555555555555",
              "client_secret": "x"}],
    "mailboxes": [{"address": MAILBOX, "app": "a"}],
}


def test_config_without_fleet_is_none() -> None:
    assert settings_from_dict(BASE).fleet is None


def test_config_fleet_defaults() -> None:
    s = settings_from_dict({**BASE, "fleet": {"redis": "redis://redis:6379/0"}})
    assert s.fleet is not None
    assert (s.fleet.fallback.connections, s.fleet.fallback.per_minute) == (1, 6)
    assert s.fleet.recipients_per_day == 10_000
    assert s.fleet.key_prefix == "oauth-smtp-relay:"


@pytest.mark.parametrize(("fleet", "key", "words"), [
    ({"redis": "http://redis:6379"}, "fleet.redis", "redis://"),
    ({"redis": "redis://:secret@redis:6379"}, "fleet.redis", "password_file"),
    ({"redis": "redis://r", "lease_ttl": 2, "sync_interval": 1}, "fleet", "three times sync_interval"),
    ({"redis": "redis://r", "fallback": {"connections": 0}}, "fleet.fallback.connections", "at least 1"),
    ({"redis": "redis://r", "instanceid": "x"}, "fleet.instanceid", "instance_id"),
])
def test_config_fleet_errors_name_key_and_fix(fleet: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from_dict({**BASE, "fleet": fleet}, "relay.yaml")
    assert err.value.key == key, str(err.value)
    assert words in str(err.value)


def test_config_fleet_password_file(tmp_path: Path) -> None:
    from relay.config import load_settings
    secret = tmp_path / "redis.pw"
    secret.write_text("s3cret\n")
    cfg = tmp_path / "relay.yaml"
    import yaml
    cfg.write_text(yaml.safe_dump({**BASE, "fleet": {"redis": "rediss://redis:6380/0", "password_file": str(secret)}}))
    s = load_settings(cfg)
    assert s.fleet is not None and s.fleet.password is not None
    assert s.fleet.password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s.fleet)


# ------------------------------------------------------------------ session slots

@needs_redis
async def test_slots_are_fleet_wide(redis_server: RedisServer) -> None:
    a, b = make(redis_server.url, "a"), make(redis_server.url, "b")
    await joined(a, b)
    try:
        leases = [await a.open_session(MAILBOX), await b.open_session(MAILBOX), await b.open_session(MAILBOX)]
        with pytest.raises(FleetWait) as wait:
            await a.open_session(MAILBOX)
        assert wait.value.reason == "session_slots"
        a.close_session(leases[0])
        await asyncio.wait_for(asyncio.gather(*a._aux), 2)
        assert (await b.open_session(MAILBOX)).startswith("b/")
        status = await read_status(a)
        (mbx,) = status["mailboxes"]
        assert mbx["slots_in_use"] == 3 and mbx["slot_holders"] == {"b": 3}
    finally:
        await leave(a, b)


@needs_redis
async def test_slots_of_a_dead_relay_come_back_within_the_ttl(redis_server: RedisServer) -> None:
    dead, alive = make(redis_server.url, "dead"), make(redis_server.url, "alive")
    await joined(dead, alive)
    try:
        for _ in range(3):
            await dead.open_session(MAILBOX)
        dead._task.cancel()  # type: ignore[union-attr]  # it stops renewing: as if SIGKILLed
        started = time.monotonic()
        with pytest.raises(FleetWait):
            await alive.open_session(MAILBOX)
        while True:
            try:
                await alive.open_session(MAILBOX)
                break
            except FleetWait as exc:
                assert time.monotonic() - started < 3 + 1.5, "slots not back within the lease TTL"
                await asyncio.sleep(exc.seconds)
        assert time.monotonic() - started >= 2.5  # not before the TTL ran out
    finally:
        await leave(alive)


@needs_redis
async def test_renewal_keeps_leases_alive(redis_server: RedisServer) -> None:
    a, b = make(redis_server.url, "a"), make(redis_server.url, "b")
    await joined(a, b)
    try:
        for _ in range(3):
            await a.open_session(MAILBOX)
        probe = aioredis.Redis.from_url(redis_server.url)
        deadline = time.monotonic() + 4.5  # longer than the 3 s TTL: only renewal keeps them
        while time.monotonic() < deadline:
            with pytest.raises(FleetWait):
                await b.open_session(MAILBOX)
            await asyncio.sleep(0.5)
        assert await probe.zcard("t:slots:" + MAILBOX) == 3
        await probe.aclose()
    finally:
        await leave(a, b)


# ------------------------------------------------------------------ rate and recipients

@needs_redis
async def test_per_minute_is_fleet_wide(redis_server: RedisServer) -> None:
    fleets = [make(redis_server.url, f"r{i}", per_minute=5) for i in range(3)]
    await joined(*fleets)
    try:
        taken = 0
        waits: list[FleetWait] = []
        for i in range(9):
            try:
                fleets[i % 3].done(await fleets[i % 3].take(MAILBOX, 1))
                taken += 1
            except FleetWait as exc:
                waits.append(exc)
        assert taken == 5
        assert all(w.reason == "per_minute" and 55 < w.seconds <= 61 for w in waits)
        status = await read_status(fleets[0])
        assert status["mailboxes"][0]["submissions_last_minute"] == 5
        assert status["mailboxes"][0]["recipients_last_24h"] == 5
    finally:
        await leave(*fleets)


@needs_redis
async def test_recipient_budget_waits_not_bounces(redis_server: RedisServer) -> None:
    a = make(redis_server.url, "a", per_minute=0, recipients_per_day=10)
    await joined(a)
    try:
        await a.take(MAILBOX, 6)
        await a.take(MAILBOX, 4)
        with pytest.raises(FleetWait) as wait:
            await a.take(MAILBOX, 1)
        assert wait.value.reason == "recipients_per_day"
        assert 86_400 - 120 < wait.value.seconds <= 86_400 + 60
    finally:
        await leave(a)


@needs_redis
async def test_cancel_gives_the_place_back(redis_server: RedisServer) -> None:
    a = make(redis_server.url, "a", per_minute=1, recipients_per_day=3)
    await joined(a)
    try:
        sub = await a.take(MAILBOX, 3)
        with pytest.raises(FleetWait):
            await a.take(MAILBOX, 1)
        await a.cancel(sub)
        await a.take(MAILBOX, 3)
    finally:
        await leave(a)


# ------------------------------------------------------------------ holds and probes

@needs_redis
async def test_a_hold_is_seen_by_all_and_one_probes(redis_server: RedisServer) -> None:
    a, b = make(redis_server.url, "a"), make(redis_server.url, "b")
    await joined(a, b)
    try:
        a.share_block("hold", "mailbox", MAILBOX, "auth_failed", "535 5.7.3 Authentication unsuccessful", "hint", 30)
        await asyncio.wait_for(asyncio.gather(*a._aux), 2)
        await b.sync()
        block = b.blocks[("mailbox", MAILBOX)]
        assert (block.kind, block.reason, block.by) == ("hold", "auth_failed", "a")
        assert await a.may_probe("mailbox", MAILBOX, 10)
        assert not await b.may_probe("mailbox", MAILBOX, 10)
        await a.probe_done("mailbox", MAILBOX, ok=False)
        assert await b.may_probe("mailbox", MAILBOX, 10)
        await b.probe_done("mailbox", MAILBOX, ok=True)
        await a.sync()
        assert a.blocks == {}
    finally:
        await leave(a, b)


@needs_redis
async def test_a_pause_does_not_override_a_hold(redis_server: RedisServer) -> None:
    a = make(redis_server.url, "a")
    await joined(a)
    try:
        a.share_block("hold", "app", "contoso", "invalid_secret", "AADSTS7000215", "", 30)
        a.share_block("pause", "app", "contoso", "token_endpoint", "503", "", 5)
        await asyncio.wait_for(asyncio.gather(*a._aux), 2)
        await a.sync()
        assert a.blocks[("app", "contoso")].kind == "hold"
    finally:
        await leave(a)


# ------------------------------------------------------------------ Redis trouble

@needs_redis
async def test_redis_away_falls_back_and_rejoins(redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    a = make(redis_server.url, "a", connections=3, per_minute=30)
    await joined(a)
    assert a.link.local_limits((3, 30)) == (3, 30)
    lease = await a.open_session(MAILBOX)
    redis_server.stop()
    started = time.monotonic()
    # No slot check can reach Redis: the call fails within the deadline; the relay waits one grace
    # period (the others notice and trim to their share), then goes on alone.
    try:
        lease2 = await a.open_session(MAILBOX)
    except FleetWait as settling:
        assert settling.reason == "fallback_settling"
        assert time.monotonic() - started < 1.5
        await asyncio.sleep(settling.seconds)
        lease2 = await a.open_session(MAILBOX)
    assert not a.link.connected
    assert a.link.local_limits((3, 30)) == (1, 6)
    assert a.metrics.fleet_connected._value.get() == 0
    started = time.monotonic()
    for _ in range(20):  # disconnected: no call waits for Redis at all
        await a.take(MAILBOX, 1)
    assert time.monotonic() - started < 0.1
    lost = [r for r in caplog.records if getattr(r, "event", "") == "fleet_disconnected"]
    assert len(lost) == 1, "logged once"
    redis_server.start()
    deadline = time.monotonic() + 5
    while not a.link.connected:
        assert time.monotonic() < deadline, "did not rejoin"
        await asyncio.sleep(0.1)
    # Back, but Redis restarted empty: the fallback share holds until every relay has re-registered.
    assert not a.link.shared and a.link.local_limits((3, 30)) == (1, 6)
    await until_shared(a)
    assert a.link.local_limits((3, 30)) == (3, 30)
    # The sessions opened before and during the outage are registered again.
    probe = aioredis.Redis.from_url(redis_server.url)
    members = {m.decode() for m in await probe.zrange("t:slots:" + MAILBOX, 0, -1)}
    await probe.aclose()
    assert members == {lease, lease2}
    assert a.metrics.fleet_connected._value.get() == 1
    await leave(a)


@needs_redis
async def test_nothing_secret_in_redis(redis_server: RedisServer) -> None:
    a = make(redis_server.url, "a", password=None)
    await joined(a)
    try:
        await a.open_session(MAILBOX)
        a.done(await a.take(MAILBOX, 2))
        a.share_block("hold", "mailbox", MAILBOX, "auth_failed", "535 5.7.3 Authentication unsuccessful", "", 30)
        await asyncio.wait_for(asyncio.gather(*a._aux), 2)
        await a.sync()
        probe = aioredis.Redis.from_url(redis_server.url)
        dump = b""
        async for key in probe.scan_iter("*"):
            dump += key + repr(await probe.dump(key)).encode()
        await probe.aclose()
        assert b"t:slots:" in dump
        for word in (b"Bearer", b"eyJ", b"secret", b"password"):
            assert word not in dump
    finally:
        await leave(a)


# ------------------------------------------------------------------ fleet status (the CLI)

def _config(tmp_path: Path, fleet: dict[str, Any] | None) -> Path:
    import yaml
    cfg = tmp_path / "relay.yaml"
    data: dict[str, Any] = {**BASE, "spool": {"path": str(tmp_path / "spool")}}
    if fleet is not None:
        data["fleet"] = fleet
    cfg.write_text(yaml.safe_dump(data))
    cfg.chmod(0o600)
    return cfg


@needs_redis
async def test_fleet_status_command(redis_server: RedisServer, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from relay.cli import main
    a, b = make(redis_server.url, "relay-a"), make(redis_server.url, "relay-b")
    await joined(a, b)
    try:
        await a.open_session(MAILBOX)
        await b.open_session(MAILBOX)
        await b.open_session(MAILBOX)
        b.done(await b.take(MAILBOX, 4))
        a.share_block("hold", "mailbox", MAILBOX, "auth_failed", "535 5.7.3 Authentication unsuccessful", "", 30)
        await asyncio.wait_for(asyncio.gather(*a._aux, *b._aux), 2)
        await a.sync()
        await b.sync()
        cfg = _config(tmp_path, {"redis": redis_server.url, "key_prefix": "t:"})
        code = await asyncio.to_thread(main, ["fleet", "-c", str(cfg), "status", "--json"])
        assert code == 0
        status = json.loads(capsys.readouterr().out)
        assert {i["instance"] for i in status["instances"] if i["alive"]} == {"relay-a", "relay-b"}
        (mbx,) = status["mailboxes"]
        assert mbx["slot_holders"] == {"relay-a": 1, "relay-b": 2} and mbx["slots_limit"] == 3
        assert mbx["submissions_last_minute"] == 1 and mbx["recipients_last_24h"] == 4
        assert mbx["block"]["reason"] == "auth_failed" and mbx["block"]["by"] == "relay-a"
        code = await asyncio.to_thread(main, ["fleet", "-c", str(cfg), "status"])
        text = capsys.readouterr().out
        assert code == 0
        assert "session slots    3 of 3 (relay-a: 1, relay-b: 2)" in text
        assert "hold             auth_failed" in text
    finally:
        await leave(a, b)


def test_fleet_status_without_fleet_or_redis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from relay.cli import main
    from relay.testing.harness import free_port
    assert main(["fleet", "-c", str(_config(tmp_path, None)), "status"]) == 2
    assert "fleet: is not configured" in capsys.readouterr().err
    dead = f"redis://127.0.0.1:{free_port()}/0"
    assert main(["fleet", "-c", str(_config(tmp_path, {"redis": dead, "deadline": 0.5})), "status"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach Redis" in err and "fleet.deadline" in err


def test_fleet_status_reads_the_fleets_secret_and_not_the_apps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """An admin's shell: no CREDENTIALS_DIRECTORY, the app's secret file out of reach. Redis's password
    is all `fleet status` needs, and it is still read (and its absence named)."""
    import yaml

    from relay.cli import main
    from relay.testing.harness import free_port
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    password = tmp_path / "redis-password"
    password.write_text("s3cret\n")
    apps = [{**BASE["apps"][0], "client_secret": None},
            {**BASE["apps"][0], "name": "b", "client_secret": None}]
    for app, secret in zip(apps, ["${CREDENTIALS_DIRECTORY}/client_secret", str(tmp_path / "missing")],
                           strict=True):
        del app["client_secret"]
        app["client_secret_file"] = secret
    dead = f"redis://127.0.0.1:{free_port()}/0"
    data = {**BASE, "apps": apps, "spool": {"path": str(tmp_path / "spool")},
            "fleet": {"redis": dead, "deadline": 0.5, "password_file": str(password)}}
    cfg = tmp_path / "relay.yaml"
    cfg.write_text(yaml.safe_dump(data))
    # The config loads (exit 1 is Redis not answering, not a config error: 2).
    assert main(["fleet", "-c", str(cfg), "status"]) == 1
    assert "cannot reach Redis" in capsys.readouterr().err
    # The service itself still needs the apps' secrets.
    assert main(["serve", "-c", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "apps[0].client_secret_file: environment variable CREDENTIALS_DIRECTORY is not set" in err
    # The fleet's own secret is read: a missing one is named.
    password.unlink()
    assert main(["fleet", "-c", str(cfg), "status"]) == 2
    assert "fleet.password_file" in capsys.readouterr().err


# ------------------------------------------------------------------ a relay with a fleet: readiness, metrics

@needs_redis
def test_relay_stays_ready_and_delivers_while_redis_is_away(redis_server: RedisServer, relay_factory: RelayFactory,
                                                            m365: SimulatedM365) -> None:
    import smtplib

    from relay.testing.harness import wait_until
    from relay.testing.m365 import STANDARD_MAILBOX

    relay = relay_factory(
        delivery={"sync_wait": 5},
        fleet={"redis": redis_server.url, "key_prefix": "ready:", "instance_id": "solo", "lease_ttl": 3,
               "sync_interval": 0.5, "deadline": 0.5})
    try:
        service = relay.relay
        assert service.fleet is not None

        def send(n: int) -> None:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as c:
                refused = c.sendmail(STANDARD_MAILBOX, ["x@fabrikam.example"], f"Subject: {n}\r\n\r\nbody\r\n")
            assert refused == {}

        wait_until(lambda: service.fleet is not None and service.fleet.link.shared, 10, "the fleet to form")
        ok, detail = service.readiness()
        assert ok and detail["fleet"] == {"connected": True, "instance": "solo", "limits": "shared"}
        send(1)
        m365.exchange.wait_for_messages(1, timeout=10)
        redis_server.stop()
        wait_until(lambda: not service.fleet.link.connected, 10, "the relay to notice Redis is gone")  # type: ignore[union-attr]
        ok, detail = service.readiness()
        assert ok, "Redis away must not make the relay unready"
        assert detail["fleet"]["connected"] is False and detail["fleet"]["limits"] == "fallback share"
        assert b"relay_fleet_connected 0.0" in service.metrics.render()
        send(2)  # delivered on the fallback share
        m365.exchange.wait_for_messages(2, timeout=20)
        redis_server.start()
        wait_until(lambda: service.fleet.link.connected, 10, "the relay to rejoin")  # type: ignore[union-attr]
        assert b"relay_fleet_connected 1.0" in service.metrics.render()
        send(3)
        m365.exchange.wait_for_messages(3, timeout=20)
    finally:
        relay.stop()


@needs_redis
@pytest.mark.timeout(200)
def test_fleet_bench_quick_runs(tmp_path: Path) -> None:
    """``python -m bench.fleet --quick`` keeps working: one relay without and with a fleet, three with."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "fleet.json"
    proc = subprocess.run([sys.executable, "-m", "bench.fleet", "--quick", "--messages", "30", "--json", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    rows = json.loads(out.read_text())
    assert [r["relays"] for r in rows] == [1, 1, 3]
    assert rows[0]["redis_calls_per_message"] == 0
    assert rows[1]["redis_calls_per_message"] >= 2  # a place in the minute, and its stamp
    assert "three relays, fleet (Redis)" in proc.stdout


def test_fleet_metrics_only_with_a_fleet() -> None:
    metrics = Metrics()
    assert b"relay_fleet" not in metrics.render()
    metrics.enable_fleet()
    metrics.enable_fleet()  # twice is fine
    assert b"relay_fleet_connected 0.0" in metrics.render()


@needs_redis
def test_daily_recipient_budget_spent_holds_instead_of_bouncing(redis_server: RedisServer,
                                                                relay_factory: RelayFactory,
                                                                m365: SimulatedM365) -> None:
    import smtplib

    from relay.queue.spool import State
    from relay.testing.harness import wait_until
    from relay.testing.m365 import STANDARD_MAILBOX

    relay = relay_factory(
        delivery={"sync_wait": 5},
        fleet={"redis": redis_server.url, "key_prefix": "budget:", "recipients_per_day": 3, "lease_ttl": 3,
               "sync_interval": 0.5, "deadline": 0.5})
    try:
        service = relay.relay
        wait_until(lambda: service.fleet is not None and service.fleet.link.shared, 10, "the fleet to form")
        rcpts = ["a@fabrikam.example", "b@fabrikam.example"]
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as c:
            assert c.sendmail(STANDARD_MAILBOX, rcpts, "Subject: 1\r\n\r\nbody\r\n") == {}
            # 2 of 3 recipients used: the next two would overspend the day. Queued, not refused.
            assert c.sendmail(STANDARD_MAILBOX, rcpts, "Subject: 2\r\n\r\nbody\r\n") == {}
        assert len(m365.exchange.accepted) == 1

        def held() -> bool:
            _ready, detail = service.readiness()
            return any(h["reason"] == "recipients_per_day" for h in detail["holds"])

        wait_until(held, 10, "the mailbox to be held for its daily recipient budget")
        queued = service.spool.list([State.QUEUED])
        assert len(queued) == 1 and queued[0].next_attempt_at > time.time() + 3600
        assert not service.spool.list([State.DEAD])
        assert m365.exchange.refusals(STANDARD_MAILBOX)["quota"] == 0
    finally:
        relay.stop()


@needs_redis
async def test_the_documented_acl_is_enough_and_confines_the_relay(redis_server: RedisServer) -> None:
    """docs/fleet.md's ACL line: every call the fleet makes works under it, keys outside the prefix do not."""
    import redis as sync_redis
    doc = (Path(__file__).resolve().parent.parent / "docs" / "fleet.md").read_text()
    (line,) = [ln.strip() for ln in doc.splitlines() if ln.strip().startswith("ACL SETUSER")]
    admin = sync_redis.Redis.from_url(redis_server.url)
    admin.execute_command(*line.replace("REDIS-PASSWORD", "acl-pw-7").split())  # type: ignore[no-untyped-call]
    admin.close()
    url = redis_server.url.replace("redis://", "redis://relay@")
    settings = FleetSettings.model_validate({"redis": url, "password": "acl-pw-7", "instance_id": "acl",
                                             "lease_ttl": 3, "sync_interval": 0.5})
    fleet = Fleet(settings, lambda _m: (3, 30), metrics=Metrics())
    await fleet.start([MAILBOX], ["contoso"])
    await until_shared(fleet)
    try:
        await fleet.open_session(MAILBOX)
        fleet.done(await fleet.take(MAILBOX, 1))
        await fleet.cancel(await fleet.take(MAILBOX, 1))
        fleet.share_block("hold", "mailbox", MAILBOX, "auth_failed", "535 5.7.3", "", 10)
        await asyncio.wait_for(asyncio.gather(*fleet._aux), 2)
        assert await fleet.may_probe("mailbox", MAILBOX, 5)
        await fleet.probe_done("mailbox", MAILBOX, ok=False, next_in=1)
        await fleet.probe_done("mailbox", MAILBOX, ok=True)
        await fleet.sync()
        assert (await read_status(fleet))["mailboxes"][0]["slots_in_use"] == 1
        assert fleet.counters.failures == 0 and fleet.link.connected
    finally:
        await fleet.stop()
    outsider = aioredis.Redis.from_url(url, password="acl-pw-7")
    with pytest.raises(sync_redis.exceptions.NoPermissionError):
        await outsider.set("elsewhere", "1")
    await outsider.aclose()


@needs_redis
async def test_rediss_verifies_the_server_certificate(tmp_path: Path) -> None:
    from relay.testing.certs import write_server_certificates
    certs = write_server_certificates(tmp_path / "certs")
    server = RedisServer(tmp_path / "redis-tls", tls=certs).start()
    try:
        trusted = Fleet(FleetSettings.model_validate({"redis": server.url, "ca_file": str(certs.ca_file),
                                                      "instance_id": "tls", "lease_ttl": 3, "sync_interval": 0.5}),
                        lambda _m: (3, 30))
        await trusted.start([MAILBOX], [])
        assert trusted.link.connected, "TLS with the configured CA"
        await trusted.stop()
        # Without the CA the certificate is not trusted: no connection, the relay falls back.
        untrusted = Fleet(FleetSettings.model_validate({"redis": server.url, "instance_id": "tls2"}),
                          lambda _m: (3, 30))
        await untrusted.start([MAILBOX], [])
        assert not untrusted.link.connected
        await untrusted.stop()
    finally:
        server.stop()


@needs_redis
async def test_rediss_checks_the_host_name(tmp_path: Path) -> None:
    import trustme

    from relay.testing.certs import ServerCertificates
    # A certificate for another name, from a CA the relay trusts: the name check must refuse it.
    ca = trustme.CA()
    leaf = ca.issue_cert("redis.elsewhere.test")
    d = tmp_path / "certs"
    d.mkdir()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    (d / "server.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    (d / "server.key").write_bytes(leaf.private_key_pem.bytes())
    certs = ServerCertificates(d, d / "ca.pem", d / "server.pem", d / "server.key")
    server = RedisServer(tmp_path / "redis-tls", tls=certs).start()
    try:
        fleet = Fleet(FleetSettings.model_validate({"redis": server.url, "ca_file": str(certs.ca_file),
                                                    "instance_id": "n"}), lambda _m: (3, 30))
        await fleet.start([MAILBOX], [])
        assert not fleet.link.connected
        await fleet.stop()
    finally:
        server.stop()
