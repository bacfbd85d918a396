"""The simulated Microsoft 365 in its own process, driven over stdin/stdout with JSON lines.

Why a process: the simulated Exchange parses SMTP, does TLS and writes every accepted message to
disk. In the benchmark's own process it would fight the load generator for the GIL and both would
be measured slower than they are. As a child it gets its own interpreter (and, on two cores, a fair
share of the machine), like the real Exchange would be somewhere else.

Protocol (one JSON object per line): the child prints ``{"ready": ...}`` once listening, then
answers each command read from stdin:

- ``{"cmd": "stats"}`` -> accepted messages, token requests (total and per app), SMTP connections;
- ``{"cmd": "wait", "count": N, "timeout": T}`` -> waits until N messages in all were accepted;
- ``{"cmd": "token", "client_id": ...}`` -> an access token minted without HTTP (direct submission);
- ``{"cmd": "quit"}`` -> stops the servers and exits. End of stdin does the same, so the child
  never outlives the benchmark.

The standard fixture plus a second app registration (:data:`SECOND_CLIENT_ID`, FullAccess on
:data:`SECOND_MAILBOX`) for the token scenario, and limits lifted (pacing off).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SECOND_CLIENT_ID = "33333333-3333-3333-3333-333333333333"
SECOND_SECRET = "sim~second-secret.0123456789abcdefghijklmn"
SECOND_MAILBOX = "relay2@contoso.com"


def _serve(workdir: Path) -> int:
    from relay.testing.exchange import ExchangeLimits
    from relay.testing.m365 import STANDARD_CLIENT_ID, STANDARD_TENANT, SimulatedM365

    limits = ExchangeLimits(concurrent_sessions=1000, messages_per_minute=10**9, recipients_per_day=10**12)
    sim = SimulatedM365.standard(workdir, limits=limits)
    sim.add_app(STANDARD_TENANT, SECOND_CLIENT_ID, secret=SECOND_SECRET)
    sim.add_mailbox(STANDARD_TENANT, SECOND_MAILBOX, full_access=(SECOND_CLIENT_ID,))
    sim.start()

    def say(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    say({"ready": True, "authority_host": sim.authority_host, "smtp_host": sim.smtp_host,
         "smtp_port": sim.smtp_port, "ca_file": str(sim.ca_file), "token_port": sim.entra.port})
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            req = json.loads(line)
            cmd = req.get("cmd")
            if cmd == "stats":
                stats = sim.exchange.stats()
                say({"accepted": stats.messages_accepted, "connections": stats.connections,
                     "auth_ok": stats.auth_successes,
                     "token_requests": sim.entra.token_requests,
                     "token_requests_app1": sim.entra.token_requests_for(STANDARD_TENANT, STANDARD_CLIENT_ID),
                     "token_requests_app2": sim.entra.token_requests_for(STANDARD_TENANT, SECOND_CLIENT_ID)})
            elif cmd == "wait":
                count, timeout = int(req["count"]), float(req["timeout"])

                def reached(wanted: int = count) -> bool:
                    return len(sim.exchange._accepted) >= wanted

                ok = sim.exchange.wait_until(reached, timeout)
                say({"ok": ok, "accepted": sim.exchange.stats().messages_accepted, "at": time.monotonic()})
            elif cmd == "token":
                say({"token": sim.issue_token(STANDARD_TENANT, req.get("client_id") or STANDARD_CLIENT_ID)})
            elif cmd == "quit":
                say({"bye": True})
                break
            else:
                say({"error": f"unknown command {cmd!r}"})
    finally:
        sim.stop()
    return 0


class SimProcess:
    """Parent side: start the child, send commands, read answers (every read bounded by the child)."""

    def __init__(self, workdir: Path, log_path: Path) -> None:
        self.workdir = workdir
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.simproc", str(workdir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        info = self._read()
        if not info.get("ready"):
            raise RuntimeError(f"simulated Microsoft 365 did not start: {info}")
        self.info = info
        # Duck-typed stand-in for SimulatedM365 where relay_config() needs one.
        self.authority_host: str = info["authority_host"]
        self.smtp_host: str = info["smtp_host"]
        self.smtp_port: int = info["smtp_port"]
        self.ca_file = Path(info["ca_file"])

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"simulated Microsoft 365 exited (code {self.proc.poll()}); see its log")
        result: dict[str, Any] = json.loads(line)
        return result

    def ask(self, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        return self._read()

    def stats(self) -> dict[str, Any]:
        return self.ask(cmd="stats")

    def accepted(self) -> int:
        return int(self.stats()["accepted"])

    def wait_for(self, count: int, timeout: float) -> bool:
        """Block until ``count`` messages in all were accepted (or ``timeout``); True if they were."""
        return bool(self.ask(cmd="wait", count=count, timeout=timeout)["ok"])

    def token(self, client_id: str | None = None) -> str:
        return str(self.ask(cmd="token", client_id=client_id)["token"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask(cmd="quit")
                self.proc.wait(10)
            except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


if __name__ == "__main__":
    raise SystemExit(_serve(Path(sys.argv[1])))
