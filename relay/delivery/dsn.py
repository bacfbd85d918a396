"""Delivery status notifications (RFC 3464) for mail the relay gave up on.

A DSN is an ordinary message built with the standard library's email package: a multipart/report
with a human-readable part, a message/delivery-status part (one block per failed recipient) and the
original headers (text/rfc822-headers, never the body). It goes back through the same upstream,
carried by the mailbox that carried the original, so it needs no extra Exchange permission.

Loops are impossible by construction: no DSN is made for a message with a null sender, for a message
marked ``Auto-Submitted`` (other than ``no``), or for a DSN.
"""

from __future__ import annotations

import email.parser
import email.policy
from collections.abc import Mapping
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, formatdate, make_msgid
from pathlib import Path

from relay.envelope import Envelope, Route
from relay.intake.rewrite import field_name, field_value, split_header_fields

_HEADER_READ_LIMIT = 256 * 1024


def read_headers(body_path: Path) -> bytes:
    """The original message's header block (bounded read)."""
    with body_path.open("rb") as f:
        head = f.read(_HEADER_READ_LIMIT)
    end = head.find(b"\r\n\r\n")
    if end < 0:
        end = head.find(b"\n\n")
    return head if end < 0 else head[: end + 2]


def is_automatic(headers: bytes) -> bool:
    """Automatic mail (RFC 3834 Auto-Submitted, or itself a DSN): never answered with a DSN."""
    values = {"auto-submitted": "no", "content-type": ""}
    seen: set[str] = set()
    for raw in split_header_fields(headers):  # linear, whatever the header block holds
        name = field_name(raw)
        if name in values and name not in seen:
            seen.add(name)
            values[name] = field_value(raw)
    auto = (values["auto-submitted"] or "no").strip().lower()
    content_type = values["content-type"].lower().replace(" ", "").replace('"', "")
    return auto != "no" or "report-type=delivery-status" in content_type


def dsn_recipients(envelope: Envelope, headers: bytes, *, to_sender: bool, admin: str | None) -> list[str]:
    """Who is told about a dead letter: its sender (unless the null sender) and/or the admin, as
    configured; nobody for automatic mail, so DSNs never loop. Reads the header block once."""
    if is_automatic(headers):
        return []
    targets = [envelope.mail_from] if to_sender and envelope.mail_from else []
    if admin and admin not in targets:
        targets.append(admin)
    return targets


def build_dsn(
    *,
    reporting_host: str,
    mailbox: str,
    original: Envelope,
    original_headers: bytes,
    failed: Mapping[str, str],
    queue_id: str,
    arrival: float,
    recipients: tuple[str, ...],
    reason: str,
) -> bytes:
    """The DSN message bytes, addressed to ``recipients``, for the ``failed`` recipients (address -> reply)."""
    text = [
        f"This is the mail relay at {reporting_host}.",
        "",
        "Your message could not be delivered to one or more recipients. It has been kept",
        f"in the relay's dead-letter area as queue id {queue_id}.",
        "",
        f"Reason: {reason}",
        "",
        *(f"<{rcpt}>: {reply}" for rcpt, reply in failed.items()),
    ]
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <{mailbox}>"
    report["To"] = ", ".join(recipients)
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = formatdate(localtime=False)
    report["Message-ID"] = make_msgid(domain=mailbox.split("@", 1)[-1])
    report["Auto-Submitted"] = "auto-replied"
    report.attach(MIMEText("\n".join(text) + "\n", "plain", "utf-8"))
    status = MIMEBase("message", "delivery-status")
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {reporting_host}"
    per_message["X-Queue-ID"] = queue_id
    per_message["Arrival-Date"] = format_datetime_utc(arrival)
    blocks = [per_message]
    for rcpt, reply in failed.items():
        block = Message()
        block["Final-Recipient"] = f"rfc822; {rcpt}"
        block["Action"] = "failed"
        block["Status"] = _status_code(reply)
        block["Diagnostic-Code"] = f"smtp; {' '.join(reply.split())}"
        blocks.append(block)
    status.set_payload(blocks)  # type: ignore[arg-type]  # message/delivery-status holds header blocks
    report.attach(status)
    headers_part = MIMEBase("text", "rfc822-headers")
    headers_part.set_payload(original_headers.decode("utf-8", "replace"))
    report.attach(headers_part)
    return report.as_bytes(policy=email.policy.SMTP)


def format_datetime_utc(ts: float) -> str:
    import datetime

    return format_datetime(datetime.datetime.fromtimestamp(ts, datetime.UTC))


def _status_code(reply: str) -> str:
    for token in reply.split()[:2]:
        parts = token.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and token[0] in "245":
            return token
    return "5.0.0"


def dsn_route(route: Route) -> Route:
    """DSNs go out through the mailbox that carried the original, as that mailbox."""
    return Route(app=route.app, mailbox=route.mailbox, sender=route.mailbox)

