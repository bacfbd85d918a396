"""Addresses as clients write them, judged in bounded time.

Two places parse addresses a client controls: the MAIL FROM / RCPT TO argument (a path, RFC 5321)
and the From / Sender header fields (an address list, RFC 5322). The standard library's parsers are
the judges (no parser of our own), but they are super-linear on hostile input (runs of quotes, dots,
commas, nested comments: seconds for tens of kilobytes, and a RecursionError on deep nesting). So:

- the common simple shapes are recognised by linear patterns (possessive quantifiers, no
  backtracking), whose soundness is a property test: for every value a pattern accepts, the standard
  library's parsers give the same answer (tests/test_address_fast_path.py);
- anything else is bounded before a parser sees it (:data:`MAX_ADDRESS_FIELD`, :data:`MAX_PATH_ARGUMENT`)
  and any exception a parser raises means "not a usable address", never an error.
"""

from __future__ import annotations

import email.errors
import email.utils
import functools
import re
from email._header_value_parser import get_addr_spec, get_angle_addr
from email.headerregistry import HeaderRegistry

from relay.text import has_control_characters

_REGISTRY = HeaderRegistry()

#: The longest From/Sender value (unfolded) that policy parses; a longer one is not allowed (policy
#: rewrites or refuses it). RFC 5322's line limit: real From fields are far shorter, and the address
#: parsers of the standard library take super-linear time on hostile input.
MAX_ADDRESS_FIELD = 998


#: CR, LF, NUL and every other control character, plus lone surrogates (bytes that were not UTF-8).
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


def has_forbidden_characters(text: str) -> bool:
    return _FORBIDDEN.search(text) is not None




#: The longest MAIL FROM / RCPT TO argument (path and parameters) given to the path parser when it is
#: not of the simple shape. RFC 5321 4.5.3.1.3: a path is at most 256 octets.
MAX_PATH_ARGUMENT = 320


# The common shapes of a From or Sender field, judged without the standard library's parsers:
# ``addr``, ``<addr>``, ``Words <addr>`` and ``"Quoted name" <addr>``, where addr is a dot-atom
# local part and a dot-atom domain (no quoted local parts, no comments, no groups, no routes).
# For every value these match, both parsers give the same single address (a property test checks
# it); every other value takes the full, slower path (bounded by MAX_ADDRESS_FIELD, off the loop).
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = rf"{_ATEXT}++(?:\.{_ATEXT}++)*+"
_ADDR = rf"(?P<addr>{_DOT_ATOM}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]++)*+)"
_WORDS = rf"{_ATEXT}++(?: {_ATEXT}++)*+"
_QUOTED = r'"[ !#-\[\]-~\u00a0-\ud7ff\ue000-\U0010ffff]*+"'
_SIMPLE_VALUE = re.compile(rf"(?:{_ADDR}|(?:(?:{_WORDS}|{_QUOTED}) )?<{_ADDR.replace('addr', 'angle')}>)")


def simple_address(value: str) -> str | None:
    """The address of a From/Sender value (unfolded, stripped) of one of the common simple shapes,
    lower-cased; None when the value is not one of them (which says nothing about its validity)."""
    m = _SIMPLE_VALUE.fullmatch(value)
    if m is None:
        return None
    return (m.group("addr") or m.group("angle")).lower()



def address_list(value: str) -> tuple[str, ...] | None:
    """The addresses of a From/Sender value (unfolded), lower-cased; None when it is over-long, has
    control characters, or is not an unambiguous address list (see :func:`parse_addresses`)."""
    if len(value) > MAX_ADDRESS_FIELD or has_control_characters(value):
        return None
    simple = simple_address(value)
    if simple is not None:
        return (simple,)
    return parse_addresses(value)


def parse_addresses(value: str) -> tuple[str, ...] | None:
    """The full judgement of an address-list value: both standard library parsers, which must agree
    with no invalid-address defect. Super-linear on hostile input: callers bound ``value``."""
    try:
        legacy = [addr.lower() for _name, addr in email.utils.getaddresses([value])]
        header = _REGISTRY("From", value)
        modern = [a.addr_spec.lower() for a in header.addresses]  # type: ignore[attr-defined]
        defects = header.defects
    except Exception:  # a parser that fails on a value makes it ambiguous, whatever the error
        # (the RFC 5322 parser raises AttributeError on "g:;;", IndexError, ValueError... on others)
        return None
    if any(isinstance(d, email.errors.InvalidHeaderDefect) for d in defects):
        return None
    if not legacy or legacy != modern:
        return None
    for addr in legacy:
        local, at, domain = addr.rpartition("@")
        if not at or not local or not domain or "@" in domain:
            return None
    return tuple(legacy)



#: ``<dot-atom@domain>`` and ESMTP parameters (each starting with a letter or digit: a "(" there would be
#: a comment to the RFC 5322 parser).
_SIMPLE_PATH = re.compile(
    rf"<(?P<path>{_DOT_ATOM}@[A-Za-z0-9-]++(?:\.[A-Za-z0-9-]++)*+)>(?: (?P<rest>[A-Za-z0-9][!-~]*+(?: [!-~]++)*+))?+")


@functools.lru_cache(maxsize=1024)
def parse_path(arg: str) -> tuple[str, str] | None:
    """(address, rest of the line) of a MAIL FROM/RCPT TO argument (stripped), or None if it does
    not parse. Remembered: applications send the same few addresses all day."""
    m = _SIMPLE_PATH.fullmatch(arg)
    if m is not None:
        return m.group("path"), m.group("rest") or ""
    if len(arg) > MAX_PATH_ARGUMENT:
        return None
    try:
        parse = get_angle_addr if arg.lstrip().startswith("<") else get_addr_spec
        address, rest = parse(arg)
        return str(address.addr_spec), str(rest)
    except Exception:  # HeaderParseError, and RecursionError on nested comments: not a path
        return None
