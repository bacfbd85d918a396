"""From-header rewriting, so that Exchange does not answer 5.2.252 SendAsDenied.

When policy rewrites a sender, the header ``From:`` becomes the carrying mailbox, the display
name is kept exactly as the client wrote it (commas, quotes, RFC 2047 words and all), and the original
address goes to ``Reply-To:`` (unless the message has one already) so replies still reach it.
Only the header block is touched; every other byte of the message stays as received.
"""

from __future__ import annotations

import email.utils
import functools
import re

from relay.envelope import Route
from relay.intake.addresses import MAX_ADDRESS_FIELD, address_list, simple_address
from relay.text import has_control_characters

#: A field name, and the colon after it; white space before the colon is RFC 5322's obsolete
#: syntax (``From :``), which Exchange and mail clients still read as the field it names.
_FIELD_RE = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.ASCII)

_CACHED_FIELD_MAX = 512


def split_header_fields(block: bytes) -> list[bytes]:
    """Header block -> list of raw fields, each including its folded continuation lines.
    Linear in the block's size however many continuation lines a field has."""
    fields: list[list[bytes]] = []
    for line in block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    return [b"".join(parts) for parts in fields]


def field_name(raw: bytes) -> str:
    m = _FIELD_RE.match(raw)
    return m.group(1).decode("ascii").lower() if m else ""


def _line_ending(raw: bytes) -> bytes:
    return b"\r\n" if raw.endswith(b"\r\n") else b"\n"


def field_value(raw: bytes) -> str:
    """A raw field's value, unfolded, as text (bytes that are not UTF-8 kept via surrogateescape)."""
    value = raw.split(b":", 1)[1] if b":" in raw else b""
    return " ".join(value.decode("utf-8", "surrogateescape").split())


def from_addresses(raw: bytes) -> tuple[str, ...] | None:
    """The addresses of a From field, lower-cased; None unless two independent parsers agree.

    A From that the standard library's legacy parser and its RFC 5322 parser read differently (or
    with an invalid-address defect) is ambiguous: Exchange or a mail client may read it either way, so
    policy must treat it as not allowed rather than trust one reading. A value longer than
    :data:`MAX_ADDRESS_FIELD` or with control characters (a NUL...) is not allowed either, and the
    common simple shapes are judged by :func:`simple_address` without the parsers.

    Parsing twice costs about 0.3 ms; an application sends the same From line again and again, so
    the answers for short fields are remembered (a pure function of the bytes: nothing else to key on).
    """
    if len(raw) <= _CACHED_FIELD_MAX:
        return _from_addresses_cached(raw)
    return _from_addresses(raw)


def is_simple_address_field(raw: bytes) -> bool:
    """Is this raw field's value one of the shapes :func:`simple_address` judges at once?"""
    return simple_address(field_value(raw)) is not None


@functools.lru_cache(maxsize=512)
def _from_addresses_cached(raw: bytes) -> tuple[str, ...] | None:
    return _from_addresses(raw)


def _from_addresses(raw: bytes) -> tuple[str, ...] | None:
    return address_list(field_value(raw))


def display_part(value: str) -> str:
    """The display name part of an address as written: ``"Doe, Jane" <j@x>`` -> ``"Doe, Jane"``."""
    value = value.strip()
    if "<" in value:
        return value[: value.rindex("<")].strip()
    name, _addr = email.utils.parseaddr(value)
    if name:
        return email.utils.formataddr((name, "x@x")).rsplit(" <", 1)[0]
    return ""


def _display_candidates(original: str, mailbox: str) -> list[str]:
    """``display <mailbox>`` forms to try, best first: the display name as written, then re-quoted."""
    candidates: list[str] = []
    pairs = email.utils.getaddresses([original])
    if len(pairs) == 1:
        display = display_part(original)
        if display:
            candidates.append(f"{display} <{mailbox}>")
    name = pairs[0][0] if pairs else ""
    if name:
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        candidates.append(f'"{quoted}" <{mailbox}>')
    return candidates


def new_from_value(original: str, mailbox: str) -> str:
    """The rewritten From value: the first address's display name as written, then ``<mailbox>``.

    Post-condition checked: the result parses to exactly ``mailbox`` and nothing else (a display name
    that would smuggle a second address in is re-quoted, or dropped as a last resort).
    """
    if len(original) > MAX_ADDRESS_FIELD or has_control_characters(original):
        return f"<{mailbox}>"
    try:
        candidates = _display_candidates(original, mailbox)
    except Exception:  # the legacy parser recurses on nested comments: keep no display name
        return f"<{mailbox}>"
    for candidate in candidates:
        if from_addresses(b"From: " + candidate.encode("utf-8", "surrogateescape")) == (mailbox.lower(),):
            return candidate
    return f"<{mailbox}>"


class HeaderRewriter:
    """Rewrites ``From:`` to the carrying mailbox keeping the display name; adds ``Reply-To:``."""

    def __init__(self, target: Route | str) -> None:
        self.mailbox = target.mailbox if isinstance(target, Route) else target

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
            original = field_value(raw)
            new_value = new_from_value(original, self.mailbox)
            out.append(b"From: " + new_value.encode("utf-8", "surrogateescape") + eol)
            # The original goes to Reply-To so replies still reach it, but never an over-long value
            # or one with control characters (a NUL, a bare CR) that the client slipped into From.
            clean = len(original) <= MAX_ADDRESS_FIELD and not has_control_characters(original)
            reply_to = b"Reply-To: " + original.encode("utf-8", "surrogateescape") + eol if clean else b""
        if reply_to and not has_reply_to:
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


def drop_fields(block: bytes, name: str) -> bytes:
    """The header block without its ``name`` fields (case-insensitive), folded lines included."""
    name = name.lower()
    return b"".join(f for f in split_header_fields(block) if field_name(f) != name)
