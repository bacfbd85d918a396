"""The durable queue: real files in tmp_path, no sleeps, every wait bounded."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from relay.envelope import Envelope, Route
from relay.errors import SpoolError, SpoolFull
from relay.queue.entries import new_queue_id
from relay.queue.spool import BodyWriter, Entry, Spool, State
from tests.fakeclock import FakeClock

ROOT = Path(__file__).resolve().parents[1]
START = 1_700_000_000.0

ENV = Envelope("erp@contoso.com", ("a@example.com", "b@example.com", "c@example.com"), ("SMTPUTF8",))
ROUTE = Route(app="contoso", mailbox="NoReply@contoso.com", sender="noreply@contoso.com", notes=("rewrite",))
OTHER = Route(app="contoso", mailbox="alerts@contoso.com", sender="alerts@contoso.com")
BODY = b"From: erp@contoso.com\r\nSubject: hi\r\n\r\n" + bytes(range(256)) * 40 + b"\r\n"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def spool(tmp_path: Path, clock: FakeClock) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", clock=clock)
    report = s.open()
    assert report.recovered and report.tmp_removed == 0
    yield s
    s.close()


def entry(store: Spool, qid: str) -> Entry:
    """The row of a message the test knows is in the spool."""
    found = store.get(qid)
    assert found is not None, f"{qid} is not in the spool"
    return found


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# --------------------------------------------------------------------------- basics


def test_store_get_list_round_trip(spool: Spool, clock: FakeClock) -> None:
    e = spool.store(ENV, ROUTE, BODY, message_id="<m1@contoso.com>", client="user erp from 127.0.0.1")
    assert len(e.id) == 16 and e.id.isalnum()
    assert e.state is State.QUEUED and e.attempts == 0
    assert e.created_at == e.next_attempt_at == clock()
    assert e.size == len(BODY)
    got = spool.get(e.id)
    assert got == e
    assert got.envelope == ENV and got.route == ROUTE and isinstance(got.route.notes, tuple)
    assert got.message_id == "<m1@contoso.com>" and got.client == "user erp from 127.0.0.1"
    assert spool.body_path(e.id).read_bytes() == BODY
    assert spool.list() == [e]
    assert spool.list([State.QUEUED]) == [e]
    assert spool.list([State.DEAD]) == []
    assert spool.list([]) == []
    assert spool.get("0000000000000000") is None
    assert _files(spool.tmp_dir) == []


def test_store_from_streaming_writer(spool: Spool) -> None:
    w = spool.writer()
    assert isinstance(w, BodyWriter)
    for i in range(0, len(BODY), 1000):
        w.write(BODY[i : i + 1000])
    assert w.size == len(BODY) and w.sha256 == hashlib.sha256(BODY).hexdigest()
    assert _files(spool.tmp_dir) == [w.id]
    e = spool.store(ENV, ROUTE, w, state=State.ACTIVE, next_attempt_at=5.0)
    assert e.id == w.id and e.state is State.ACTIVE and e.next_attempt_at == 5.0
    assert spool.body_path(e.id).read_bytes() == BODY
    assert _files(spool.tmp_dir) == []
    with pytest.raises(SpoolError):
        spool.store(ENV, ROUTE, w)  # a writer commits once


def test_writer_abort_and_context_manager(spool: Spool) -> None:
    w = spool.writer()
    w.write(b"partial")
    w.abort()
    w.abort()
    assert _files(spool.tmp_dir) == []
    with pytest.raises(SpoolError):
        spool.store(ENV, ROUTE, w)
    with spool.writer() as w2:
        w2.write(b"x")
    assert _files(spool.tmp_dir) == []
    assert spool.list() == []


def test_permissions(spool: Spool) -> None:
    e = spool.store(ENV, ROUTE, BODY)
    for d in (spool.path, spool.tmp_dir, spool.bodies_dir):
        assert d.stat().st_mode & 0o777 == 0o700
    assert spool.body_path(e.id).stat().st_mode & 0o777 == 0o600
    assert spool.db_path.stat().st_mode & 0o077 == 0


def test_queue_ids_unique_sortable_safe() -> None:
    ids = [new_queue_id(1_700_000_000.0) for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all((len(i) == 16 and i.isalnum() and i.islower()) or i.isdigit() for i in ids)
    assert new_queue_id(1_700_000_001.0) > ids[-1]
    with pytest.raises(ValueError):
        Spool(Path("/nonexistent")).body_path("../etc/passwd")


def test_pending_recipients_and_defer(spool: Spool, clock: FakeClock) -> None:
    e = spool.store(ENV, ROUTE, BODY)
    assert e.pending_recipients == ENV.rcpt_tos
    assert spool.claim(e.id) is not None
    clock.advance(1)
    d = spool.defer(
        e.id,
        next_attempt_at=clock() + 60,
        reply="451 4.7.0 Temporary server error",
        delivered=["a@example.com"],
        failed={"b@example.com": "550 5.1.10 RESOLVER.ADR.RecipientNotFound"},
        reason="transient",
    )
    assert d.state is State.QUEUED and d.attempts == 1 and d.next_attempt_at == clock() + 60
    assert d.recipients_done == ("a@example.com",)
    assert d.recipients_failed == {"b@example.com": "550 5.1.10 RESOLVER.ADR.RecipientNotFound"}
    assert d.pending_recipients == ("c@example.com",)
    assert d.last_reply.startswith("451") and d.reason == "transient"
    assert spool.get(e.id) == d
    with pytest.raises(SpoolError):  # only the claimer (ACTIVE) may defer
        spool.defer(e.id, next_attempt_at=0, reply="x")
    assert spool.claim(e.id) is not None
    d2 = spool.defer(e.id, next_attempt_at=0, reply="r", delivered=["a@example.com", "c@example.com"])
    assert d2.attempts == 2 and d2.recipients_done == ("a@example.com", "c@example.com")
    assert d2.pending_recipients == ()
    with pytest.raises(SpoolError):
        spool.defer("0000000000000000", next_attempt_at=0, reply="x")


def test_claim_due_order_limit_and_skip(spool: Spool, clock: FakeClock) -> None:
    t = clock()
    late = spool.store(ENV, ROUTE, b"1", next_attempt_at=t + 100)
    b = spool.store(ENV, ROUTE, b"2", next_attempt_at=t - 5)
    a = spool.store(ENV, ROUTE, b"3", next_attempt_at=t - 10)
    other = spool.store(ENV, OTHER, b"4", next_attempt_at=t - 20)
    held = spool.store(ENV, ROUTE, b"5", state=State.HOLD, next_attempt_at=t - 30)
    assert spool.next_due_at() == t - 20
    got = spool.claim_due(t, 10, skip_mailboxes={"noreply@CONTOSO.com"})
    assert [e.id for e in got] == [other.id] and got[0].state is State.ACTIVE
    got = spool.claim_due(t, 1)
    assert [e.id for e in got] == [a.id]
    got = spool.claim_due(t, 10)
    assert [e.id for e in got] == [b.id]
    assert spool.claim_due(t, 10) == []
    assert spool.claim_due(t, 0) == []
    assert spool.next_due_at() == t + 100
    assert [e.id for e in spool.claim_due(t + 100, 10)] == [late.id]
    assert spool.next_due_at() is None
    assert entry(spool, held.id).state is State.HOLD
    assert spool.claim(held.id) is None


def test_mark_delivered_removes_row_and_body(spool: Spool) -> None:
    e = spool.store(ENV, ROUTE, BODY)
    spool.claim(e.id)
    spool.mark_delivered(e.id, "250 2.0.0 OK")
    assert spool.get(e.id) is None
    assert _files(spool.bodies_dir) == []
    spool.mark_delivered(e.id, "250 2.0.0 OK")  # idempotent


def test_kill_requeue(spool: Spool, clock: FakeClock) -> None:
    e = spool.store(ENV, ROUTE, BODY)
    spool.claim(e.id)
    spool.defer(
        e.id,
        next_attempt_at=clock(),
        reply="451",
        delivered=["a@example.com"],
        failed={"b@example.com": "550"},
    )
    spool.claim(e.id)
    dead = spool.kill(e.id, "expired", "451 4.7.0 Temporary server error")
    assert dead.state is State.DEAD and dead.reason == "expired" and dead.last_reply.startswith("451 4.7.0")
    assert spool.body_path(e.id).exists()  # dead letters keep their body
    assert spool.kill(e.id, "again").last_reply.startswith("451 4.7.0")  # reply kept when not given
    assert spool.claim_due(clock() + 10**6, 10) == []
    assert not spool.hold(e.id, "x") and not spool.release(e.id) and spool.retry(e.id) == 0
    clock.advance(3600)
    assert spool.requeue(e.id)
    r = spool.get(e.id)
    assert r is not None and r.state is State.QUEUED and r.attempts == 0 and r.reason == ""
    assert r.created_at == clock() and r.next_attempt_at == clock()
    assert r.recipients_done == ("a@example.com",) and r.recipients_failed == {}
    assert r.pending_recipients == ("b@example.com", "c@example.com")
    assert not spool.requeue(e.id)
    with pytest.raises(SpoolError):
        spool.kill("0000000000000000", "x")


def test_hold_release_retry_delete(spool: Spool, clock: FakeClock) -> None:
    a = spool.store(ENV, ROUTE, b"a", next_attempt_at=clock() + 500)
    b = spool.store(ENV, ROUTE, b"b", next_attempt_at=clock() + 900)
    assert spool.hold(a.id, "admin")
    assert not spool.hold(a.id, "admin")  # already held
    assert entry(spool, a.id).reason == "admin"
    assert [e.id for e in spool.claim_due(clock() + 10**6, 10)] == [b.id]
    # b is ACTIVE now: hold/delete refuse it
    assert entry(spool, b.id).state is State.ACTIVE
    assert not spool.hold(b.id, "admin") and not spool.delete(b.id)
    spool.defer(b.id, next_attempt_at=clock() + 900, reply="")
    clock.advance(1)
    assert spool.retry() == 1 and entry(spool, b.id).next_attempt_at == clock()
    assert spool.retry(a.id) == 0  # held, not queued
    assert spool.release(a.id) and not spool.release(a.id)
    ra = entry(spool, a.id)
    assert ra.state is State.QUEUED and ra.next_attempt_at == clock() and ra.reason == ""
    assert spool.delete(a.id) and not spool.delete(a.id)
    assert spool.get(a.id) is None and not spool.body_path(a.id).exists()
    assert not spool.delete("../../etc/passwd")


def test_unclaim_and_delete_active(spool: Spool, clock: FakeClock) -> None:
    e = spool.store(ENV, ROUTE, BODY, state=State.ACTIVE)
    assert not spool.delete(e.id)  # the admin may not delete what a worker holds
    assert spool.unclaim(e.id, clock() + 30)
    u = entry(spool, e.id)
    assert u.state is State.QUEUED and u.attempts == 0 and u.next_attempt_at == clock() + 30
    assert not spool.unclaim(e.id, clock())  # not ACTIVE any more
    assert not spool.delete_active(e.id)
    assert spool.claim(e.id)
    assert spool.delete_active(e.id)
    assert spool.get(e.id) is None and _files(spool.bodies_dir) == []


def test_kill_records_partial_results(spool: Spool) -> None:
    e = spool.store(ENV, ROUTE, BODY, state=State.ACTIVE)
    d = spool.kill(
        e.id, "expired", "451 4.7.0", delivered=["a@example.com"], failed={"b@example.com": "550 5.1.1"}
    )
    assert d.state is State.DEAD and d.recipients_done == ("a@example.com",)
    assert d.recipients_failed == {"b@example.com": "550 5.1.1"} and d.pending_recipients == (
        "c@example.com",
    )


def test_stats(spool: Spool, clock: FakeClock) -> None:
    s = spool.stats()
    assert s.total == 0 and s.oldest_created_at is None and s.total_bytes == 0
    a = spool.store(ENV, ROUTE, b"x" * 10)
    clock.advance(5)
    spool.store(ENV, ROUTE, b"y" * 20, state=State.HOLD)
    c = spool.store(ENV, ROUTE, b"z" * 30)
    spool.claim(c.id)
    spool.kill(spool.store(ENV, ROUTE, b"w").id, "x")
    s = spool.stats()
    assert s.counts == {State.QUEUED: 1, State.ACTIVE: 1, State.HOLD: 1, State.DEAD: 1}
    assert s.oldest_created_at == a.created_at
    assert s.total_bytes == 61 and s.total == 4


def test_writable(spool: Spool) -> None:
    assert spool.writable()
    assert _files(spool.tmp_dir) == []


# --------------------------------------------------------------------------- recovery


def test_recovery_after_simulated_crash(tmp_path: Path, clock: FakeClock) -> None:
    s = Spool(tmp_path / "spool", clock=clock)
    s.open()
    kept = s.store(ENV, ROUTE, BODY)
    active = s.store(ENV, ROUTE, BODY, next_attempt_at=clock() + 999)
    assert s.claim(active.id)
    lost = s.store(ENV, ROUTE, BODY)
    dead_lost = s.store(ENV, ROUTE, BODY)
    s.kill(dead_lost.id, "expired")
    w = s.writer()
    w.write(b"half a message")  # crash during DATA: left in tmp/
    s.close()  # (a kill -9 drops the flock the same way)
    os.unlink(s.body_path(lost.id))
    os.unlink(s.body_path(dead_lost.id))
    orphan = new_queue_id(clock())  # crash between rename into bodies/ and the commit
    (s.bodies_dir / orphan).write_bytes(b"never acknowledged")
    (s.tmp_dir / "junk").write_bytes(b"")

    clock.advance(10)
    s2 = Spool(tmp_path / "spool", clock=clock)
    rep = s2.open()
    try:
        assert (rep.tmp_removed, rep.orphan_bodies_removed, rep.missing_bodies, rep.active_requeued) == (
            2,
            1,
            1,
            1,
        )
        assert _files(s2.tmp_dir) == []
        assert not (s2.bodies_dir / orphan).exists()
        a = entry(s2, active.id)
        assert a.state is State.QUEUED and a.next_attempt_at == clock()
        lo = entry(s2, lost.id)
        assert lo.state is State.DEAD and lo.reason == "body missing"
        assert entry(s2, dead_lost.id).reason == "expired"
        assert entry(s2, kept.id).state is State.QUEUED
        assert s2.body_path(kept.id).read_bytes() == BODY
    finally:
        s2.close()
    s3 = Spool(tmp_path / "spool", clock=clock)
    rep = s3.open()  # clean now
    s3.close()
    assert (rep.tmp_removed, rep.orphan_bodies_removed, rep.missing_bodies, rep.active_requeued) == (
        0,
        0,
        0,
        0,
    )


_CHILD = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from relay.envelope import Envelope, Route
from relay.queue.spool import Spool
s = Spool(Path(sys.argv[1]))
s.open()
env = Envelope("erp@contoso.com", ("a@example.com",))
route = Route(app="contoso", mailbox="noreply@contoso.com", sender="noreply@contoso.com")
i = 0
while True:
    body = (b"message %d\r\n" % i) * (1 + i % 50)
    e = s.store(env, route, body)
    sys.stdout.write(f"{e.id} {i}\n")
    sys.stdout.flush()
    i += 1
"""


def test_kill_9_loses_no_acknowledged_message(tmp_path: Path) -> None:
    """A real SIGKILL in the middle of a store loop: every id printed (= 2xx given) survives intact."""
    path = tmp_path / "spool"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), str(ROOT)], stdout=subprocess.PIPE, text=True
    )
    acked: dict[str, int] = {}
    timer = threading.Timer(60, proc.kill)  # bound the wait whatever happens
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            qid, i = line.split()
            acked[qid] = int(i)
            if len(acked) >= 150:
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for line in proc.stdout:  # ids printed before the kill landed
            qid, i = line.split()
            acked[qid] = int(i)
    finally:
        timer.cancel()
        proc.kill()
        proc.wait(timeout=30)
    assert len(acked) >= 150
    s = Spool(path)
    s.open()  # the dead process's flock is gone
    try:
        for qid, n in acked.items():
            e = s.get(qid)
            assert e is not None and e.state is State.QUEUED
            assert s.body_path(qid).read_bytes() == (b"message %d\r\n" % n) * (1 + n % 50)
        assert _files(s.tmp_dir) == []
        assert set(_files(s.bodies_dir)) == {e.id for e in s.list()}
    finally:
        s.close()


# --------------------------------------------------------------------------- concurrency


def test_second_instance_like_queue_cli(spool: Spool, tmp_path: Path, clock: FakeClock) -> None:
    ids = [spool.store(ENV, ROUTE, b"%d" % i).id for i in range(5)]
    with pytest.raises(SpoolError, match="in use"):
        Spool(spool.path).open()  # a second daemon may not recover under a running one
    cli = Spool(spool.path, clock=clock)
    rep = cli.open(recover=False)
    try:
        assert not rep.recovered
        w = spool.writer()
        w.write(b"receiving")  # the daemon is mid-DATA: the CLI must not touch tmp/
        assert cli.hold(ids[0], "admin")
        claimed = spool.claim_due(clock(), 2)
        assert [e.id for e in claimed] == ids[1:3]
        assert {e.id: e.state for e in cli.list()}[ids[1]] is State.ACTIVE
        assert not cli.hold(ids[1], "admin") and not cli.delete(ids[1])
        assert cli.delete(ids[3])
        assert [e.id for e in spool.claim_due(clock(), 10)] == [ids[4]]
        assert cli.stats().counts[State.ACTIVE] == 3
        assert cli.release(ids[0])
        assert [e.id for e in spool.claim_due(clock(), 10)] == [ids[0]]
        assert _files(spool.tmp_dir) == [w.id]
        spool.store(ENV, ROUTE, w)
        assert len(cli.list([State.QUEUED])) == 1
    finally:
        cli.close()


def test_claim_is_exclusive_between_instances_and_threads(spool: Spool, clock: FakeClock) -> None:
    n = 300
    for i in range(n):
        spool.store(ENV, ROUTE if i % 2 else OTHER, b"%d" % i)
    other = Spool(spool.path, clock=clock)
    other.open(recover=False)
    got: list[list[str]] = [[] for _ in range(6)]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        s = spool if k % 2 else other
        try:
            while True:
                batch = s.claim_due(clock(), 7)
                if not batch:
                    return
                got[k].extend(e.id for e in batch)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    other.close()
    assert not errors and not any(t.is_alive() for t in threads)
    flat = [i for g in got for i in g]
    assert len(flat) == n and len(set(flat)) == n
    assert spool.stats().counts[State.ACTIVE] == n


def test_claim_single_id_exactly_one_winner(spool: Spool) -> None:
    e = spool.store(ENV, ROUTE, BODY)
    barrier = threading.Barrier(8)
    wins: list[bool] = []

    def worker() -> None:
        barrier.wait(timeout=10)
        wins.append(spool.claim(e.id) is not None)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(wins) == [False] * 7 + [True]


# --------------------------------------------------------------------------- disk trouble


def _assert_nothing_left(spool: Spool) -> None:
    assert _files(spool.tmp_dir) == []
    assert _files(spool.bodies_dir) == []
    assert spool.list() == []


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM])
def test_write_error_is_spool_full_and_leaves_nothing(
    spool: Spool, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    def boom(fd: int, data: object) -> int:
        raise OSError(err, os.strerror(err))

    with monkeypatch.context() as m:
        m.setattr(os, "write", boom)
        with pytest.raises(SpoolFull):
            spool.store(ENV, ROUTE, BODY)
    _assert_nothing_left(spool)


def test_other_write_error_is_spool_error(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(fd: int, data: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(os, "write", boom)
        with pytest.raises(SpoolError) as info:
            spool.store(ENV, ROUTE, BODY)
    assert not isinstance(info.value, SpoolFull) and "EIO" in str(info.value)
    _assert_nothing_left(spool)


@pytest.mark.parametrize("fail_on", [1, 2])  # 1: the body's fsync, 2: the bodies/ directory's fsync
def test_fsync_error_is_spool_full_and_leaves_nothing(
    spool: Spool, monkeypatch: pytest.MonkeyPatch, fail_on: int
) -> None:
    real = os.fsync
    calls = [0]

    def flaky(fd: int) -> None:
        calls[0] += 1
        if calls[0] == fail_on:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", flaky)
        with pytest.raises(SpoolFull):
            spool.store(ENV, ROUTE, BODY)
    _assert_nothing_left(spool)
    assert spool.store(ENV, ROUTE, BODY).size == len(BODY)  # fine again afterwards


def test_database_full_is_spool_full_and_leaves_nothing(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FullConn:
        def __init__(self, real: sqlite3.Connection) -> None:
            self.real = real

        def execute(self, sql: str, *a: Any) -> object:
            if sql.startswith("INSERT"):
                exc = sqlite3.OperationalError("database or disk is full")
                exc.sqlite_errorcode = 13
                raise exc
            return self.real.execute(sql, *a)

    real = spool._conn
    assert real is not None
    monkeypatch.setattr(spool, "_conn", FullConn(real))
    with pytest.raises(SpoolFull):
        spool.store(ENV, ROUTE, BODY)
    monkeypatch.setattr(spool, "_conn", real)
    _assert_nothing_left(spool)


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "mnt"
    where.mkdir()
    yield where
    subprocess.run(["umount", str(where)], capture_output=True, check=False, timeout=30)


def _mount(args: list[str]) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting needs root and mount(8)")
    r = subprocess.run(["mount", *args], capture_output=True, text=True, check=False, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"mount not permitted here: {r.stderr.strip()}")


def test_real_full_filesystem_tmpfs(mounted: Path) -> None:
    _mount(["-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mounted)])
    s = Spool(mounted / "spool")
    s.open()
    try:
        stored = []
        body = os.urandom(64 * 1024)
        with pytest.raises(SpoolFull):
            for _ in range(64):  # 4 MB > 1 MB: bounded
                stored.append(s.store(ENV, ROUTE, body).id)
        assert stored, "at least one message should have fitted"
        assert _files(s.tmp_dir) == []
        assert sorted(_files(s.bodies_dir)) == sorted(stored)
        for qid in stored:
            assert s.body_path(qid).read_bytes() == body
        assert s.delete(stored[0])  # making room works
        assert s.store(ENV, ROUTE, b"small").size == 5
    finally:
        s.close()


def test_read_only_spool_is_spool_full(mounted: Path) -> None:
    _mount(["-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mounted)])
    s = Spool(mounted / "spool")
    s.open()
    kept = s.store(ENV, ROUTE, BODY)
    s.close()
    r = subprocess.run(
        ["mount", "-o", "remount,ro", str(mounted)], capture_output=True, text=True, check=False, timeout=30
    )
    if r.returncode != 0:
        pytest.skip(f"remount read-only not permitted: {r.stderr.strip()}")
    ro = Spool(mounted / "spool")
    with pytest.raises(SpoolFull, match="EROFS"):  # the daemon cannot own a read-only spool
        ro.open()
    ro.close()
    cli = Spool(mounted / "spool")
    try:
        try:
            cli.open(recover=False)
        except SpoolError:
            return  # refusing to open at all is an acceptable answer
        assert not cli.writable()
        with pytest.raises(SpoolFull):
            cli.store(ENV, ROUTE, BODY)
        assert cli.get(kept.id) is not None
    finally:
        cli.close()


def test_unwritable_directory_for_service_user(tmp_path: Path) -> None:
    """The relay runs as a service user; a spool directory it may not write fails clearly."""
    if os.geteuid() == 0:
        pytest.skip("root writes through directory permissions; "
                    "test_unwritable_directory_for_nobody covers this case when run as root")
    path = tmp_path / "spool"
    s = Spool(path)
    s.open()
    s.close()
    os.chmod(path / "tmp", 0o555)
    os.chmod(path / "bodies", 0o555)
    try:
        with pytest.raises(SpoolError):
            s = Spool(path)
            s.open(recover=False)
            try:
                s.store(ENV, ROUTE, BODY)
            finally:
                s.close()
    finally:
        os.chmod(path / "tmp", 0o700)
        os.chmod(path / "bodies", 0o700)


def test_unwritable_directory_for_nobody() -> None:
    """A root-owned spool opened by the unprivileged user "nobody" fails clearly (full, or a spool error)."""
    if os.geteuid() != 0:
        pytest.skip("switching to the user nobody needs root; "
                    "test_unwritable_directory_for_service_user covers this case for other users")
    base = Path(tempfile.mkdtemp(prefix="spool-ro-"))  # reachable by "nobody", unlike tmp_path
    try:
        os.chmod(base, 0o755)
        path = base / "spool"
        s = Spool(path)
        s.open()
        s.store(ENV, ROUTE, BODY)
        s.close()
        for d in (path, path / "tmp", path / "bodies"):
            os.chmod(d, 0o755)
        for f in path.iterdir():
            if f.is_file():
                os.chmod(f, 0o644)
        code = (
            "import os, sys\nfrom pathlib import Path\nsys.path.insert(0, sys.argv[2])\n"
            "from relay.queue.spool import Spool\nfrom relay.errors import SpoolError, SpoolFull\n"
            "from relay.envelope import Envelope, Route\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "out = []\n"
            "for recover in (True, False):\n"
            "    s = Spool(Path(sys.argv[1]))\n"
            "    try:\n"
            "        s.open(recover=recover)\n"
            "        s.store(Envelope('a@b.c', ('d@e.f',)), Route('x', 'm@b.c', 'm@b.c'), b'body')\n"
            "        out.append('stored')\n"
            "    except SpoolFull:\n        out.append('full')\n"
            "    except SpoolError:\n        out.append('error')\n"
            "    finally:\n        s.close()\n"
            "print(' '.join(out))\n"
        )
        r = subprocess.run(
            [sys.executable, "-c", code, str(path), str(ROOT)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        first, second = r.stdout.split()
        assert first == "full"  # cannot open the lock file: EACCES
        assert second in {"full", "error"}
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------- state machine


class SpoolMachine(RuleBasedStateMachine):
    """Random sequences of operations keep the spool equal to a simple model (id -> state)."""

    stored = Bundle("stored")

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="spool-sm-")
        self.clock = FakeClock(START)
        self.spool = Spool(Path(self.dir) / "spool", clock=self.clock, fsync=False)
        self.spool.open()
        self.model: dict[str, State] = {}

    def teardown(self) -> None:
        self.spool.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(target=stored, state=st.sampled_from([State.QUEUED, State.ACTIVE, State.HOLD]))
    def store(self, state: State) -> str:
        e = self.spool.store(ENV, ROUTE, b"body", state=state)
        self.model[e.id] = state
        return e.id

    @rule(limit=st.integers(0, 3))
    def claim_due(self, limit: int) -> None:
        got = self.spool.claim_due(self.clock(), limit)
        queued = [i for i, s in self.model.items() if s is State.QUEUED]
        assert len(got) == min(limit, len(queued))
        for e in got:
            assert self.model[e.id] is State.QUEUED
            self.model[e.id] = State.ACTIVE

    @rule(qid=stored)
    def defer(self, qid: str) -> None:
        if self.model.get(qid) is State.ACTIVE:
            assert self.spool.defer(qid, next_attempt_at=self.clock(), reply="451").state is State.QUEUED
            self.model[qid] = State.QUEUED
        else:
            with pytest.raises(SpoolError):
                self.spool.defer(qid, next_attempt_at=self.clock(), reply="451")

    @rule(qid=stored)
    def kill(self, qid: str) -> None:
        if qid in self.model:
            self.spool.kill(qid, "r")
            self.model[qid] = State.DEAD

    @rule(qid=stored)
    def hold(self, qid: str) -> None:
        ok = self.spool.hold(qid, "admin")
        assert ok == (self.model.get(qid) is State.QUEUED)
        if ok:
            self.model[qid] = State.HOLD

    @rule(qid=stored)
    def release(self, qid: str) -> None:
        ok = self.spool.release(qid)
        assert ok == (self.model.get(qid) is State.HOLD)
        if ok:
            self.model[qid] = State.QUEUED

    @rule(qid=stored)
    def requeue(self, qid: str) -> None:
        ok = self.spool.requeue(qid)
        assert ok == (self.model.get(qid) is State.DEAD)
        if ok:
            self.model[qid] = State.QUEUED

    @rule(qid=consumes(stored))
    def delete(self, qid: str) -> None:
        ok = self.spool.delete(qid)
        assert ok == (qid in self.model and self.model[qid] is not State.ACTIVE)
        if ok:
            del self.model[qid]

    @rule(qid=consumes(stored))
    def deliver(self, qid: str) -> None:
        if self.model.get(qid) is State.ACTIVE:
            self.spool.mark_delivered(qid, "250")
            del self.model[qid]

    @rule()
    def retry_all(self) -> None:
        assert self.spool.retry() == sum(s is State.QUEUED for s in self.model.values())

    @rule()
    def restart(self) -> None:
        self.spool.close()
        self.clock.advance(1)
        self.spool = Spool(Path(self.dir) / "spool", clock=self.clock, fsync=False)
        rep = self.spool.open()
        assert rep.active_requeued == sum(s is State.ACTIVE for s in self.model.values())
        assert rep.missing_bodies == rep.orphan_bodies_removed == 0
        self.model = {i: State.QUEUED if s is State.ACTIVE else s for i, s in self.model.items()}

    @invariant()
    def matches_model(self) -> None:
        assert {e.id: e.state for e in self.spool.list()} == self.model
        assert set(_files(self.spool.bodies_dir)) == set(self.model)
        counts = self.spool.stats().counts
        for state in State:
            assert counts[state] == sum(s is state for s in self.model.values())


TestSpoolStateMachine = SpoolMachine.TestCase
TestSpoolStateMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_min_free_refuses_new_bodies_but_not_queue_changes(tmp_path: Path) -> None:
    from relay.errors import SpoolFull
    from relay.queue.spool import Spool

    spool = Spool(tmp_path / "spool")
    spool.open()
    try:
        free = spool.free_bytes()
        assert free > 0
        spool.min_free = free * 10  # "the disk is nearly full"
        with pytest.raises(SpoolFull):
            spool.writer()
        spool.min_free = 1
        writer = spool.writer()
        writer.abort()
    finally:
        spool.close()


def test_writer_keeps_a_small_body_in_memory_and_drops_a_big_one(spool: Spool) -> None:
    small = spool.writer(keep=100)
    small.write(b"Subject: a\r\n\r\n")
    small.write(b"body\r\n")
    assert small.kept() == b"Subject: a\r\n\r\nbody\r\n"
    entry = spool.store(ENV, ROUTE, small)
    assert spool.body_path(entry.id).read_bytes() == b"Subject: a\r\n\r\nbody\r\n"
    big = spool.writer(keep=100)
    big.write(b"x" * 60)
    big.write(b"y" * 60)
    assert big.kept() is None, "over the limit: the file is the only copy"
    big.abort()
    plain = spool.writer()
    plain.write(b"z")
    assert plain.kept() is None, "keep=0 (the default): nothing kept"
    plain.abort()


def test_holds_file_is_read_only_while_the_daemon_holds_the_spool(tmp_path: Path) -> None:
    daemon = Spool(tmp_path / "spool")
    daemon.open()  # takes the lock, like the running relay
    cli = Spool(tmp_path / "spool")
    cli.open(recover=False)
    try:
        assert cli.daemon_holds() == []
        daemon.publish_holds([{"scope": "mailbox", "name": "relay@contoso.com", "reason": "auth_failed"}])
        assert cli.daemon_holds() == [{"scope": "mailbox", "name": "relay@contoso.com", "reason": "auth_failed"}]
        assert not list(cli.path.glob(".holds-*")), "written atomically, no temporary file left"
        daemon.close()  # a crash would leave holds.json behind: without the lock it means nothing
        assert (tmp_path / "spool" / "holds.json").exists() and cli.daemon_holds() is None
    finally:
        cli.close()
        daemon.close()
    restarted = Spool(tmp_path / "spool")
    restarted.open()
    restarted.publish_holds([])
    assert not (tmp_path / "spool" / "holds.json").exists()
    restarted.close()
