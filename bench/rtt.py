"""``python -m bench.rtt --rtt 25``: latency per message when Exchange is a round trip away.

Exchange Online is tens of milliseconds from the relay; loopback is not. Here every byte between a
client and the simulated Exchange goes through :class:`relay.testing.latency.LatencyProxy`, which
delays it by half the round trip each way, so what a transaction costs is counted in round trips.

Rows (messages sent one after another, the time from the client's first byte to its last reply):

- direct aiosmtplib, reused session: an authenticated session to Exchange, ``sendmail`` per message
  (MAIL, RCPT, DATA, end of data: 4 round trips);
- direct aiosmtplib, session per message: connect, STARTTLS, EHLO, AUTH, the message, QUIT;
- relay sync mode (the client's 250 waits for Exchange's), the client on loopback, the relay's
  upstream through the proxy, reused and per-message client connections; once for each way the
  simulated Exchange can talk: CHUNKING + PIPELINING (as Exchange Online), PIPELINING only, neither;
- email-oauth2-proxy (``emailproxy`` from PyPI, bench.peers), its upstream through the same proxy,
  reused and per-message client connections (AUTH PLAIN to it, XOAUTH2 with a client-credentials
  token from it to Exchange). Skipped, with the reason, when it is not installed.

The upstream round trips per message are those the simulated Exchange counted (median).
"""

from __future__ import annotations

import argparse
import asyncio
import smtplib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from bench.loadgen import tls_context
from bench.peers import EmailProxy, PeerUnavailable
from relay.testing.exchange import ExchangeLimits
from relay.testing.harness import RelayProcess, free_port, relay_config, write_config
from relay.testing.latency import LatencyProxy
from relay.testing.m365 import (
    STANDARD_CLIENT_ID,
    STANDARD_MAILBOX,
    STANDARD_SECRET,
    STANDARD_TENANT,
    SimulatedM365,
)

RCPT = "customer@fabrikam.example"
WAYS = (("CHUNKING", True, True), ("PIPELINING only", True, False), ("neither", False, False))


@dataclass
class Row:
    scenario: str
    messages: int
    per_message_ms: float  # median
    mean_ms: float
    round_trips: float | None
    ratio: str = ""
    skipped: str = ""  # why this row could not be measured here


def message(seq: int) -> bytes:
    return (f"From: {STANDARD_MAILBOX}\r\nTo: {RCPT}\r\nSubject: rtt {seq}\r\nMessage-ID: <rtt.{seq}@bench.local>"
            f"\r\n\r\n" + "A line of the message body, to make it look like mail.\r\n" * 40).encode()


def _timed(n: int, send: Callable[[int], None]) -> list[float]:
    times = []
    for i in range(n):
        started = time.perf_counter()
        send(i)
        times.append(time.perf_counter() - started)
    return times


async def _direct(sim: SimulatedM365, proxy: LatencyProxy, n: int, reuse: bool) -> list[float]:
    token = sim.issue_token()
    ctx = tls_context(sim.ca_file)

    async def session() -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(hostname=sim.smtp_host, port=proxy.port, start_tls=True, tls_context=ctx,
                               local_hostname="bench.local", timeout=60)
        await smtp.connect()
        await smtp.ehlo()
        await smtp.auth_xoauth2(STANDARD_MAILBOX, token)
        return smtp

    times = []
    smtp = await session() if reuse else None
    if smtp is not None:  # warm up
        await smtp.sendmail(STANDARD_MAILBOX, [RCPT], message(-1))
    for i in range(n):
        started = time.perf_counter()
        if reuse:
            assert smtp is not None
            await smtp.sendmail(STANDARD_MAILBOX, [RCPT], message(i))
        else:
            one = await session()
            await one.sendmail(STANDARD_MAILBOX, [RCPT], message(i))
            await one.quit()
        times.append(time.perf_counter() - started)
    if smtp is not None:
        await smtp.quit()
    return times


def _relay_rows(sim: SimulatedM365, proxy: LatencyProxy, workdir: Path, n: int, way: str,
                add: Callable[[str, list[float]], None]) -> None:
    port = free_port()
    config = relay_config(sim, workdir, port=port, overrides={
        "delivery": {"sync_wait": 10, "timeout": 30, "per_mailbox": {"connections": 3, "per_minute": 0}},
    })
    config["apps"][0]["smtp_port"] = proxy.port
    relay = RelayProcess(write_config(config, workdir / "relay.yaml")).start(port)
    wire = sim.exchange.wire
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            for i in range(3):  # warm up: the upstream session, its token
                client.sendmail(STANDARD_MAILBOX, [RCPT], message(-1 - i))

            def reused(i: int) -> None:
                client.sendmail(STANDARD_MAILBOX, [RCPT], message(i))

            wire.clear()  # count this row's transactions only
            add(f"relay sync ({way}), reused client connection", _timed(n, reused))

        def per_message(i: int) -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as one:
                one.sendmail(STANDARD_MAILBOX, [RCPT], message(i))

        wire.clear()
        add(f"relay sync ({way}), connection per message", _timed(n, per_message))
    finally:
        relay.terminate()


def _emailproxy_rows(sim: SimulatedM365, proxy: LatencyProxy, workdir: Path, n: int,
                     add: Callable[[str, list[float]], None]) -> None:
    """email-oauth2-proxy between a loopback client and Exchange: it relays each command as it comes."""
    peer = EmailProxy(workdir, token_url=f"{sim.authority_host}/{STANDARD_TENANT}/oauth2/v2.0/token",
                      client_id=STANDARD_CLIENT_ID, secret=STANDARD_SECRET, account=STANDARD_MAILBOX,
                      smtp_port=proxy.port, ca_file=sim.ca_file).start()
    password = "bench-emailproxy-password"  # encrypts the proxy's cached token; any value works
    wire = sim.exchange.wire
    try:
        with smtplib.SMTP("127.0.0.1", peer.port, timeout=60) as client:
            client.login(STANDARD_MAILBOX, password)  # the first login fetches the token
            for i in range(3):  # warm up
                client.sendmail(STANDARD_MAILBOX, [RCPT], message(-1 - i))

            def reused(i: int) -> None:
                client.sendmail(STANDARD_MAILBOX, [RCPT], message(i))

            wire.clear()
            add("email-oauth2-proxy, reused client connection", _timed(n, reused))

        def per_message(i: int) -> None:
            with smtplib.SMTP("127.0.0.1", peer.port, timeout=60) as one:
                one.login(STANDARD_MAILBOX, password)
                one.sendmail(STANDARD_MAILBOX, [RCPT], message(i))

        wire.clear()
        add("email-oauth2-proxy, connection per message", _timed(n, per_message))
    finally:
        peer.stop()


def run(rtt_ms: float, n: int, workdir: Path) -> list[Row]:
    limits = ExchangeLimits(concurrent_sessions=1000, messages_per_minute=10**9, recipients_per_day=10**12)
    sim = SimulatedM365.standard(workdir / "m365", limits=limits)
    sim.start()
    proxy = LatencyProxy("127.0.0.1", sim.smtp_port, rtt_ms / 1000).start()
    wire = sim.exchange.wire
    rows: list[Row] = []

    def add(name: str, times: list[float]) -> None:
        trips = [t.round_trips for t in wire.transactions if t.reply != "RSET"][-len(times):]
        rows.append(Row(name, len(times), statistics.median(times) * 1000, statistics.fmean(times) * 1000,
                        statistics.median(trips) if trips else None))

    try:
        wire.clear()
        add("direct aiosmtplib, reused session", asyncio.run(_direct(sim, proxy, n, reuse=True)))
        wire.clear()
        add("direct aiosmtplib, session per message", asyncio.run(_direct(sim, proxy, n, reuse=False)))
        for i, (way, pipelining, chunking) in enumerate(WAYS):
            wire.pipelining, wire.chunking = pipelining, chunking
            sub = workdir / f"relay{i}"
            sub.mkdir()
            _relay_rows(sim, proxy, sub, n, way, add)
        wire.pipelining, wire.chunking = True, True  # as Exchange Online offers them
        try:
            _emailproxy_rows(sim, proxy, workdir, n, add)
        except (PeerUnavailable, smtplib.SMTPException, OSError) as exc:
            rows.append(Row("email-oauth2-proxy", 0, 0.0, 0.0, None, skipped=str(exc) or type(exc).__name__))
    finally:
        proxy.stop()
        sim.stop()
    return rows


def render(rows: list[Row], rtt_ms: float) -> str:
    direct = {r.scenario: r.per_message_ms for r in rows}
    reused, fresh = direct["direct aiosmtplib, reused session"], direct["direct aiosmtplib, session per message"]
    out = [f"round trip to Exchange: {rtt_ms:g} ms (emulated on the path)", "",
           "| scenario | messages | ms per message (median) | mean | upstream round trips | vs direct reused "
           "| vs direct per message |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.skipped:
            out.append(f"| {r.scenario} | skipped: {r.skipped} | | | | | |")
            continue
        trips = f"{r.round_trips:g}" if r.round_trips is not None else "-"
        out.append(f"| {r.scenario} | {r.messages} | {r.per_message_ms:.1f} | {r.mean_ms:.1f} | {trips} | "
                   f"{r.per_message_ms / reused:.2f}x | {r.per_message_ms / fresh:.2f}x |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rtt", description=__doc__.split("\n\n")[0])
    p.add_argument("--rtt", type=float, default=25.0, help="emulated round trip to Exchange in ms (default 25)")
    p.add_argument("--messages", type=int, default=40, help="messages per row (default 40)")
    p.add_argument("--workdir", help="keep everything here (default: a temporary directory, removed)")
    args = p.parse_args(argv)
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        rows = run(args.rtt, args.messages, workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-rtt-") as tmp:
            rows = run(args.rtt, args.messages, Path(tmp))
    print(render(rows, args.rtt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
