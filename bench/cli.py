"""``python -m bench``: the relay as a real process against the simulated Microsoft 365, with the peers
measured in the same run, and one table with the project's speed and memory targets.

See bench/README.md for what each row measures and how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.loadgen import Message, RunResult, make_message, open_exchange, run_direct, run_plain
from bench.peers import EmailProxy, PeerUnavailable, Postfix
from bench.profile import Profiler
from bench.rss import PeakWatch, rss_bytes
from bench.simproc import SECOND_CLIENT_ID, SECOND_MAILBOX, SECOND_SECRET, SimProcess

TABLE_HEADER = "| scenario | messages | seconds | result | ratio | notes |"

USER = "erp"
PASSWORD = "bench-password-Rk4"  # a throwaway local user of the benchmark's own relay
MAILBOX = "relay@contoso.com"
RCPT = "customer@fabrikam.example"


@dataclass(frozen=True)
class Sizes:
    """Message counts and sizes of one mode."""

    ingest: int
    e2e: int
    direct: int
    latency: int
    big: int
    many: int
    many_size: int
    first_connections: int
    postfix: int
    emailproxy: int
    deadline: float
    size: int = 10 * 1024
    clients: int = 8
    upstream_connections: int = 3


FULL = Sizes(ingest=3000, e2e=1500, direct=3000, latency=300, big=35_000_000, many=10, many_size=5_000_000,
             first_connections=50, postfix=3000, emailproxy=60, deadline=30.0)
QUICK = Sizes(ingest=80, e2e=48, direct=80, latency=20, big=4_000_000, many=10, many_size=400_000,
              first_connections=16, postfix=80, emailproxy=8, deadline=10.0)


@dataclass
class Row:
    scenario: str
    messages: int | None
    seconds: float | None
    result: str
    ratio: str = ""
    notes: str = ""


@dataclass
class Target:
    name: str
    measured: str
    wanted: str
    ok: bool | None  # None: not measured (skipped)
    why: str = ""


@dataclass
class Report:
    mode: str
    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    profile: str = ""


class BenchError(Exception):
    """The harness could not do its job (a process did not start, messages were lost)."""


# ---------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes = QUICK if args.quick else FULL
        if args.scale != 1.0:
            s = self.sizes
            self.sizes = Sizes(**{**asdict(s), **{k: max(1, int(getattr(s, k) * args.scale)) for k in (
                "ingest", "e2e", "direct", "latency", "postfix", "emailproxy")}})
        self.report = Report(mode="quick" if args.quick else "full")
        self.workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="relay-bench-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sim: SimProcess | None = None
        self._relays: list[Any] = []
        self._relay_starts = 0
        self._hash = ""
        self.log = print if args.verbose else (lambda *a, **k: None)

    # ---- helpers ----------------------------------------------------------------------------

    @property
    def long_deadline(self) -> float:
        """For what must complete (delivery of what was sent, big messages): generous, still bounded."""
        return max(120.0, 4 * self.sizes.deadline)

    def progress(self, text: str) -> None:
        print(f"  .. {text}", file=sys.stderr, flush=True)

    def messages(self, n: int, size: int | None = None, sender: str = MAILBOX, tag: str = "bench") -> list[Message]:
        size = size or self.sizes.size
        return [make_message(sender, RCPT, size, i, tag=tag) for i in range(n)]

    @contextlib.contextmanager
    def relay(self, name: str, *, sync_wait: float, connections: int | None = None,
              two_apps: bool = False, fsync: bool = True) -> Iterator[Any]:
        """A fresh ``python -m relay serve`` with pacing off; stopped (SIGTERM) on exit."""
        from relay.testing.harness import RelayProcess, free_port, relay_config, write_config

        assert self.sim is not None
        d = self.workdir / name
        d.mkdir(parents=True, exist_ok=True)
        port = free_port()
        apps_extra: dict[str, Any] = {}
        config = relay_config(self.sim, d, port=port, overrides={  # type: ignore[arg-type]
            "users": [{"name": USER, "password_hash": self._hash,
                       "may_send_as": [MAILBOX, SECOND_MAILBOX, "alerts@contoso.com"]}],
            "delivery": {"sync_wait": sync_wait, "timeout": 30,
                         "per_mailbox": {"connections": connections or self.sizes.upstream_connections,
                                         "per_minute": 0}},
            "observability": {"log_format": "json", "log_level": self.args.relay_log_level},
            "limits": {"max_connections": 500, "max_connections_per_address": 500},
            "spool": {"path": str(d / "spool"), "fsync": fsync},
        })
        if two_apps:
            second = dict(config["apps"][0])
            second.update(name="second", client_id=SECOND_CLIENT_ID, client_secret=SECOND_SECRET)
            config["apps"] = [*config["apps"], second]
            config["mailboxes"] = [*config["mailboxes"], {"address": SECOND_MAILBOX, "app": "second"}]
        config.update(apps_extra)
        path = write_config(config, d / "relay.yaml")
        proc = RelayProcess(path)
        try:
            proc.start(port, timeout=60)
        except Exception as exc:
            tail = ""
            with contextlib.suppress(OSError):
                tail = proc.log_path.read_text()[-1500:]
            proc.kill()
            raise BenchError(f"relay {name} did not start: {exc}\n{tail}") from exc
        self._relay_starts += 1
        proc.port = port  # type: ignore[attr-defined]
        self._relays.append(proc)
        try:
            yield proc
        finally:
            try:
                proc.terminate(timeout=30)
            except Exception:
                proc.kill()
            self._relays.remove(proc)

    def wait_delivered(self, count: int, timeout: float) -> float:
        """Block until the simulated Exchange accepted ``count`` messages in all; monotonic time then."""
        assert self.sim is not None
        if not self.sim.wait_for(count, timeout):
            got = self.sim.accepted()
            raise BenchError(f"only {got} of {count} messages reached the simulated Exchange within {timeout}s")
        return time.perf_counter()

    def add(self, row: Row) -> None:
        self.report.rows.append(row)
        self.progress(f"{row.scenario}: {row.result} {row.ratio} {row.notes}".rstrip())

    def check(self, result: RunResult, what: str, expected: int, *, partial_ok: bool = True) -> str:
        """Raise on failed messages; a run cut short by its deadline is fine (the rate holds) and noted."""
        if result.failed or result.sent == 0 or (result.timed_out and not partial_ok):
            raise BenchError(f"{what}: {result.sent} of {expected} sent, {result.failed} failed"
                             f"{' (deadline reached)' if result.timed_out else ''}; first error: "
                             f"{result.first_error()}")
        if result.timed_out or result.sent < expected:
            return f"stopped at the {self.sizes.deadline:g} s deadline after {result.sent} of {expected}; "
        return ""

    # ---- scenarios ---------------------------------------------------------------------------

    def direct_ceiling(self) -> None:
        assert self.sim is not None
        s = self.sizes
        token = self.sim.token()
        msgs = self.messages(s.direct, tag="direct")
        r = asyncio.run(run_direct(self.sim.smtp_host, self.sim.smtp_port, self.sim.ca_file, MAILBOX, token, msgs,
                                   connections=s.upstream_connections, deadline=s.deadline))
        cut = self.check(r, "direct submission", s.direct)
        self.report.values["direct_rate"] = r.rate
        self.add(Row(f"direct to simulated Exchange (aiosmtplib, {s.upstream_connections} reused STARTTLS+XOAUTH2 "
                     "sessions) = ceiling", r.sent, r.duration, f"{r.rate:.0f} msg/s", "1.00x",
                     cut + "no relay in the path"))

    def _plain(self, port: int, n: int, *, reuse: bool, auth: bool, tag: str) -> tuple[RunResult, float, str]:
        """Run the 8-client load; returns (result, seconds until the simulated Exchange had them all, note)."""
        assert self.sim is not None
        base = self.sim.accepted()
        msgs = self.messages(n, tag=tag)
        start = time.perf_counter()
        r = asyncio.run(run_plain("127.0.0.1", port, msgs, concurrency=self.sizes.clients, reuse=reuse,
                                  auth=(USER, PASSWORD) if auth else None, deadline=self.sizes.deadline))
        cut = self.check(r, tag, n)
        done = self.wait_delivered(base + r.sent, self.long_deadline)
        return r, done - start, cut

    def relay_ingest(self) -> None:
        """sync_wait 0: the client gets 250 once the message is fsync'd; delivery runs behind."""
        self._ingest("ingest", fsync=True, variants=(
            ("new_auth", "new connection per message, AUTH PLAIN", False, True),
            ("reused_auth", "reused connections, AUTH PLAIN once", True, True),
            ("new_noauth", "new connection per message, no AUTH (allowlisted 127.0.0.1)", False, False),
        ))

    def fsync_off(self) -> None:
        """Diagnostic only (``--fsync-off``): what the spool's fsyncs cost. Not a valid configuration."""
        self._ingest("nofsync", fsync=False, variants=(
            ("new_auth", "new connection per message, AUTH PLAIN", False, True),))

    def _ingest(self, name: str, *, fsync: bool, variants: tuple[tuple[str, str, bool, bool], ...]) -> None:
        s = self.sizes
        direct = self.report.values.get("direct_rate")
        suffix = "" if fsync else ", DIAGNOSTIC spool fsync OFF"
        prefix = "" if fsync else "nofsync_"
        with self.relay(name, sync_wait=0, fsync=fsync) as proc:
            for key, label, reuse, auth in variants:
                profiler = None
                if self.args.profile and key == "new_auth" and fsync:
                    profiler = Profiler(proc.proc.pid, self.workdir / "profile-ingest.txt")
                user0, sys0 = cpu_split(proc.proc.pid)
                try:
                    r, e2e, cut = self._plain(proc.port, s.ingest, reuse=reuse, auth=auth, tag=f"{name}-{key}")
                finally:
                    if profiler is not None:
                        self.report.profile = profiler.stop()
                user1, sys1 = cpu_split(proc.proc.pid)
                user, system = user1 - user0, sys1 - sys0
                cpu = user + system
                self.report.values[f"{prefix}ingest_{key}"] = r.rate
                self.report.values[f"{prefix}e2e0_{key}"] = r.sent / e2e
                self.report.values[f"{prefix}cpu_ms_{key}"] = cpu / r.sent * 1e3
                acked = "250 after fsync" if fsync else "250 after write, no fsync"
                self.add(Row(f"relay ingest, {label}, {s.clients} clients, sync_wait 0{suffix}", r.sent, r.duration,
                             f"{r.rate:.0f} msg/s", "", f"{cut}{acked}; delivery runs behind"))
                ratio = f"{r.sent / e2e / direct:.2f}x direct" if direct else ""
                self.add(Row(f"relay end-to-end, {label}, sync_wait 0{suffix}", r.sent, e2e,
                             f"{r.sent / e2e:.0f} msg/s", ratio, f"until the last one reached Exchange; relay CPU "
                             f"{cpu / r.sent * 1e3:.2f} ms/msg ({cpu / e2e:.0%} of a core; user "
                             f"{user / r.sent * 1e3:.2f}, system {system / r.sent * 1e3:.2f}) for ingest + delivery"))

    def relay_sync(self) -> None:
        """sync_wait 10 (default): the client's 250 carries Exchange's queue id."""
        s = self.sizes
        direct = self.report.values.get("direct_rate")
        with self.relay("sync", sync_wait=10) as proc:
            for key, label, reuse in (("new_auth", "new connection per message, AUTH PLAIN", False),
                                      ("reused_auth", "reused connections, AUTH PLAIN once", True)):
                user0, sys0 = cpu_split(proc.proc.pid)
                r, e2e, cut = self._plain(proc.port, s.e2e, reuse=reuse, auth=True, tag=f"sync-{key}")
                user1, sys1 = cpu_split(proc.proc.pid)
                user, system = (user1 - user0) / r.sent * 1e3, (sys1 - sys0) / r.sent * 1e3
                rate = r.sent / e2e
                self.report.values[f"e2e10_{key}"] = rate
                self.report.values[f"cpu_ms_e2e10_{key}"] = user + system
                ratio = f"{rate / direct:.2f}x direct" if direct else ""
                self.add(Row(f"relay end-to-end, {label}, {s.clients} clients, sync_wait 10s (default)", r.sent, e2e,
                             f"{rate:.0f} msg/s", ratio, cut + f"250 after Exchange's 250; relay CPU "
                             f"{user + system:.2f} ms/msg (user {user:.2f}, system {system:.2f})"))
            self.latency(proc.port)
            if self.args.quick and self._wanted("memory"):
                self.memory(shared=proc)

    def floor(self) -> None:
        """The thinnest forwarder built from the same libraries (bench/floor.py): what the relay's
        end-to-end rate and added latency would be with no spool, policy or bookkeeping at all."""
        import select
        import subprocess

        from relay.testing.harness import free_port

        assert self.sim is not None
        s = self.sizes

        @contextlib.contextmanager
        def forwarder(sessions: int) -> Iterator[int]:
            port = free_port()
            assert self.sim is not None
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.floor", str(port), self.sim.smtp_host, str(self.sim.smtp_port),
                 str(self.sim.ca_file), MAILBOX, self.sim.token(), str(sessions)],
                stdout=subprocess.PIPE, stderr=(self.workdir / "floor.log").open("ab"),
                cwd=str(Path(__file__).resolve().parent.parent))
            try:
                assert proc.stdout is not None
                ready, _, _ = select.select([proc.stdout], [], [], 60)
                if not ready or proc.stdout.readline().strip() != b"ready":
                    raise BenchError(f"the floor forwarder did not start (exit code {proc.poll()}); see floor.log")
                yield port
            finally:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)

        with forwarder(0) as port:
            msgs = self.messages(s.ingest, tag="sink")
            r = asyncio.run(run_plain("127.0.0.1", port, msgs, concurrency=s.clients, reuse=False, auth=None,
                                      deadline=s.deadline))
            cut = self.check(r, "sink", s.ingest)
            self.report.values["floor_sink_rate"] = r.rate
            ours = self.report.values.get("ingest_new_noauth")
            self.add(Row(f"floor: bare aiosmtpd sink (250, then discard), new connection per message, no AUTH, "
                         f"{s.clients} clients", r.sent, r.duration, f"{r.rate:.0f} msg/s", "",
                         cut + (f"the relay's no-AUTH ingest row is {ours / r.rate:.2f}x this; " if ours else "")
                         + "what accepting SMTP with aiosmtpd costs here, before any work"))
        with forwarder(s.upstream_connections) as port:
            r, e2e, cut = self._plain(port, s.e2e, reuse=True, auth=True, tag="floor")
            rate = r.sent / e2e
            self.report.values["floor_rate"] = rate
            direct = self.report.values.get("direct_rate")
            relay = self.report.values.get("e2e10_reused_auth")
            self.add(Row(f"floor: bare aiosmtpd -> aiosmtplib forwarder, no spool/policy/logs, reused connections, "
                         f"{s.clients} clients", r.sent, e2e, f"{rate:.0f} msg/s",
                         f"{rate / direct:.2f}x direct" if direct else "",
                         cut + (f"the relay's sync row is {relay / rate:.2f}x this; " if relay else "")
                         + "the best any relay built from these libraries can do here"))
            self.latency(port, label="floor forwarder", key="floor")

    def latency(self, relay_port: int, label: str = "relay, sync_wait 10s", key: str = "relay") -> None:
        """Sequential single messages, alternating direct / relay on two warm aiosmtplib connections."""
        assert self.sim is not None
        suffix = "" if key == "relay" else f"_{key}"
        n = self.sizes.latency
        token = self.sim.token()
        msgs = self.messages(n + 3, tag="latency")
        direct_l, relay_l = asyncio.run(_paired_latency(self.sim, token, relay_port, msgs, warmup=3))
        if len(direct_l) < n or len(relay_l) < n:
            raise BenchError(f"latency series incomplete: {len(direct_l)} direct, {len(relay_l)} relay of {n}")
        d50, d99 = _pct(direct_l, 50), _pct(direct_l, 99)
        r50, r99 = _pct(relay_l, 50), _pct(relay_l, 99)
        self.report.values.update({f"lat_direct_p50{suffix}": d50, f"lat_direct_p99{suffix}": d99,
                                   f"lat_{key}_p50": r50, f"lat_{key}_p99": r99})
        self.add(Row("latency, direct to simulated Exchange (sequential, warm session)", n, sum(direct_l),
                     f"p50 {d50 * 1e3:.2f} ms, p99 {d99 * 1e3:.2f} ms", "", f"paired with the {label} row below"))
        self.add(Row(f"latency, through the {label} (sequential, warm client connection)", n,
                     sum(relay_l), f"p50 {r50 * 1e3:.2f} ms, p99 {r99 * 1e3:.2f} ms",
                     f"+{(r50 - d50) * 1e3:.2f} / +{(r99 - d99) * 1e3:.2f} ms",
                     "added p50 / p99" + (" (includes spool write + fsync)" if key == "relay" else "")))

    def memory(self, shared: Any = None) -> None:
        """Peak RSS growth for one big message and for several concurrent ones.

        Full mode starts a fresh relay for each (a previous big message may leave the heap grown,
        which would hide growth); quick mode reuses ``shared`` to save process starts.
        """
        s = self.sizes
        for key, label, count, size in (("big", f"1 x {s.big / 1e6:g} MB", 1, s.big),
                                        ("many", f"{s.many} x {s.many_size / 1e6:g} MB concurrently", s.many,
                                         s.many_size)):
            if shared is not None:
                self._memory_one(shared, key, label, count, size)
                continue
            with self.relay(f"rss-{key}", sync_wait=10) as proc:
                self._memory_one(proc, key, label, count, size)

    def _memory_one(self, proc: Any, key: str, label: str, count: int, size: int) -> None:
        assert self.sim is not None
        # Warm up: imports, token, one upstream session, as a relay that has run a while.
        self._plain(proc.port, 3, reuse=True, auth=True, tag=f"warm-{key}")
        time.sleep(0.3)
        pid = proc.proc.pid
        idle = rss_bytes(pid)
        msgs = self.messages(count, size=size, tag=f"rss-{key}")
        watch = PeakWatch(pid)
        base = self.sim.accepted()
        start = time.perf_counter()
        try:
            r = asyncio.run(run_plain("127.0.0.1", proc.port, msgs, concurrency=count, reuse=False,
                                      auth=(USER, PASSWORD), deadline=self.long_deadline))
            self.check(r, f"rss {key}", count, partial_ok=False)
            self.wait_delivered(base + count, self.long_deadline)
        finally:
            peak = watch.stop()
        seconds = time.perf_counter() - start
        growth = peak - idle
        total = sum(len(m.data) for m in msgs)
        self.report.values[f"rss_{key}_growth"] = growth
        self.report.values[f"rss_{key}_ratio"] = growth / total
        self.add(Row(f"relay peak RSS growth, {label}", count, seconds,
                     f"+{growth / 1e6:.1f} MB (idle {idle / 1e6:.0f} MB)", f"{growth / total:.2f}x size",
                     "peak RSS (VmHWM reset after warm-up) minus idle RSS, until delivered"))

    def first_connections(self) -> None:
        """A fresh relay, two app registrations, N clients at once, each the relay's first message."""
        assert self.sim is not None
        n = self.sizes.first_connections
        before = self.sim.stats()
        with self.relay("tokens", sync_wait=10, connections=min(n, 50), two_apps=True) as proc:
            msgs = [make_message(MAILBOX if i % 2 == 0 else SECOND_MAILBOX, RCPT, self.sizes.size, i, tag="first")
                    for i in range(n)]
            base = self.sim.accepted()
            r = asyncio.run(run_plain("127.0.0.1", proc.port, msgs, concurrency=n, reuse=False,
                                      auth=(USER, PASSWORD), deadline=self.long_deadline))
            self.check(r, "first connections", n, partial_ok=False)
            self.wait_delivered(base + n, self.long_deadline)
            after = self.sim.stats()
        app1 = after["token_requests_app1"] - before["token_requests_app1"]
        app2 = after["token_requests_app2"] - before["token_requests_app2"]
        self.report.values.update(tokens_app1=app1, tokens_app2=app2, first_connections=n)
        self.add(Row(f"token requests, {n} concurrent first connections, 2 app registrations, fresh relay", n,
                     r.duration, f"{app1} + {app2}", "", "per app; upstream connections per mailbox lifted to "
                     f"{min(n, 50)} so all {n} need a session at once"))

    def peers(self) -> None:
        assert self.sim is not None
        s = self.sizes
        peers = self.args.peers or ("none" if self.args.quick else "auto")
        if peers == "none":
            why = "--peers none" if self.args.peers else "quick mode (add --peers auto)"
            for name in ("Postfix", "email-oauth2-proxy"):
                self.add(Row(f"peer {name}", None, None, "skipped", "", why))
                self.report.values[f"{'postfix' if name == 'Postfix' else 'emailproxy'}_skipped"] = why
            return
        # Postfix: same client, no AUTH (mynetworks), new connection per message, relaying to smtp-sink.
        postfix = Postfix(self.workdir)
        try:
            postfix.start()
            msgs = self.messages(s.postfix, tag="postfix")
            r = asyncio.run(run_plain("127.0.0.1", postfix.port, msgs, concurrency=s.clients, reuse=False,
                                      auth=None, deadline=s.deadline))
            if r.failed or r.sent == 0:
                raise PeerUnavailable(f"{r.failed} failed, {r.sent} sent; first error: {r.first_error()}")
            self.report.values["postfix_rate"] = r.rate
            ours = self.report.values.get("ingest_new_noauth")
            self.add(Row(f"peer Postfix ingest, new connection per message, no AUTH, {s.clients} clients", r.sent,
                         r.duration, f"{r.rate:.0f} msg/s",
                         f"relay {ours / r.rate:.2f}x" if ours else "", "relaying to smtp-sink"))
        except PeerUnavailable as exc:
            self.report.values["postfix_skipped"] = str(exc)
            self.add(Row("peer Postfix", None, None, "skipped", "", str(exc)))
        finally:
            postfix.stop()
        # email-oauth2-proxy: client credentials against the simulated Entra ID, to the simulated Exchange.
        from relay.testing.m365 import STANDARD_CLIENT_ID, STANDARD_SECRET, STANDARD_TENANT

        proxy = EmailProxy(self.workdir, token_url=f"{self.sim.authority_host}/{STANDARD_TENANT}/oauth2/v2.0/token",
                           client_id=STANDARD_CLIENT_ID, secret=STANDARD_SECRET, account=MAILBOX,
                           smtp_port=self.sim.smtp_port, ca_file=self.sim.ca_file)
        try:
            proxy.start()
            before = self.sim.stats()
            msgs = self.messages(s.emailproxy, tag="emailproxy")
            r = asyncio.run(run_plain("127.0.0.1", proxy.port, msgs, concurrency=s.clients, reuse=False,
                                      auth=(MAILBOX, PASSWORD), deadline=s.deadline))
            if r.failed or r.sent == 0:
                raise PeerUnavailable(f"{r.failed} failed, {r.sent} sent; first error: {r.first_error()}")
            tokens = self.sim.stats()["token_requests"] - before["token_requests"]
            self.report.values.update(emailproxy_rate=r.rate, emailproxy_tokens=tokens)
            ours = self.report.values.get("ingest_new_auth")
            self.add(Row(f"peer email-oauth2-proxy, new connection per message, AUTH PLAIN, {s.clients} clients",
                         r.sent, r.duration, f"{r.rate:.0f} msg/s", f"relay {ours / r.rate:.1f}x" if ours else "",
                         f"250 after Exchange's 250 (a proxy); {tokens} token requests for {s.clients} "
                         "simultaneous first logins"))
        except PeerUnavailable as exc:
            self.report.values["emailproxy_skipped"] = str(exc)
            self.add(Row("peer email-oauth2-proxy", None, None, "skipped", "", str(exc)))
        finally:
            proxy.stop()

    # ---- the run -----------------------------------------------------------------------------

    def run(self) -> Report:
        from relay.intake.passwords import hash_password

        self._hash = hash_password(PASSWORD)  # production cost: the login cache has to earn its keep
        self.report.values["load_start"] = os.getloadavg()[0]
        self.sim = SimProcess(self.workdir / "m365", self.workdir / "m365.log")
        t0 = time.perf_counter()
        try:
            tokens0 = self.sim.stats()["token_requests"]
            steps: list[tuple[str, Callable[[], None]]] = [
                ("direct", self.direct_ceiling), ("ingest", self.relay_ingest),
                *([("fsync-off", self.fsync_off)] if self.args.fsync_off else []), ("sync", self.relay_sync),
                ("floor", self.floor),
                ("memory", self.memory), ("tokens", self.first_connections), ("peers", self.peers),
            ]
            for name, step in steps:
                if not self._wanted(name) or (name == "memory" and self.args.quick and self._wanted("sync")):
                    continue
                self.progress(f"{name} ...")
                t_step = time.perf_counter()
                try:
                    step()
                except BenchError as exc:
                    self.report.problems.append(f"{name}: {exc}")
                    self.progress(f"{name} FAILED: {exc}")
                self.progress(f"{name} took {time.perf_counter() - t_step:.1f} s")
            relay_tokens = self.sim.stats()["token_requests"] - tokens0 - self.report.values.get("emailproxy_tokens", 0)
            self.report.values.update(relay_token_requests=relay_tokens, relay_starts=self._relay_starts)
            self.add(Row("token requests during the whole run (relay processes only)", None, time.perf_counter() - t0,
                         f"{relay_tokens}", "", f"{self._relay_starts} relay processes started (a fresh process "
                         "has no token); token lifetime 60-90 min, longer than the run"))
        finally:
            for proc in list(self._relays):
                proc.kill()
            self.sim.stop()
        self.report.targets = targets(self.report.values)
        return self.report

    def _wanted(self, step: str) -> bool:
        return not self.args.only or step in self.args.only.split(",")

    def cleanup(self) -> None:
        if not self.args.keep and not self.args.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


async def _paired_latency(sim: SimProcess, token: str, relay_port: int, msgs: list[Message],
                          warmup: int) -> tuple[list[float], list[float]]:
    import aiosmtplib

    from bench.loadgen import _unstuffed

    direct = await open_exchange(sim.smtp_host, sim.smtp_port, sim.ca_file, MAILBOX, token)
    relay = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay_port, start_tls=False, use_tls=False,
                            local_hostname="bench.local", timeout=60)
    await relay.connect()
    await relay.ehlo()
    await relay.auth_plain(USER, PASSWORD)
    d: list[float] = []
    r: list[float] = []
    try:
        for i, msg in enumerate(msgs):
            data = _unstuffed(msg)
            for smtp, out in ((direct, d), (relay, r)):
                t0 = time.perf_counter()
                await smtp.sendmail(msg.sender, [msg.rcpt], data)
                if i >= warmup:
                    out.append(time.perf_counter() - t0)
    finally:
        for smtp in (direct, relay):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(smtp.quit(), 5)
    return d, r


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process (all its threads) from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _pct(values: list[float], p: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1] if p < 100 else max(values)


def targets(v: dict[str, Any]) -> list[Target]:
    out: list[Target] = []

    def ratio_target(name: str, ours_key: str, theirs_key: str, want: float, skipped_key: str = "") -> None:
        ours, theirs = v.get(ours_key), v.get(theirs_key)
        if ours is None or not theirs:
            out.append(Target(name, "-", f">= {want:g}x", None, v.get(skipped_key, "not measured")))
            return
        got = ours / theirs
        out.append(Target(name, f"{got:.2f}x ({ours:.0f} vs {theirs:.0f} msg/s)", f">= {want:g}x", got >= want))

    ratio_target("ingest, new connection, AUTH: relay vs email-oauth2-proxy", "ingest_new_auth", "emailproxy_rate",
                 20, "emailproxy_skipped")
    ratio_target("ingest, new connection, no AUTH: relay vs Postfix", "ingest_new_noauth", "postfix_rate", 0.8,
                 "postfix_skipped")
    ratio_target("end-to-end, reused client connections, sync_wait 10s: relay vs direct", "e2e10_reused_auth",
                 "direct_rate", 0.7)
    if "lat_relay_p50" in v:
        added = (v["lat_relay_p50"] - v["lat_direct_p50"]) * 1e3
        out.append(Target("added latency p50, sync mode", f"{added:.2f} ms", "<= 3 ms", added <= 3.0))
    else:
        out.append(Target("added latency p50, sync mode", "-", "<= 3 ms", None, "not measured"))
    for key, name in (("big", "peak RSS growth, one big message"), ("many", "peak RSS growth, 10 concurrent")):
        if f"rss_{key}_ratio" in v:
            got = v[f"rss_{key}_ratio"]
            out.append(Target(name, f"{got:.2f}x the message bytes", "< 1.5x", got < 1.5))
        else:
            out.append(Target(name, "-", "< 1.5x", None, "not measured"))
    if "tokens_app1" in v:
        a, b = v["tokens_app1"], v["tokens_app2"]
        out.append(Target(f"token requests per app, {v['first_connections']} concurrent first connections",
                          f"{a} and {b}", "== 1 each", a == 1 and b == 1))
    else:
        out.append(Target("token requests per app, concurrent first connections", "-", "== 1 each", None,
                          "not measured"))
    return out


def render(report: Report, sizes: Sizes, seconds: float) -> str:
    lines = []
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    lines.append(f"oauth-smtp-relay benchmark ({report.mode}) - {datetime.datetime.now():%Y-%m-%d %H:%M}, "
                 f"Python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
                 f"{report.values.get('load_start', 0.0):.1f} at the start and {load[0]:.1f} at the end, "
                 f"{seconds:.0f} s")
    lines.append(f"messages of {sizes.size // 1024} KB unless said otherwise; relay = `python -m relay serve` "
                 f"(spool fsync on, pacing off, {sizes.upstream_connections} upstream connections) against the "
                 "simulated Microsoft 365 in its own process")
    lines.append("")
    lines.append(TABLE_HEADER)
    lines.append("|---|---:|---:|---|---|---|")
    for r in report.rows:
        msgs = "" if r.messages is None else str(r.messages)
        secs = "" if r.seconds is None else f"{r.seconds:.2f}"
        lines.append(f"| {r.scenario} | {msgs} | {secs} | {r.result} | {r.ratio} | {r.notes} |")
    lines.append("")
    lines.append("| target | measured | wanted | verdict |")
    lines.append("|---|---|---|---|")
    for t in report.targets:
        verdict = "PASS" if t.ok else ("FAIL" if t.ok is False else f"skipped ({t.why})")
        lines.append(f"| {t.name} | {t.measured} | {t.wanted} | {verdict} |")
    if report.mode == "quick":
        lines.append("")
        lines.append("(quick mode: small counts and sizes, a smoke run; the verdicts are only indicative)")
    for p in report.problems:
        lines.append(f"PROBLEM: {p}")
    if report.profile:
        lines.append("")
        lines.append(report.profile)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the relay (a real `python -m relay serve` process) against the simulated Microsoft "
                    "365, with Postfix and email-oauth2-proxy measured in the same run; prints a table and the "
                    "speed and memory targets. Loopback only; every load is bounded in count and time.",
    )
    p.add_argument("--quick", action="store_true", help="smoke run of a few seconds with small counts (CI)")
    p.add_argument("--peers", choices=["auto", "none"], default=None,
                   help="auto: measure Postfix and email-oauth2-proxy when they can run here (default of the full "
                        "run); none: skip them (default of --quick)")
    p.add_argument("--only", help="comma list of steps: direct,ingest,sync,floor,memory,tokens,peers")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the message counts (not sizes)")
    p.add_argument("--profile", action="store_true",
                   help="sample the relay with py-spy during ingest (new connection, AUTH) and print where the "
                        "time goes")
    p.add_argument("--fsync-off", action="store_true",
                   help="diagnostic: also run the new-connection ingest with spool fsync off, to show what fsync "
                        "costs (never a valid production setting)")
    p.add_argument("--json", metavar="PATH", help="also write the rows, targets and raw values as JSON")
    p.add_argument("--workdir", help="keep everything here (default: a temporary directory, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory (logs, spools)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--relay-log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="the relay's log level (default info, as in production: one line per message)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bench = Bench(args)
    start = time.perf_counter()
    try:
        report = bench.run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep or args.workdir:
            print(f"work directory kept: {bench.workdir}", file=sys.stderr)
    text = render(report, bench.sizes, time.perf_counter() - start)
    print(text, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "mode": report.mode, "rows": [asdict(r) for r in report.rows],
            "targets": [asdict(t) for t in report.targets], "values": report.values,
            "problems": report.problems}, indent=2, default=str))
    if report.problems:
        print(f"work directory kept for the logs: {bench.workdir}", file=sys.stderr)
        return 1
    bench.cleanup()
    if args.strict and any(t.ok is False for t in report.targets):
        return 1
    return 0
