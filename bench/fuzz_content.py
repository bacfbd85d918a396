"""Long property-based fuzz run of message content (the CI test, many more examples, random seed).

    python bench/fuzz_content.py --examples 5000 [--seed N]

Runs the header-block strategy and the checks of relay/testing/hostile_content.py (the CI test is
tests/test_security_content.py) against one relay + simulated Microsoft 365 on loopback: exactly one
reply per DATA within 1 s, the session still in step (NOOP), at most the one meant message at
Exchange (never the one hidden in the body), no body file or descriptor left behind. Exit status 0
when no falsifying example was found; prints a summary either way.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypothesis import HealthCheck, Phase, given, seed, settings

from relay.testing.hostile_content import header_blocks, send_one_fuzzed, start_fuzz_target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # refusals and rewrites are expected here
    stats = {"examples": 0, "bytes": 0, "accepted": 0}
    with tempfile.TemporaryDirectory(prefix="fuzz-content-") as tmp:
        relay, sim = start_fuzz_target(Path(tmp))
        started = time.monotonic()
        try:

            failures: list[str] = []

            @settings(max_examples=args.examples, deadline=None, database=None, print_blob=True,
                      suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
                      phases=[Phase.explicit, Phase.reuse, Phase.generate])
            @given(block=header_blocks())
            def run(block: bytes) -> None:
                stats["examples"] += 1
                stats["bytes"] += len(block)
                try:
                    send_one_fuzzed(relay, sim, block)
                except Exception as exc:
                    failures.append(f"{type(exc).__name__}: {str(exc)[:300]} <- {block[:160]!r}")
                    raise

            if args.seed is not None:
                run = seed(args.seed)(run)
            ok = True
            try:
                run()
            except Exception as exc:  # the falsifying example is printed by hypothesis
                ok = False
                print(f"FAILED: {type(exc).__name__}")
                for line in dict.fromkeys(failures):
                    print("  ", line)
            stats["accepted"] = len(sim.exchange.accepted) - 1
        finally:
            relay.stop()
            sim.stop()
    took = time.monotonic() - started
    print(f"{'OK' if ok else 'FAILED'}: {stats['examples']} header blocks ({stats['bytes'] / 1e6:.1f} MB), "
          f"{stats['accepted']} accepted by Exchange, 0 smuggled, {took:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
