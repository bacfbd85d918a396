"""``oauth-smtp-relay demo``: the real relay against the built-in simulated Microsoft 365.

It starts the simulated Entra ID token endpoint and Exchange Online (HTTPS and SMTP on loopback,
with their own test CA), the real relay with a generated config, and then sends mail the way legacy
apps do: an ERP logging in with AUTH PLAIN, a monitoring tool with AUTH LOGIN, a cron job that does
not authenticate at all. It prints what happened at each hop and where the delivered files are.
Nothing leaves this machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import smtplib
import socket
import sys
import tempfile
import threading
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

from relay.config import settings_from_dict
from relay.observability import setup_logging
from relay.testing.harness import DEMO_PASSWORD, DEMO_USER, RelayThread, free_port, relay_config, wait_until
from relay.testing.m365 import STANDARD_MAILBOX, STANDARD_SEND_AS, SimulatedM365


def _message(sender: str, to: str, subject: str, body: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="legacy-app.local")
    msg.set_content(body)
    return msg


def _pick_port() -> tuple[int, str]:
    """2525 as documented if it is free, else any free port and why 2525 was not used."""
    try:
        with socket.socket() as s:
            # as the relay's listener does: a connection of an earlier run in TIME_WAIT is no obstacle
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 2525))
        return 2525, ""
    except OSError as exc:
        reason = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
        return free_port(), f"127.0.0.1:2525 is not free ({reason}: another relay or demo may run there)"


def run_demo(*, keep_running: bool = False, messages: int = 3, workdir: Path | None = None) -> int:
    out = sys.stdout
    if workdir is None:
        # Kept after the demo, so the delivered files it points at can be opened.
        workdir = Path(tempfile.mkdtemp(prefix="oauth-smtp-relay-demo-"))
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"demo: cannot create {workdir}: {(exc.strerror or str(exc)).lower()}; give --workdir a folder you "
              "may write", file=sys.stderr)
        return 1
    setup_logging("text", "info", stream=sys.stderr)
    logging.getLogger("relay.listener").setLevel(logging.WARNING)

    print("== oauth-smtp-relay demo: the real relay, a simulated Microsoft 365 on 127.0.0.1 ==", file=out)
    sim = SimulatedM365.standard(workdir / "m365").start()
    print(f"simulated Entra ID token endpoint : {sim.authority_host}", file=out)
    print(f"simulated Exchange Online SMTP    : {sim.smtp_host}:{sim.smtp_port} (STARTTLS, AUTH XOAUTH2)",
          file=out)
    port, why_not_2525 = _pick_port()
    settings = settings_from_dict(relay_config(sim, workdir, port=port), "demo")
    relay = RelayThread(settings).start()
    print(f"relay listening on                : 127.0.0.1:{relay.port}  (user {DEMO_USER!r}, "
          f"password {DEMO_PASSWORD!r}, or no AUTH from 127.0.0.1)", file=out)
    if why_not_2525:
        print(f"    not on 127.0.0.1:2525: {why_not_2525}", file=out)
    print(f"relay spool                       : {settings.spool.path}\n"
          f"    (see its queue with: oauth-smtp-relay queue --spool {settings.spool.path} list)\n", file=out)
    ok = True
    try:
        sends = [
            ("ERP server, AUTH PLAIN", "plain", STANDARD_MAILBOX, "Invoice 2026-1187"),
            ("monitoring, AUTH LOGIN", "login", STANDARD_SEND_AS, "ALERT: disk /var 91% full"),
            ("cron job, no AUTH", None, "root@erp-host.local", "Nightly backup finished"),
        ]
        for i in range(messages):
            label, mech, sender, subject = sends[i % len(sends)]
            to = f"customer{i + 1}@fabrikam.example"
            msg = _message(sender, to, f"{subject} (#{i + 1})", "Sent through oauth-smtp-relay.\n")
            reply = _send(relay.port, mech, msg, bcc=f"archive{i + 1}@contoso.com")
            print(f"[{i + 1}] {label}: {sender} -> {to} (+ Bcc)\n    relay answered: {reply}", file=out)
        expected = messages
        try:
            wait_until(lambda: len(sim.exchange.accepted) >= expected, 30, "delivery to the simulated Exchange")
        except TimeoutError:
            ok = False
        provider = next(iter(relay.relay.tokens))
        print(f"\ntoken requests to Entra ID: {sim.entra.token_requests} "
              f"(one token, cached and reused for every message)", file=out)
        for accepted in list(sim.exchange.accepted):
            print(f"Exchange accepted {accepted.queue_id}: MAIL FROM <{accepted.mail_from}> as mailbox "
                  f"{accepted.mailbox}, {len(accepted.rcpt_tos)} recipient(s), {accepted.size} bytes\n"
                  f"    stored at {accepted.eml_path}", file=out)
        del provider
        if len(sim.exchange.accepted) != expected:
            ok = False
            print(f"\nFAILED: {len(sim.exchange.accepted)} of {expected} messages reached Exchange", file=out)
        else:
            print(f"\nOK: {expected} message(s) relayed. Delivered files: {sim.outdir}\n"
                  f"(the demo's files stay in {workdir}; delete it when done)", file=out)
        if keep_running:
            print(f"\nStill running. Point your SMTP client at 127.0.0.1:{relay.port}. Ctrl-C to stop.",
                  file=out)
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()
    finally:
        relay.stop()
        sim.stop()
    return 0 if ok else 1


def _send(port: int, mech: str | None, msg: EmailMessage, bcc: str) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("legacy-app.local")
        if mech is not None:
            client.user, client.password = DEMO_USER, DEMO_PASSWORD
            code, resp = client.auth(mech, client.auth_plain if mech == "plain" else client.auth_login)
        recipients = [str(msg["To"]), bcc]
        client.mail(str(msg["From"]))
        for r in recipients:
            client.rcpt(r)
        code, resp = client.data(msg.as_bytes())
        return f"{code} {resp.decode(errors='replace')}"
