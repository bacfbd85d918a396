"""The fleet: several relays share each mailbox's Exchange limits through Redis.

Exchange Online's limits are per mailbox, not per relay: 3 concurrent sessions, 30 submissions a
minute, 10,000 recipients a day. With ``fleet:`` configured, every relay sending as a mailbox asks
Redis before it opens a session or submits a message; each decision is one Lua script, so it is
atomic in Redis and no two relays can both take the last slot.

Keys (``P`` is ``fleet.key_prefix``, ``m`` a mailbox in lower case)::

    P slots:m        ZSET  lease id -> lease expiry (ms)      session slots (leases renewed while open)
    P rate:m         ZSET  submission id -> start/end (ms)     submissions in the last 61 s
    P rcpt:m         HASH  minute number -> recipients         recipients in the last 24 h
    P block:S:N      HASH  kind, reason, reply, hint, ...      a hold or pause of app/mailbox N (S: scope)
    P probe:S:N      STR   instance id, with a TTL             the one relay probing a held N
    P instance:I     STR   JSON heartbeat, with a TTL          relay I is alive
    P instances      ZSET  instance id -> last heartbeat (ms)  who has been seen (for ``fleet status``)
    P mailboxes      SET   mailbox                              mailboxes the fleet has paced
    P want:m         STR   instance id, 2 s TTL                a relay waits for a slot: close idle sessions
    P epoch          STR   ms                                   when the slot registry became complete

Only counters, lease ids, instance ids and the classifier's reply texts are stored: no token, no
secret, no message, no recipient address. Time comes from Redis (``TIME``) inside the scripts, so the
relays' clocks do not have to agree.

Redis trouble never stops mail: every call has a deadline (``fleet.deadline``); a failure switches
this relay to its fallback share (``fleet.fallback``), logs it once, and a background loop rejoins
when Redis answers again. While disconnected no call waits for Redis at all.

The package: ``client`` (``Fleet``, what the delivery path calls), ``scripts`` (the Lua scripts),
``link`` (connected or not, and the fallback share while not) and ``status`` (what ``fleet status``
reads).
"""

from relay.fleet.client import Fleet, FleetCounters, FleetUnavailable, FleetWait, SharedBlock

__all__ = ["Fleet", "FleetCounters", "FleetUnavailable", "FleetWait", "SharedBlock"]
