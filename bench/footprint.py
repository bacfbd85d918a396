"""Resident memory of a running relay: right after start, and as messages flow.

    python bench/footprint.py [--messages 10000] [--every 1000] [--source]

Starts ``python -m relay serve`` against the simulated Microsoft 365 (in this process), sends
``--messages`` small messages over one reused, authenticated connection (sync mode), and prints the
relay process's RSS (VmRSS) after start, after the first message, then every ``--every`` messages,
then the growth. For scale it also prints the floor: the same interpreter after ``import asyncio, ssl``.

The relay is measured as installed: its bytecode compiled first, as ``pip install`` (and the
container image) does. From a checkout with ``PYTHONDONTWRITEBYTECODE`` set, every start would
compile relay/ from source, ~1.4 MiB more that no installed relay carries; ``--source`` measures that.
"""

from __future__ import annotations

import argparse
import compileall
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.rss import rss_bytes
from relay.testing.exchange import ExchangeLimits
from relay.testing.harness import DEMO_PASSWORD, DEMO_USER, RelayProcess, free_port, relay_config, write_config
from relay.testing.m365 import STANDARD_MAILBOX, SimulatedM365


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--source", action="store_true", help="do not compile relay/ first (a checkout's start)")
    args = parser.parse_args()
    if not args.source:
        compileall.compile_dir(Path(__file__).resolve().parent.parent / "relay", quiet=1)
    floor = subprocess.run([sys.executable, "-c", "import asyncio, ssl; print(open('/proc/self/status').read()"
                            ".split('VmRSS:')[1].split()[0])"], capture_output=True, text=True, check=True)
    print(f"floor (python -c 'import asyncio, ssl'): {int(floor.stdout) / 1024:.1f} MiB")
    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp:
        limits = ExchangeLimits(messages_per_minute=10**9, recipients_per_day=10**9, concurrent_sessions=50)
        sim = SimulatedM365.standard(Path(tmp) / "m365", limits=limits).start()
        port = free_port()
        config = write_config(relay_config(sim, Path(tmp), port=port, overrides={
            "delivery": {"per_mailbox": {"connections": 3, "per_minute": 0}},
            "observability": {"log_level": "warning"}}), Path(tmp) / "relay.yaml")
        relay = RelayProcess(config).start(port)
        assert relay.proc is not None
        pid = relay.proc.pid
        try:
            time.sleep(1.0)  # let start-up finish (the listener answers before the last tasks settle)
            idle = rss_bytes(pid)
            print(f"idle after start: {idle / 2**20:.1f} MiB")
            samples = []
            body = (f"From: {STANDARD_MAILBOX}\r\nTo: someone@fabrikam.example\r\nSubject: footprint\r\n\r\n"
                    + "x" * 2000 + "\r\n")
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.login(DEMO_USER, DEMO_PASSWORD)
                for i in range(1, args.messages + 1):
                    client.sendmail(STANDARD_MAILBOX, ["someone@fabrikam.example"], body)
                    if i == 1:  # the first delivery: token, Exchange session
                        print(f"after the first message: {rss_bytes(pid) / 2**20:.1f} MiB")
                    if i % args.every == 0:
                        samples.append(rss_bytes(pid))
                        print(f"after {i:>6} messages: {samples[-1] / 2**20:.1f} MiB")
            last = samples[-1] if samples else rss_bytes(pid)
            print(f"growth after {args.messages} messages: {(last - idle) / 2**20:+.1f} MiB; "
                  f"over the second half: {(last - samples[len(samples) // 2]) / 2**20:+.1f} MiB" if samples else "")
        finally:
            relay.terminate()
            sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
