"""Where the relay's time goes: py-spy samples of the running relay process, summarised as text.

py-spy (``pip install py-spy``) attaches to the process from outside (ptrace), so the relay runs
unmodified. It samples with ``--gil``: only the thread holding the GIL, i.e. the interpreter's CPU
time, which is what caps a single-process asyncio relay. Time blocked in fsync is not in it (the
``--fsync-off`` diagnostic row and the latency rows show that); time in system calls made without
the GIL (socket sends) neither.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
from pathlib import Path


class Profiler:
    def __init__(self, pid: int, out: Path, rate: int = 250) -> None:
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        self.error = ""
        beside = Path(sys.executable).parent / "py-spy"
        exe = str(beside) if beside.exists() else shutil.which("py-spy")
        if exe is None:
            self.error = "py-spy not installed (pip install py-spy)"
            return
        self.proc = subprocess.Popen(
            [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--output", str(out),
             "--nonblocking", "--gil", "--duration", "600"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    def stop(self, top: int = 18) -> str:
        if self.proc is None:
            return f"profile: {self.error}"
        self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
        if not self.out.exists():
            return f"profile: py-spy wrote nothing ({err.decode(errors='replace').strip()[-300:]})"
        return summarise(self.out.read_text(), top)


def summarise(raw: str, top: int = 18) -> str:
    """Shares per thread kind and per function from py-spy's collapsed stacks (``a;b;c count``)."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    loop_own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [_short(f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        kind = _kind(frames)
        kinds[kind] += count
        own[frames[-1]] += count
        if kind == "event loop":
            loop_own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    if not total:
        return "profile: no samples"
    lines = [f"profile of the relay during ingest, new connection per message + AUTH (py-spy --gil, {total} "
             "samples of the thread holding the GIL)", "", "by thread:"]
    lines += [f"  {n / total:6.1%}  {k}" for k, n in kinds.most_common()]
    lines += ["", "by activity (inclusive; a sample may count in two):"]
    lines += [f"  {n / total:6.1%}  {k}" for k, n in _buckets(raw).most_common()]
    lines += ["", "event loop thread, self time (this thread and the GIL set the ceiling):"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in loop_own.most_common(top)]
    lines += ["", "all threads, self time:"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    lines += ["", "inclusive time of the relay's own functions:"]
    ours = [(f, n) for f, n in incl.most_common() if "(relay/" in f and not f.startswith(("<module>", "main ", "cmd_"))]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in ours[:top]]
    return "\n".join(lines)


BUCKETS = {
    "spool work in worker threads (sqlite, files)": ("_worker (concurrent/futures/thread.py",),
    "asyncio.to_thread hand-offs (waking a worker thread, getting the GIL back)": ("ThreadPoolExecutor.submit",),
    "upstream submission (aiosmtplib + TLS)": ("Submitter.submit",),
    "DATA receive loop (relay.intake.data DataReceiver)": ("DataReceiver.receive",),
    "per-connection aiosmtpd SMTP() setup (inspect.getmembers, dir())": ("RelaySMTP.__init__",),
    "delivery scheduler bookkeeping (tick, claim, record)": ("Delivery.tick", "Delivery._record"),
    "logging": ("Logger._log",),
    "header From parsing (email.headerregistry)": ("Policy.header_from",),
    "MAIL/RCPT address parsing (aiosmtpd _getaddr: a typing.Protocol class per call)": ("SMTP._getaddr",),
    "AUTH PLAIN / LOGIN": ("RelaySMTP.auth_PLAIN", "RelaySMTP.auth_LOGIN"),
}


def _buckets(raw: str) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not count_s.isdigit():
            continue
        for name, patterns in BUCKETS.items():
            if any(p in stack for p in patterns):
                counts[name] += int(count_s)
    return counts


def _kind(frames: list[str]) -> str:
    joined = ";".join(frames)
    if "_worker (concurrent/futures/thread.py" in joined:
        return "worker threads (asyncio.to_thread: spool store/update, password hashing)"
    if "run_forever" in joined or "run_until_complete" in joined:
        return "event loop"
    return "other threads"


def _short(frame: str) -> str:
    """``func (path/to/site-packages/pkg/mod.py:123)`` -> ``func (pkg/mod.py:123)``."""
    name, sep, where = frame.partition(" (")
    if not sep:
        return frame
    where = where.rstrip(")")
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            if marker == "/lib/python3":
                where = where.split("/", 1)[1] if "/" in where else where
            break
    return f"{name} ({where})"
