"""``python -m bench.rtt`` keeps working, and its round-trip column is what the simulator counts.

The latencies of a short run on a shared machine are noise and are not asserted; the round trips per
message are exact (counted by the simulated Exchange): 4 for direct aiosmtplib, 1 with CHUNKING,
2 with PIPELINING only, 4 with neither, and 4 through email-oauth2-proxy (it relays each command
as it comes) when ``emailproxy`` is installed; without it, its row says it was skipped and why.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_rtt_runs_and_counts_round_trips(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.rtt", "--rtt", "5", "--messages", "3", "--workdir", str(tmp_path / "w")],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    trips = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[1] == "3":
            trips[cells[0]] = cells[4]
    peer = ({"email-oauth2-proxy, reused client connection": "4",
             "email-oauth2-proxy, connection per message": "4"}
            if importlib.util.find_spec("emailproxy") is not None else {})
    if not peer:
        assert "| email-oauth2-proxy | skipped: email-oauth2-proxy is not installed" in proc.stdout, proc.stdout
    assert trips == {
        **peer,
        "direct aiosmtplib, reused session": "4",
        "direct aiosmtplib, session per message": "4",
        "relay sync (CHUNKING), reused client connection": "1",
        "relay sync (CHUNKING), connection per message": "1",
        "relay sync (PIPELINING only), reused client connection": "2",
        "relay sync (PIPELINING only), connection per message": "2",
        "relay sync (neither), reused client connection": "4",
        "relay sync (neither), connection per message": "4",
    }, proc.stdout
