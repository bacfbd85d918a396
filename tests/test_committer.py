"""Group commit (relay.queue.committer): real spool files, a real thread, gates instead of sleeps."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from relay.envelope import Envelope, Route
from relay.errors import SpoolError
from relay.queue.committer import GroupCommitter
from relay.queue.spool import Entry, Spool, State, StoreRequest

ENV = Envelope("erp@contoso.com", ("a@example.com",))
ROUTE = Route(app="contoso", mailbox="noreply@contoso.com", sender="noreply@contoso.com")


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool")
    s.open()
    yield s
    s.close()


def request(spool: Spool, text: str, state: State = State.ACTIVE) -> StoreRequest:
    writer = spool.writer()
    writer.write(f"Subject: {text}\r\n\r\n{text}\r\n".encode())
    return StoreRequest(ENV, ROUTE, writer, message_id=f"<{text}@test>", client="test", state=state)


class Gate:
    """Holds the commit thread inside its first group until released, so the next group piles up."""

    def __init__(self, spool: Spool) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.groups: list[tuple[int, int]] = []
        self._original = spool.commit_group

    def __call__(self, stores: Sequence[StoreRequest], delivered: Sequence[str] = ()
                 ) -> list[Entry | SpoolError | None]:
        self.groups.append((len(stores), len(delivered)))
        if len(self.groups) == 1:
            self.entered.set()
            assert self.release.wait(10), "test never released the gate"
        return self._original(stores, delivered)


async def test_concurrent_changes_share_one_commit_and_all_are_durable(spool: Spool,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    delivered = spool.store(ENV, ROUTE, b"Subject: old\r\n\r\nold\r\n", state=State.ACTIVE)
    gate = Gate(spool)
    monkeypatch.setattr(spool, "commit_group", gate)
    committer = GroupCommitter(spool)
    first = asyncio.ensure_future(committer.store(request(spool, "first")))
    assert await asyncio.to_thread(gate.entered.wait, 10)
    rest = [asyncio.ensure_future(committer.store(request(spool, f"m{i}"))) for i in range(20)]
    gone = asyncio.ensure_future(committer.mark_delivered(delivered.id))
    await asyncio.sleep(0)  # let every task put its change on the queue
    gate.release.set()
    async with asyncio.timeout(10):
        entries = [await first, *await asyncio.gather(*rest)]
        await gone
    assert gate.groups == [(1, 0), (20, 1)], "the 21 changes that piled up went in one group"
    assert committer.groups == 2 and committer.changes == 22
    for entry in entries:
        row = spool.get(entry.id)
        assert row is not None and row.state is State.ACTIVE and row.message_id == entry.message_id
        assert spool.body_path(entry.id).read_bytes().endswith(f"{entry.message_id[1:-6]}\r\n".encode())
    assert spool.get(delivered.id) is None and not spool.body_path(delivered.id).exists()
    assert not list(spool.tmp_dir.iterdir())
    await committer.close()


async def test_one_bad_change_fails_alone(spool: Spool) -> None:
    committer = GroupCommitter(spool)
    good = request(spool, "good")
    bad = request(spool, "bad")
    bad.body.abort()  # its client went away mid-DATA: nothing to store
    async with asyncio.timeout(10):
        results = await asyncio.gather(committer.store(good), committer.store(bad), return_exceptions=True)
    assert isinstance(results[0], Entry) and spool.get(results[0].id) is not None
    assert isinstance(results[1], SpoolError) and "aborted" in str(results[1])
    await committer.close()


def test_a_failed_shared_transaction_is_retried_change_by_change(spool: Spool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    original = spool._tx
    calls: list[str] = []

    def tx(what: str = "update"):  # type: ignore[no-untyped-def]
        calls.append(what)
        if len(calls) == 1:
            raise SpoolError("spool: store: database: disk I/O error")
        return original(what)

    old = spool.commit_group([request(spool, "old")])[0]
    assert isinstance(old, Entry)
    requests = [request(spool, "a"), request(spool, "b")]
    monkeypatch.setattr(spool, "_tx", tx)
    results = spool.commit_group(requests, [old.id])
    assert calls == ["store", "store", "store", "mark delivered"], "one shared try, then one per change"
    assert all(isinstance(r, Entry) for r in results[:2]) and results[2] is None
    assert {e.id for e in spool.list()} == {r.id for r in results[:2] if isinstance(r, Entry)}


async def test_a_message_stored_after_its_client_left_is_handed_over(spool: Spool,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(spool)
    monkeypatch.setattr(spool, "commit_group", gate)
    committer = GroupCommitter(spool)
    adopted: asyncio.Future[Entry] = asyncio.get_running_loop().create_future()
    waiting = asyncio.ensure_future(committer.store(request(spool, "orphan"), on_orphan=adopted.set_result))
    assert await asyncio.to_thread(gate.entered.wait, 10)
    waiting.cancel()  # the client's connection dropped during the fsync
    gate.release.set()
    async with asyncio.timeout(10):
        entry = await adopted
    assert waiting.cancelled()
    row = spool.get(entry.id)
    assert row is not None and row.state is State.ACTIVE, "stored: it must be delivered, not forgotten"
    await committer.close()


async def test_closed_committer_refuses_and_queued_changes_are_committed_first(spool: Spool) -> None:
    committer = GroupCommitter(spool)
    pending = asyncio.ensure_future(committer.store(request(spool, "last")))
    await asyncio.sleep(0)
    async with asyncio.timeout(10):
        await committer.close()
        entry = await pending
    assert spool.get(entry.id) is not None
    late = request(spool, "late")
    with pytest.raises(SpoolError, match="stopping"):
        await committer.store(late)
    late.body.abort()


async def test_a_dead_commit_thread_fails_waiters_instead_of_hanging_them(spool: Spool,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate(spool)
    committer = GroupCommitter(spool)

    def dies(stores: Sequence[StoreRequest], delivered: Sequence[str] = ()) -> list[Entry | SpoolError | None]:
        gate.entered.set()
        assert gate.release.wait(10)
        raise SystemExit("simulated interpreter-level failure")  # not an Exception: escapes _commit

    monkeypatch.setattr(spool, "commit_group", dies)
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # the death is expected here
    first = asyncio.ensure_future(committer.store(request(spool, "first")))
    assert await asyncio.to_thread(gate.entered.wait, 10)
    second = asyncio.ensure_future(committer.store(request(spool, "second")))
    await asyncio.sleep(0)
    gate.release.set()
    async with asyncio.timeout(10):
        results = await asyncio.gather(first, second, return_exceptions=True)
    assert all(isinstance(r, SpoolError) for r in results), results
    with pytest.raises(SpoolError):
        await committer.store(request(spool, "third"))
