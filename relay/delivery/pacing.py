"""Pacing: how many submissions a mailbox may start now, as Exchange counts them.

- At most ``per_minute`` submissions per mailbox in any :data:`PACING_WINDOW` as Exchange counts them
  (it allows 30), and at most ``connections`` attempts per mailbox at once (Exchange allows 3).
  Messages beyond that are simply not claimed: a burst waits in the spool, not in memory.
- With a fleet (``fleet:`` in the config) these are this relay's own checks beside the fleet's shared
  ones; while the fleet's Redis is away they use the fleet's fallback share. A mailbox the fleet has no
  room for waits until the time the fleet named.

Everything here lives in memory only and may be lost: after a restart the windows start empty.
Time comes from an injected ``clock``.
"""

from __future__ import annotations

from collections.abc import Callable

from relay.config import Settings
from relay.fleet import Fleet

#: Pacing window. Exchange counts a submission when it accepts it; we count it from the moment it
#: starts until it ends (see :class:`Pacer`), plus one second of margin for clocks and rounding.
PACING_WINDOW = 61.0


def mailbox_key(mailbox: str) -> str:
    """A mailbox as the pacing and holds tables key it (addresses compare case-insensitively)."""
    return mailbox.lower()


class Pacer:
    """At most ``per_minute`` submissions in any :data:`PACING_WINDOW` (0 = unlimited). Injectable clock.

    :meth:`take` reserves a slot when a submission starts; :meth:`done` stamps it with the time it
    ended. A slot in flight counts as "now" until it ends, so a slow submission (queued behind the
    connection limit, or a big message) can never make two batches land in one Exchange minute:
    Exchange counts at acceptance, which lies between our start and our end.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._slots: dict[int, float | None] = {}  # slot -> end time (None: in flight)
        self._next = 1

    def _expire(self, now: float) -> None:
        for slot, ended in list(self._slots.items()):
            if ended is not None and ended <= now - PACING_WINDOW:
                del self._slots[slot]

    def available(self) -> int:
        """How many submissions may start now."""
        if self.per_minute <= 0:
            return 1 << 30
        self._expire(self._clock())
        return max(self.per_minute - len(self._slots), 0)

    def delay(self) -> float:
        """Seconds until a submission may start (0 = now). A full window of slots still in flight
        gives :data:`PACING_WINDOW` (the end of one of them wakes the scheduler anyway)."""
        if self.available() > 0:
            return 0.0
        ended = [e for e in self._slots.values() if e is not None]
        if not ended:
            return PACING_WINDOW
        return max(min(ended) + PACING_WINDOW - self._clock(), 0.0)

    def take(self) -> int | None:
        """Reserve a slot now if one is free; the slot to pass to :meth:`done`, or None."""
        if self.available() <= 0:
            return None
        if self.per_minute <= 0:
            return 0
        slot = self._next
        self._next += 1
        self._slots[slot] = None
        return slot

    def done(self, slot: int | None) -> None:
        """The submission of ``slot`` ended (whatever the outcome): its minute starts counting down."""
        if slot and slot in self._slots and self._slots[slot] is None:
            self._slots[slot] = self._clock()

    def cancel(self, slot: int | None) -> None:
        """Nothing was submitted for ``slot`` (the fleet said wait): it does not count."""
        if slot:
            self._slots.pop(slot, None)


class MailboxPacing:
    """Per mailbox: its limits, its :class:`Pacer`, its attempts in flight and any fleet wait."""

    def __init__(self, settings: Settings, clock: Callable[[], float]) -> None:
        self._limits: dict[str, tuple[int, int]] = {}
        self.settings = settings
        self.clock = clock
        #: Optional: the limits each mailbox shares with other relays (relay.fleet). None: this relay
        #: alone enforces them, as without ``fleet:`` in the config.
        self.fleet: Fleet | None = None
        self._pacers: dict[str, Pacer] = {}
        self._busy: dict[str, int] = {}
        #: Mailboxes the fleet has no room for right now: not started before this time.
        self._fleet_until: dict[str, float] = {}
        #: Attempts that submitted nothing because the fleet said wait: their pacing slot is given back.
        self._fleet_refund: set[str] = set()

    @property
    def settings(self) -> Settings:
        return self._settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        """A reload: the per-mailbox limits are looked up again."""
        self._settings = settings
        self._limits.clear()

    def _local_limits(self, key: str) -> tuple[int, int]:
        """(connections, per_minute) this relay may use for a mailbox (lower case) on its own: as
        configured, or the fleet's fallback share while the fleet's Redis is away."""
        limits = self.configured_limits(key)
        return limits if self.fleet is None else self.fleet.link.local_limits(limits)

    def configured_limits(self, key: str) -> tuple[int, int]:
        """(connections, per_minute) of a mailbox (lower case), from the settings (several times a message:
        remembered until the next reload)."""
        key = mailbox_key(key)
        limits = self._limits.get(key)
        if limits is None:
            mbx = self.settings.mailbox(key)
            default = self.settings.delivery.per_mailbox
            limits = ((self.settings.mailbox_connections(mbx), self.settings.mailbox_per_minute(mbx)) if mbx
                      else (default.connections, default.per_minute))
            self._limits[key] = limits
        return limits

    def pacer(self, mailbox: str) -> Pacer:
        key = mailbox_key(mailbox)
        per_minute = self._local_limits(key)[1]
        pacer = self._pacers.get(key)
        if pacer is None:
            pacer = self._pacers[key] = Pacer(per_minute, self.clock)
        pacer.per_minute = per_minute  # follows a configuration reload; the window's history stays
        return pacer

    def connections(self, mailbox: str) -> int:
        return self._local_limits(mailbox_key(mailbox))[0]

    def busy(self, mailbox: str) -> int:
        """Attempts in flight for a mailbox (sync and scheduled)."""
        return self._busy.get(mailbox_key(mailbox), 0)

    def room(self, mailbox: str) -> int:
        """How many attempts the mailbox may start now: connections free, pacing slots free."""
        return min(self.connections(mailbox) - self.busy(mailbox), self.pacer(mailbox).available())

    def started(self, mailbox: str) -> None:
        """An attempt took a connection of the mailbox."""
        key = mailbox_key(mailbox)
        self._busy[key] = self._busy.get(key, 0) + 1

    def ended(self, mailbox: str, slot: int | None, queue_id: str) -> None:
        """The attempt of ``queue_id`` ended: its connection frees; its pacing ``slot`` counts down,
        or is given back if the fleet made it submit nothing."""
        key = mailbox_key(mailbox)
        self._busy[key] = max(self._busy.get(key, 1) - 1, 0)
        if queue_id in self._fleet_refund:
            self._fleet_refund.discard(queue_id)
            self.pacer(key).cancel(slot)
        else:
            self.pacer(key).done(slot)

    def fleet_wait(self, mailbox: str, queue_id: str, until: float) -> None:
        """The fleet had no room for ``queue_id``: its slot is given back and the mailbox waits."""
        key = mailbox_key(mailbox)
        self._fleet_refund.add(queue_id)
        self._fleet_until[key] = max(self._fleet_until.get(key, 0.0), until)

    def fleet_until(self, mailbox: str) -> float:
        """When the fleet's wait for the mailbox ends (0: none)."""
        return self._fleet_until.get(mailbox_key(mailbox), 0.0)

    def fleet_waiting(self, mailbox: str) -> bool:
        until = self._fleet_until.get(mailbox_key(mailbox))
        if until is None:
            return False
        if self.clock() >= until:
            del self._fleet_until[mailbox_key(mailbox)]
            return False
        return True

    def waits(self, now: float) -> list[float]:
        """Seconds until each fleet wait ends and each full pacing window frees (for the scheduler's sleep)."""
        fleet = [t - now for t in self._fleet_until.values()]
        return fleet + [d for p in self._pacers.values() if (d := p.delay()) > 0]
