"""Control characters, and the one-line form of a text that came from elsewhere.

The one owner of the control-character patterns: addresses, commands to Exchange, reply texts,
log fields and Message-IDs all use these, so that "what is a control character" has one answer
(C0, i.e. ``\\x00``-``\\x1f``, and DEL ``\\x7f``).
"""

from __future__ import annotations

import re

__all__ = ["CONTROL", "CONTROL_BYTES", "has_control_characters", "one_line"]

#: One control character: NUL, CR, LF, TAB, ESC, ... and DEL.
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: The same, on bytes (command lines written to Exchange).
CONTROL_BYTES = re.compile(rb"[\x00-\x1f\x7f]")
_CONTROL_RUN = re.compile(CONTROL.pattern + "+")
_SPACES = re.compile(r" {2,}")


def has_control_characters(text: str) -> bool:
    """A NUL, CR, LF or other control character (bytes that are not UTF-8 are not counted here:
    legacy applications still write Latin-1 display names)."""
    return CONTROL.search(text) is not None


def one_line(text: str, limit: int, *, squeeze: bool = False) -> str:
    """``text`` on one line: each run of control characters becomes one space, the ends are
    stripped, (``squeeze``) runs of spaces become one, and it is cut to ``limit`` characters
    (ending in ``...`` when cut)."""
    text = _CONTROL_RUN.sub(" ", text).strip()
    if squeeze:
        text = _SPACES.sub(" ", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
