"""From-header rewriting, so that Exchange does not answer 5.2.252 SendAsDenied.

When policy rewrites a sender, the header ``From:`` becomes the carrying mailbox, the display
name is kept exactly as the client wrote it (commas, quotes, RFC 2047 words and all), and the original
address goes to ``Reply-To:`` (unless the message has one already) so replies still reach it.
Only the header block is touched; every other byte of the message stays as received.
"""

from __future__ import annotations

import email.utils
import re

from relay.envelope import Route

_FIELD_RE = re.compile(rb"^([!-9;-~]+):", re.ASCII)


def split_header_fields(block: bytes) -> list[bytes]:
    """Header block -> list of raw fields, each including its folded continuation lines."""
    fields: list[bytes] = []
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def field_name(raw: bytes) -> str:
    m = _FIELD_RE.match(raw)
    return m.group(1).decode("ascii").lower() if m else ""


def _line_ending(raw: bytes) -> bytes:
    return b"\r\n" if raw.endswith(b"\r\n") else b"\n"


def display_part(value: str) -> str:
    """The display name part of an address as written: ``"Doe, Jane" <j@x>`` -> ``"Doe, Jane"``."""
    value = value.strip()
    if "<" in value:
        return value[: value.rindex("<")].strip()
    name, _addr = email.utils.parseaddr(value)
    if name:
        return email.utils.formataddr((name, "x@x")).rsplit(" <", 1)[0]
    return ""


class HeaderRewriter:
    """Rewrites ``From:`` to ``route.mailbox`` keeping the display name; adds ``Reply-To:``."""

    def __init__(self, route: Route) -> None:
        self.mailbox = route.mailbox

    def rewrite(self, block: bytes) -> bytes:
        fields = split_header_fields(block)
        has_reply_to = any(field_name(f) == "reply-to" for f in fields)
        out: list[bytes] = []
        reply_to: bytes | None = None
        for raw in fields:
            if field_name(raw) != "from" or reply_to is not None:
                out.append(raw)
                continue
            eol = _line_ending(raw)
            value = raw.split(b":", 1)[1].decode("utf-8", "surrogateescape")
            original = " ".join(value.split())  # unfold
            display = display_part(original)
            new_value = f"{display} <{self.mailbox}>" if display else f"<{self.mailbox}>"
            out.append(b"From: " + new_value.encode("utf-8", "surrogateescape") + eol)
            reply_to = b"Reply-To: " + original.encode("utf-8", "surrogateescape") + eol
        if reply_to is not None and not has_reply_to:
            # Insert before the blank line that ends the header block, if present.
            if out and out[-1] in (b"\r\n", b"\n"):
                out.insert(len(out) - 1, reply_to)
            else:
                out.append(reply_to)
        elif reply_to is None:
            eol = b"\r\n"
            new_from = f"From: <{self.mailbox}>".encode() + eol
            if out and out[-1] in (b"\r\n", b"\n"):
                out.insert(len(out) - 1, new_from)
            else:
                out.append(new_from)
        return b"".join(out)
