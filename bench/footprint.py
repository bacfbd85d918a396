"""Resident memory of a running relay: right after start, and as messages flow.

    python bench/footprint.py [--messages 10000] [--every 1000]

Starts ``python -m relay serve`` against the simulated Microsoft 365 (in this process), sends
``--messages`` small messages over one reused, authenticated connection (sync mode), and prints the
relay process's RSS (VmRSS) after start, then every ``--every`` messages, then the growth.
"""

from __future__ import annotations

import argparse
import smtplib
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
    args = parser.parse_args()
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
