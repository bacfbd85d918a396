"""Property-based fuzz of the listener (hypothesis), on real sockets against the simulator.

Each example opens a connection (from 127.0.0.1 or 127.0.0.2), sends a random mix of valid and
invalid commands, AUTH exchanges, messages (with smuggling-shaped separators) and random bytes, all
pipelined, then a trailer that ends any DATA and QUITs. After every example:

- every reply was clean (no traceback, no exception name: checked by RawSMTP.reply);
- the connection ended (QUIT or a refusal) within the socket timeout: the daemon never hangs;
- nothing accepted is lost: each "250 ... queued/delivered as" reply to DATA is one more message at the
  simulated Exchange or in the spool, and no other message appeared;
- the daemon still serves a correct session end to end.

The strategies and the harness are in relay/testing/listener_fuzz.py. CI runs a short, derandomised
version; ``bench/fuzz_listener.py --examples N`` runs the long one.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings

from relay.testing.listener_fuzz import RCPT, Case, FuzzTarget, cases
from relay.testing.m365 import STANDARD_MAILBOX


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    t = FuzzTarget(tmp_path_factory.mktemp("fuzz"))
    try:
        yield t
    finally:
        t.stop()


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(case=cases)
def test_fuzz_listener(target: FuzzTarget, case: Case) -> None:
    target.run(case)


def test_fuzz_payload_smoke(target: FuzzTarget) -> None:
    """A hand-written worst case through the same harness: smuggling + garbage + pipelining."""
    target.run(Case("127.0.0.1", "auth", [
        f"MAIL FROM:<{STANDARD_MAILBOX}>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode()
        + b"Subject: s\r\n\r\nx\n.\r\nMAIL FROM:<x@y>\r\n.\r\n",
        b"\xff\xfe\x00\r\n", b"DATA\r\n", b"QUIT\r\n",
    ]))
