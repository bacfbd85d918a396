"""Event-loop stall under hostile From fields: NOOP round trips on one connection while another
sends 72 KB folded From fields of quotes, dots and commas, and 900-byte ones (the worst the parsers
see). The relay runs as its own process against the simulated Microsoft 365.

    python bench/stall.py [--rounds 10]

Prints the NOOP latency distribution (the target: every round trip under 100 ms).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.testing.hostile_content import STALL_PAYLOADS, noop_latency_under_attack
from relay.testing.m365 import SimulatedM365


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stall-") as tmp:
        sim = SimulatedM365.standard(Path(tmp) / "m365").start()
        try:
            latencies, replies = noop_latency_under_attack(sim, Path(tmp), rounds=args.rounds)
        finally:
            sim.stop()
    ms = [x * 1000 for x in latencies]

    def pick(q: float) -> float:
        return ms[min(len(ms) - 1, int(len(ms) * q))]

    print(f"{len(replies)} hostile messages ({len(STALL_PAYLOADS)} kinds x {args.rounds}), "
          f"{len(ms)} NOOPs meanwhile: median {pick(0.5):.1f} ms, p95 {pick(0.95):.1f} ms, "
          f"p99 {pick(0.99):.1f} ms, max {ms[-1]:.1f} ms")
    return 0 if ms[-1] < 100 else 1


if __name__ == "__main__":
    sys.exit(main())
