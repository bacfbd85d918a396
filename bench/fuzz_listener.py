"""Long property-based fuzz run of the listener (the CI test, many more examples, random seed).

    python bench/fuzz_listener.py --examples 5000 [--seed N]

Runs the strategies and checks of relay/testing/listener_fuzz.py (the CI test is
tests/test_security_fuzz.py) against one relay + simulated Microsoft 365 on loopback: clean replies,
no hang, nothing accepted lost, still serving after each case.
Exit status 0 when no falsifying example was found; prints a one-line summary either way.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypothesis import HealthCheck, given, seed, settings

from relay.testing.listener_fuzz import Case, FuzzTarget, cases


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the relay's per-case warnings (failed AUTH...) are expected
    stats = {"examples": 0, "bytes": 0, "steps": 0}
    with tempfile.TemporaryDirectory(prefix="fuzz-listener-") as tmp:
        target = FuzzTarget(Path(tmp))
        exchange_before = target.at_exchange()
        started = time.monotonic()

        @settings(max_examples=args.examples, deadline=None, database=None, print_blob=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=cases)
        def fuzz(case: Case) -> None:
            stats["examples"] += 1
            stats["bytes"] += len(case.payload)
            stats["steps"] += len(case.steps)
            target.run(case)

        if args.seed is not None:
            fuzz = seed(args.seed)(fuzz)
        ok = True
        try:
            fuzz()
        except Exception as exc:  # a falsifying example: hypothesis printed it
            ok = False
            print(f"FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            elapsed = time.monotonic() - started
            delivered = target.at_exchange() - exchange_before
            accepted = target.accepted_total
            target.stop()
    print(f"fuzz_listener: {'OK' if ok else 'FAILED'}: {stats['examples']} examples, {stats['steps']} steps, "
          f"{stats['bytes']} bytes sent, {accepted} fuzz messages accepted (250 to DATA), {delivered} messages at "
          f"the simulated Exchange (incl. one health-check message per example), nothing lost, {elapsed:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
