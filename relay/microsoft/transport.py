"""The transport of each delivery attempt, chosen in one place.

A mailbox with ``transport: graph`` sends through Microsoft Graph (:class:`relay.microsoft.graph.GraphSender`),
every other one over SMTP (:class:`relay.microsoft.upstream.Submitter`); a message too big for Graph goes by
SMTP when the mailbox says ``fallback_smtp: true`` (Graph hands it back). The transport is the
mailbox's as configured now, not when the message arrived. Whichever transport sends, the attempt
holds one of the mailbox's slots (Exchange allows 3 SMTP sessions per mailbox, Graph 4 concurrent
requests per app and mailbox), and a route whose app has since been removed from the configuration
is failed with a reason an admin can act on instead of being retried forever.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from relay.delivery.classify import Action, Outcome, Scope, Verdict
from relay.envelope import Envelope, Route
from relay.microsoft.upstream import Submitter

if TYPE_CHECKING:  # loaded by the service only when a mailbox sends through Graph
    from relay.microsoft.graph import GraphSender

__all__ = ["Dispatcher"]


class Dispatcher:
    """Implements what the scheduler calls (``submit``) by choosing a transport per attempt."""

    def __init__(self, smtp: Submitter, connections: Callable[[str], int],
                 graph: GraphSender | None = None) -> None:
        self.smtp = smtp
        self._connections = connections
        #: Sends the mail of ``transport: graph`` mailboxes; None: every mailbox is SMTP.
        self.graph = graph

    def graph_for(self, mailbox: str) -> GraphSender | None:
        """The Graph sender when ``mailbox`` sends through Graph (as configured now), else None."""
        return self.graph if self.graph is not None and self.graph.handles(mailbox) else None

    async def submit(self, route: Route, envelope: Envelope, body: bytes | Path,
                     recipients: tuple[str, ...] | None = None) -> Outcome:
        """One attempt for ``recipients`` (default: all of the envelope's)."""
        started = time.monotonic()
        rcpts = recipients if recipients is not None else envelope.rcpt_tos
        if not self.smtp.configured(route.app):
            # Spooled under a configuration that had this app; it has since been removed. Keep the
            # message (dead letter) with a reason an admin can act on, rather than retrying forever.
            return Outcome(verdict=Verdict(
                action=Action.FAILED, reason="route_unconfigured", scope=Scope.MESSAGE, code=451,
                enhanced="4.3.5",
                reply=f"451 4.3.5 app {route.app!r} (mailbox {route.mailbox}) is no longer configured",
                hint="Restore the app and mailbox in the config and run `queue requeue ID`, or `queue delete ID`."))
        async with self.smtp.pool.slots(route.mailbox, self._connections(route.mailbox)):
            graph = self.graph_for(route.mailbox)
            outcome = await graph.submit(route, envelope, body, rcpts) if graph is not None else None
            if outcome is None:  # SMTP, or too big for Graph and the mailbox falls back to SMTP
                outcome = await self.smtp.submit(route, envelope, body, rcpts)
        outcome.duration = time.monotonic() - started
        return outcome
