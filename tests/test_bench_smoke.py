"""The benchmark keeps working: ``python -m bench --quick`` runs end to end and prints its table.

The quick mode sends a few hundred small messages through a real relay process and the simulated
Microsoft 365 (and the peers when they are installed), so a change that breaks the harness, the
relay's process start or its configuration shows up in CI, not on the day someone wants numbers.
The verdicts of a quick run are not asserted: on a shared two-core machine they are noise.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_runs_and_prints_the_table(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--workdir", str(tmp_path / "bench"),
         "--json", str(tmp_path / "bench.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "| scenario | messages | seconds | result | ratio | notes |" in proc.stdout
    assert "| target | measured | wanted | verdict |" in proc.stdout
    assert "relay ingest, new connection per message" in proc.stdout
    assert "floor: bare aiosmtpd -> aiosmtplib forwarder" in proc.stdout
    assert (tmp_path / "bench.json").exists()
