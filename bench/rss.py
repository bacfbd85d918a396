"""Resident memory of a child process, from /proc (Linux): current, peak, and a peak reset.

``VmHWM`` is the kernel's own high-water mark of the resident set; writing ``5`` to
``/proc/PID/clear_refs`` resets it to the current RSS (Linux >= 4.0), so a scenario's peak excludes
start-up. Where that is refused, a sampling thread (every 5 ms) gives the peak instead.
"""

from __future__ import annotations

import threading
from pathlib import Path


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_bytes(pid: int) -> int:
    return _status_kb(pid, "VmRSS") * 1024


def hwm_bytes(pid: int) -> int:
    return _status_kb(pid, "VmHWM") * 1024


class PeakWatch:
    """Peak RSS of ``pid`` from now until :meth:`stop`: max(VmHWM after a reset, sampled VmRSS)."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pid = pid
        self.interval = interval
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.sampled = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sampled = max(self.sampled, rss_bytes(self.pid))
            except (OSError, KeyError):
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(2)
        peak = self.sampled
        if self.hwm_reset:
            peak = max(peak, hwm_bytes(self.pid))
        return peak
