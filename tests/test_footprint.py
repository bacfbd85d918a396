"""What a running relay carries: ``serve`` imports only what serving needs.

Every module imported stays resident for the life of the process (a sidecar runs next to every
replica of an app), so the rare paths are imported when they are taken: Microsoft Graph only with a
``transport: graph`` mailbox, the DSN's MIME classes only when a message dies, PyJWT and
cryptography only when a token is inspected or a certificate credential is loaded, the Redis client
only with ``fleet:``. Observed on a real ``python -m relay serve`` with ``-X importtime`` (the
interpreter lists every module it imports on stderr), after it has relayed a message.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

from relay.testing.harness import RelayProcess, free_port, relay_config, wait_until, write_config
from relay.testing.m365 import STANDARD_MAILBOX, SimulatedM365

#: Imported by a relay that only takes and delivers mail over SMTP: none of these.
RARE = ("relay.microsoft.graph", "relay.delivery.dsn", "relay.check", "relay.demo", "relay.testing",
        "email.mime", "jwt", "cryptography", "redis")


def imported_modules(log: str) -> set[str]:
    """The modules ``-X importtime`` reported in ``log`` (its lines end ``| <indent><module>``)."""
    return {line.rsplit("|", 1)[1].strip() for line in log.splitlines()
            if line.startswith("import time:") and not line.rstrip().endswith("imported package")}


def test_imported_modules_reads_importtime_lines() -> None:
    log = ("import time: self [us] | cumulative | imported package\n"
           "import time:       120 |        120 |     email.mime.text\n"
           '{"event": "listening"}\n'
           "import time:        80 |        200 |   relay.service\n")
    assert imported_modules(log) == {"email.mime.text", "relay.service"}


def test_serve_does_not_import_the_rare_paths(m365: SimulatedM365, tmp_path: Path) -> None:
    port = free_port()
    config = write_config(relay_config(m365, tmp_path, port=port), tmp_path / "relay.yaml")
    relay = RelayProcess(config, env={"PYTHONPROFILEIMPORTTIME": "1"}).start(port)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail(STANDARD_MAILBOX, ["someone@fabrikam.example"],
                            f"From: {STANDARD_MAILBOX}\r\nTo: someone@fabrikam.example\r\nSubject: lean\r\n\r\nhi\r\n")
        out = m365.workdir / "exchange-out"
        wait_until(lambda: any(out.glob("*.eml")), 30, "the message at the simulated Exchange")
    finally:
        assert relay.terminate() == 0
    modules = imported_modules(relay.log_path.read_text(encoding="utf-8", errors="replace"))
    # The paths that were taken are there (so the observation itself works) ...
    assert {"relay.service", "relay.microsoft.upstream", "msal", "aiosmtpd.smtp"} <= modules
    # ... and the rare ones are not.
    assert sorted(m for m in modules if any(m == r or m.startswith(r + ".") for r in RARE)) == []
