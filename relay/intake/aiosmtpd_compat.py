"""Everything the relay takes from aiosmtpd beyond its public API, in one place.

The listener (:class:`relay.intake.listener.RelaySMTP`) needs a few things aiosmtpd only offers through
private names: a 421 before an idle close, connection limits around the whole session, a cheaper
address parser, its own transaction state reset with aiosmtpd's, the AUTH mechanisms and command
table, the TLS state, the stream reader and the idle timer. :class:`CompatSMTP` overrides or reads
those names and hands them on under public, typed names; nothing else in relay/ touches an aiosmtpd
private name. aiosmtpd may rename any of them in any release, so this module names the versions it
was written for (:data:`WRITTEN_FOR`, and an upper bound in pyproject.toml), and
tests/test_aiosmtpd_compat.py fails loudly on any other version or on a missing name.

It also holds aiosmtpd's performance quirks the relay works around (introspection of every
attribute, a signature inspected per connection) and silences aiosmtpd's logger, which logs command
lines and message data.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from aiosmtpd.smtp import SMTP

__all__ = [
    "INSTANCE_ATTRIBUTES",
    "PRIVATE_METHODS",
    "WRITTEN_FOR",
    "CheapIntrospection",
    "CompatSMTP",
    "fixed_signature",
]

#: aiosmtpd releases whose private names below were checked. A new release: read its smtp.py for
#: each name in PRIVATE_METHODS and INSTANCE_ATTRIBUTES, then add it here and widen pyproject.toml.
WRITTEN_FOR = ("1.4.6",)

#: Private methods of aiosmtpd.smtp.SMTP overridden or called here, with the parameters they take.
PRIVATE_METHODS: dict[str, tuple[str, ...]] = {
    "_handle_client": ("self",),
    "_timeout_cb": ("self",),
    "_getaddr": ("self", "arg"),
    "_set_rset_state": ("self",),
    "_set_post_data_state": ("self",),
    "_reset_timeout": ("self", "duration"),
}
#: Private attributes aiosmtpd.smtp.SMTP sets on each instance that are read here.
INSTANCE_ATTRIBUTES = ("_auth_methods", "_smtp_methods", "_tls_protocol", "_reader")


# -- logging -------------------------------------------------------------------------------------

# aiosmtpd warns on every AUTH that Session.login_data is deprecated; the relay keeps its own
# transaction state.
class _DropLoginDataDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "login_data is deprecated" not in record.getMessage()


def _only_errors(record: logging.LogRecord) -> bool:
    """aiosmtpd logs every command line and DATA line (AUTH blobs, passwords typed as commands,
    message bodies) at DEBUG/INFO, and unknown commands verbatim at WARNING. A level alone is not
    enough (anyone may turn the root logger to DEBUG), so this filter lets nothing but errors through,
    whatever the level; the relay logs its own, secret-free events instead."""
    return record.levelno >= logging.ERROR


_AIOSMTPD_LOG = logging.getLogger("mail.log")
_AIOSMTPD_LOG.addFilter(_DropLoginDataDeprecation())
_AIOSMTPD_LOG.setLevel(logging.WARNING)
if _only_errors not in _AIOSMTPD_LOG.filters:
    _AIOSMTPD_LOG.addFilter(_only_errors)


# -- introspection costs ---------------------------------------------------------------------------

def _hook_names(cls: type) -> list[str]:
    """The attribute names aiosmtpd looks for by introspection (auth_*, smtp_*, handle_*)."""
    return [n for n in object.__dir__(cls) if n.startswith(("auth_", "smtp_", "handle_"))] + [
        n for base in cls.__mro__ for n in vars(base) if n.startswith(("auth_", "smtp_", "handle_"))]


class CheapIntrospection:
    """aiosmtpd's SMTP.__init__ runs inspect.getmembers() and dir() on the protocol and the handler
    for every connection, evaluating every attribute (about 8 % of the CPU per new connection).
    It only keeps names starting with auth_, smtp_ and handle_: list just those, once per class."""

    _dir_cache: dict[type, list[str]] = {}

    def __dir__(self) -> list[str]:
        cls = type(self)
        names = CheapIntrospection._dir_cache.get(cls)
        if names is None:
            names = CheapIntrospection._dir_cache[cls] = sorted(set(_hook_names(cls)))
        return names


F = TypeVar("F", bound=Callable[..., Any])


def fixed_signature(func: F) -> F:
    """aiosmtpd inspects handle_EHLO's signature on every connection (to tell its old 4-argument form
    from the 5-argument one): a third of the cost of a new connection. PEP 362's __signature__ lets
    inspect.signature() answer from the function itself; the signature cannot change at run time."""
    setattr(func, "__signature__", inspect.signature(func))  # noqa: B010
    return func


# -- the private names, under public ones ------------------------------------------------------------

class CompatSMTP(CheapIntrospection, SMTP):
    """aiosmtpd's SMTP with its private hooks and state behind public names. Subclasses override
    :meth:`serve_client`, :meth:`idle_timeout`, :meth:`parse_address` and :meth:`transaction_reset`.

    No name here may start with ``smtp_``, ``auth_`` or ``handle_``: aiosmtpd would take it for a
    command, an AUTH mechanism or a handler hook.
    """

    # aiosmtpd -> relay

    async def _handle_client(self) -> None:
        await self.serve_client()

    async def serve_client(self) -> None:
        """The whole session, from greeting to close (aiosmtpd's command loop)."""
        await SMTP._handle_client(self)

    def _timeout_cb(self) -> None:
        self.idle_timeout()

    def idle_timeout(self) -> None:
        """The client was idle too long: aiosmtpd closes the connection."""
        SMTP._timeout_cb(self)  # type: ignore[no-untyped-call]

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        return self.parse_address(arg)

    def parse_address(self, arg: str) -> tuple[str | None, str | None]:
        """A MAIL FROM / RCPT TO argument -> (address, parameters), (None, None) when unparsable."""
        result: tuple[str | None, str | None] = SMTP._getaddr(self, arg)
        return result

    def _set_rset_state(self) -> None:
        SMTP._set_rset_state(self)  # type: ignore[no-untyped-call]
        self.transaction_reset()

    def _set_post_data_state(self) -> None:
        SMTP._set_post_data_state(self)  # type: ignore[no-untyped-call]
        self.transaction_reset()

    def transaction_reset(self) -> None:
        """aiosmtpd reset its transaction (RSET, HELO/EHLO, after DATA): reset ours with it."""

    # relay -> aiosmtpd

    def end_transaction(self) -> None:
        """A DATA the relay read itself is over: the state aiosmtpd keeps after a DATA."""
        self._set_post_data_state()

    def reset_idle_timer(self, seconds: float | None = None) -> None:
        """Restart the idle timer with ``seconds`` (None: the configured idle timeout)."""
        self._reset_timeout(seconds)

    def offered_mechanisms(self) -> dict[str, Any]:
        """The AUTH mechanisms offered (aiosmtpd's live table: clearing it offers none)."""
        methods: dict[str, Any] = self._auth_methods
        return methods

    def wrap_commands(self, wrap: Callable[[str, Callable[[str], Any]], Callable[[str], Any]]) -> None:
        """Replace each command's method (``wrap(name, method)``) for this connection."""
        self._smtp_methods = {name: wrap(name, method) for name, method in self._smtp_methods.items()}

    def tls_started(self) -> bool:
        """STARTTLS succeeded on this connection."""
        return self._tls_protocol is not None

    def stream_reader(self) -> asyncio.StreamReader:
        """The connection's stream reader (DATA and AUTH lines are read from it directly)."""
        reader: asyncio.StreamReader = self._reader
        return reader
