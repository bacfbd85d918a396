"""What ``fleet status`` reads from the fleet's Redis: the relays seen, and per mailbox its session
slots and who holds them, submissions in the last minute, recipients in the last 24 h, and the holds
and pauses in force. Reads only; safe while the relays run."""

from __future__ import annotations

import json
import time
from typing import Any

from relay.fleet.client import Fleet, SharedBlock, as_text, shared_block
from relay.fleet.scripts import DAY_MS


async def read_status(fleet: Fleet) -> dict[str, Any]:
    """Instances seen, and per mailbox: slots and holders, submissions in the last minute,
    recipients in the last 24 h, holds and pauses (the mailboxes and apps ``fleet`` was given, and
    every mailbox the fleet has paced). Raises FleetUnavailable."""
    now_ms = int(time.time() * 1000)
    ids = await fleet.call("status", fleet.redis.zrangebyscore(fleet.key("instances"), now_ms - DAY_MS, "+inf",
                                                              withscores=True))
    mailboxes = sorted({*fleet.mailboxes, *[as_text(m) for m in await fleet.call(
        "status", fleet.redis.smembers(fleet.key("mailboxes")))]})
    pipe = fleet.redis.pipeline(transaction=False)
    for iid, _ in ids:
        pipe.get(fleet.key("instance", as_text(iid)))
    for m in mailboxes:
        pipe.zrangebyscore(fleet.key("slots", m), now_ms, "+inf")
        pipe.zcount(fleet.key("rate", m), now_ms - 60_000, "+inf")
        pipe.hgetall(fleet.key("rcpt", m))
        pipe.hgetall(fleet.key("block", "mailbox", m))
    for a in fleet.apps:
        pipe.hgetall(fleet.key("block", "app", a))
    res = list(await fleet.call("status", pipe.execute()))
    instances = []
    for iid, seen in ids:
        raw = res.pop(0)
        info = json.loads(raw) if raw else {}
        instances.append({"instance": as_text(iid), "alive": raw is not None, "last_seen": round(seen / 1000, 3),
                          "sessions": info.get("sessions", {}), "pid": info.get("pid"),
                          "host": info.get("host")})
    minute = now_ms // 60_000
    out_mailboxes = []
    for m in mailboxes:
        slots, last_minute, rcpt, block = res.pop(0), res.pop(0), res.pop(0), res.pop(0)
        holders: dict[str, int] = {}
        for lease in slots:
            who = as_text(lease).rsplit("/", 1)[0]
            holders[who] = holders.get(who, 0) + 1
        day = sum(int(c) for k, c in rcpt.items() if int(k) > minute - 1440)
        limits = fleet.limits(m) if m in fleet.mailboxes else (None, None)
        out_mailboxes.append({
            "mailbox": m, "slots_in_use": len(slots), "slots_limit": limits[0], "slot_holders": holders,
            "submissions_last_minute": int(last_minute), "per_minute_limit": limits[1],
            "recipients_last_24h": day, "recipients_per_day_limit": fleet.settings.recipients_per_day,
            "block": block_dict(shared_block("mailbox", m, block)) if block else None})
    apps = []
    for a in fleet.apps:
        block = res.pop(0)
        if block:
            apps.append(block_dict(shared_block("app", a, block)))
    return {"redis": safe_url(fleet.settings.redis), "key_prefix": fleet.prefix, "instances": instances,
            "mailboxes": out_mailboxes, "app_blocks": apps}


def block_dict(b: SharedBlock) -> dict[str, Any]:
    return {"kind": b.kind, "scope": b.scope, "name": b.name, "reason": b.reason, "reply": b.reply,
            "by": b.by, "since": b.since, "until": b.until}


def safe_url(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"
