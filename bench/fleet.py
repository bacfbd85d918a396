"""Fleet benchmark: one relay vs a fleet of three sharing one mailbox's limits through Redis.

```
python -m bench.fleet                # 600 messages per scenario
python -m bench.fleet --quick        # 60 messages per scenario (smoke)
python -m bench.fleet --json out.json
```

Every scenario sends the same messages as fast as 8 clients can (reused connections, AUTH PLAIN,
``sync_wait: 0``) and measures until the simulated Exchange accepted the last one. The per-mailbox
limits are the same everywhere: 3 sessions, no per-minute pacing (a per-minute limit would make
every scenario take exactly the limit's time; the fleet's tests check that it holds). Rows:

- one relay without ``fleet:``: the baseline;
- one relay with ``fleet:``: what the Redis calls cost one relay (round trips and ms per message,
  from the relay's own ``relay_fleet_redis_*`` counters);
- three relays with ``fleet:`` sharing the mailbox's 3 sessions, the load split over them.

Loopback only: the simulated Microsoft 365 in a child process (bench/simproc.py), a private
``redis-server`` on a free port, the relays as real processes; everything is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.loadgen import make_message, run_plain
from bench.simproc import SimProcess
from relay.testing.harness import RelayProcess, free_port, quick_hash, relay_config, write_config
from relay.testing.redis import RedisServer, redis_available

USER = "erp"
PASSWORD = "bench-password-Rk4"
MAILBOX = "relay@contoso.com"
RCPT = "customer@fabrikam.example"
CLIENTS = 8
#: per-message Redis calls (the sync loop's are per second, reported apart)
PER_MESSAGE_CALLS = ("slot", "slot_release", "rate", "rate_done", "rate_cancel")

_METRIC = re.compile(r'^relay_fleet_redis_(calls|seconds)_total\{call="([a-z_]+)"\} ([0-9.e+-]+)$', re.M)


def _metrics(port: int) -> dict[str, dict[str, float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, dict[str, float]] = {"calls": {}, "seconds": {}}
    for kind, call, value in _METRIC.findall(text):
        out[kind][call] = float(value)
    return out


class FleetBench:
    def __init__(self, workdir: Path, messages: int) -> None:
        self.workdir = workdir
        self.messages = messages
        self.sim = SimProcess(workdir / "m365", workdir / "m365.log")
        self.redis = RedisServer(workdir / "redis").start()
        self.rows: list[dict[str, Any]] = []
        self._seq = 0

    @contextlib.contextmanager
    def relays(self, name: str, count: int, *, fleet: bool) -> Iterator[list[tuple[RelayProcess, int, int]]]:
        started: list[tuple[RelayProcess, int, int]] = []
        try:
            for i in range(count):
                d = self.workdir / f"{name}{i}"
                d.mkdir(parents=True, exist_ok=True)
                port, http = free_port(), free_port()
                overrides: dict[str, Any] = {
                    "users": [{"name": USER, "password_hash": quick_hash(PASSWORD), "may_send_as": [MAILBOX]}],
                    "delivery": {"sync_wait": 0, "timeout": 30,
                                 "per_mailbox": {"connections": 3, "per_minute": 0}},
                    "observability": {"log_format": "json", "log_level": "warning", "http": f"127.0.0.1:{http}"},
                    "limits": {"max_connections": 500, "max_connections_per_address": 500},
                    "spool": {"path": str(d / "spool")},
                }
                if fleet:
                    overrides["fleet"] = {"redis": self.redis.url, "key_prefix": f"bench-{name}:",
                                          "instance_id": f"{name}{i}"}
                config = relay_config(self.sim, d, port=port, overrides=overrides)  # type: ignore[arg-type]
                proc = RelayProcess(write_config(config, d / "relay.yaml")).start(port, timeout=60)
                started.append((proc, port, http))
            if fleet:  # a new registry forms for one grace period (fallback share) before it is shared
                time.sleep(3)
            yield started
        finally:
            for proc, _, _ in started:
                try:
                    proc.terminate(timeout=30)
                except Exception:
                    proc.kill()

    def run(self, label: str, count: int, *, fleet: bool) -> dict[str, Any]:
        n = self.messages
        msgs = []
        for _ in range(n):
            self._seq += 1
            msgs.append(make_message(MAILBOX, RCPT, 10 * 1024, self._seq, tag=f"fleet-{label}"))
        with self.relays(label, count, fleet=fleet) as relays:
            base = self.sim.accepted()
            before = [_metrics(http) for _, _, http in relays]
            started = time.perf_counter()

            async def load() -> list[Any]:
                parts = [msgs[i::count] for i in range(count)]
                return await asyncio.gather(*[
                    run_plain("127.0.0.1", port, part, concurrency=max(CLIENTS // count, 1), reuse=True,
                              auth=(USER, PASSWORD), deadline=120) for (_, port, _), part in zip(relays, parts,
                                                                                                 strict=True)])

            results = asyncio.run(load())
            failed = sum(r.failed for r in results)
            sent = sum(r.sent for r in results)
            if failed or sent != n:
                raise RuntimeError(f"{label}: {sent} of {n} sent, {failed} failed")
            if not self.sim.wait_for(base + n, 180):
                raise RuntimeError(f"{label}: not all {n} messages reached the simulated Exchange")
            seconds = time.perf_counter() - started
            after = [_metrics(http) for _, _, http in relays]
        calls = sum(a["calls"].get(c, 0) - b["calls"].get(c, 0) for a, b in zip(after, before, strict=True)
                    for c in PER_MESSAGE_CALLS)
        spent = sum(a["seconds"].get(c, 0) - b["seconds"].get(c, 0) for a, b in zip(after, before, strict=True)
                    for c in PER_MESSAGE_CALLS)
        syncs = sum(a["calls"].get("sync", 0) - b["calls"].get("sync", 0) for a, b in zip(after, before, strict=True))
        row = {"scenario": label, "relays": count, "fleet": fleet, "messages": n, "seconds": round(seconds, 2),
               "rate": round(n / seconds, 1), "redis_calls_per_message": round(calls / n, 2),
               "redis_ms_per_message": round(spent / n * 1000, 3), "sync_calls": int(syncs)}
        self.rows.append(row)
        return row

    def stop(self) -> None:
        self.redis.stop()
        self.sim.stop()


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| scenario | relays | messages | seconds | result | Redis per message | notes |",
             "|---|---:|---:|---:|---|---|---|"]
    base = rows[0]["rate"] if rows else 0
    for r in rows:
        per = (f"{r['redis_calls_per_message']:.2f} round trips, {r['redis_ms_per_message']:.2f} ms"
               if r["fleet"] else "none")
        ratio = f"{r['rate'] / base:.2f}x one relay without fleet" if base else ""
        lines.append(f"| {r['scenario']} | {r['relays']} | {r['messages']} | {r['seconds']:.2f} | "
                     f"{r['rate']:.0f} msg/s | {per} | {ratio}; {r['sync_calls']} sync round trips |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="60 messages per scenario (smoke run)")
    p.add_argument("--messages", type=int, default=None)
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if not redis_available():
        print("redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 1
    n = args.messages or (60 if args.quick else 600)
    workdir = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    bench = FleetBench(workdir, n)
    try:
        bench.run("one relay, no fleet", 1, fleet=False)
        bench.run("one relay, fleet (Redis)", 1, fleet=True)
        bench.run("three relays, fleet (Redis), one mailbox's 3 sessions shared", 3, fleet=True)
    finally:
        bench.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(render(bench.rows))
    if args.json:
        args.json.write_text(json.dumps(bench.rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
