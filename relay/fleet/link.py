"""The fleet's link to Redis: connected or not, and what this relay may use on its own while it is not.

Redis trouble never stops mail: a failed call switches this relay to its fallback share
(``fleet.fallback``) and logs it once; after losing Redis no new session starts for one grace period
(the other relays notice too and trim to their own share first). Redis back but new or restarted
empty: the registry of leases is not complete until every live relay has written its own again, so
the fallback share holds until then too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from relay.config import FleetSettings

log = logging.getLogger("relay.fleet")


class Link:
    """Whether the fleet's Redis answers (``connected``) and decides the limits (``shared``)."""

    def __init__(self, settings: FleetSettings, instance_id: str, metrics: Any = None) -> None:
        self.settings = settings
        self.instance_id = instance_id
        self.metrics = metrics
        self.connected = False
        self._lost_logged = False
        #: (monotonic) after losing Redis, no new session before this: the others notice too and trim
        #: to their fallback share first.
        self.settle_until = 0.0
        #: (monotonic) Redis is back but its registry is not complete yet: fallback share until then.
        self.forming_until = 0.0
        #: called when this relay loses or regains Redis
        self.on_state: Callable[[bool], None] | None = None

    def lost(self, what: str, exc: BaseException) -> None:
        """A call failed (``what``): the fallback share from now, logged once per loss."""
        if self.connected or not self._lost_logged:
            log.warning("Redis unreachable (or it refused the call): this relay uses its fallback share of "
                        "each mailbox's limits",
                        extra={"event": "fleet_disconnected", "call": what, "error_type": type(exc).__name__,
                               "fallback_connections": self.settings.fallback.connections,
                               "fallback_per_minute": self.settings.fallback.per_minute})
            self._lost_logged = True
        was = self.connected
        if was:
            self.settle_until = time.monotonic() + self.grace
        self.connected = False
        self.gauge()
        if was and self.on_state is not None:
            self.on_state(False)

    def joined(self) -> None:
        """A sync went through: the limits are the fleet's again (once the registry is complete)."""
        if not self.connected:
            log.info("fleet joined: limits are shared through Redis",
                     extra={"event": "fleet_connected", "instance": self.instance_id})
            self.connected = True
            self._lost_logged = False
            self.gauge()
            if self.on_state is not None:
                self.on_state(True)

    def gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.fleet_connected.set(1 if self.connected else 0)

    @property
    def grace(self) -> float:
        """Long enough for every relay to notice a change (one sync) and act on it."""
        return 2 * self.settings.sync_interval + self.settings.deadline

    @property
    def shared(self) -> bool:
        """Redis answers and its registry is complete: the limits are the fleet's."""
        return self.connected and time.monotonic() >= self.forming_until

    def local_limits(self, configured: tuple[int, int]) -> tuple[int, int]:
        """What this relay may use on its own: all of it while Redis decides (Redis is the limit
        then), the fallback share while Redis is away (or back but not complete yet)."""
        if self.shared:
            return configured
        fb = self.settings.fallback
        per_minute = fb.per_minute if configured[1] <= 0 else min(fb.per_minute or configured[1], configured[1])
        return min(fb.connections, configured[0]), per_minute

    def session_share(self, configured: int) -> int:
        """How many sessions of a mailbox this relay may keep open: the fleet decides while shared,
        the fallback share otherwise."""
        return configured if self.shared else min(configured, self.settings.fallback.connections)
