"""``oauth-smtp-relay fleet status [--json]``: what the fleet's Redis says about the relays sharing
the configured mailboxes' limits. Reads only; safe while the relays run."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import time
from typing import Any

from relay.config import Settings, load_settings
from relay.fleet import Fleet, FleetUnavailable
from relay.fleet.status import read_status


def run_fleet(args: argparse.Namespace) -> int:
    # Redis's password only: an admin may run this without access to the apps' credentials.
    settings = load_settings(args.config, secrets_of="fleet")
    if settings.fleet is None:
        print(f"{args.config}: fleet: is not configured: this relay shares no limits (see docs/fleet.md)",
              file=sys.stderr)
        return 2
    try:
        status = asyncio.run(_status(settings))
    except FleetUnavailable:
        print(f"cannot reach Redis at {settings.fleet.redis} within {settings.fleet.deadline:g} s "
              "(fleet.deadline): is it running, and do fleet.redis, fleet.password_file and fleet.ca_file "
              "match it?", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2, default=str))
    else:
        print(render(status))
    return 0


async def _status(settings: Settings) -> dict[str, Any]:
    assert settings.fleet is not None

    def limits(mailbox: str) -> tuple[int, int]:
        mbx = settings.mailbox(mailbox)
        if mbx is None:
            return settings.delivery.per_mailbox.connections, settings.delivery.per_mailbox.per_minute
        return settings.mailbox_connections(mbx), settings.mailbox_per_minute(mbx)

    fleet = Fleet(settings.fleet, limits)
    fleet.mailboxes = tuple(m.address for m in settings.mailboxes)
    fleet.apps = tuple(a.name for a in settings.apps)
    # A command-line look may wait a little longer than a relay's hot path would.
    fleet.link.connected = True
    try:
        return await read_status(fleet)
    finally:
        await fleet.redis.aclose()


def _ago(stamp: float) -> str:
    return f"{max(time.time() - stamp, 0):.1f} s ago"


def _when(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def render(status: dict[str, Any]) -> str:
    lines = [f"fleet: {status['redis']} (key prefix {status['key_prefix']})"]
    alive = [i for i in status["instances"] if i["alive"]]
    lines.append(f"instances: {len(alive)} alive, {len(status['instances']) - len(alive)} gone (last 24 h)")
    for inst in status["instances"]:
        sessions = ", ".join(f"{m}={n}" for m, n in inst["sessions"].items()) or "none"
        state = "alive" if inst["alive"] else "gone "
        lines.append(f"  {inst['instance']:<32} {state}  last seen {_ago(inst['last_seen'])}  sessions: {sessions}")
    for m in status["mailboxes"]:
        lines.append(f"mailbox {m['mailbox']}")
        holders = ", ".join(f"{who}: {n}" for who, n in m["slot_holders"].items()) or "nobody"
        limit = m["slots_limit"] if m["slots_limit"] is not None else "?"
        lines.append(f"  session slots    {m['slots_in_use']} of {limit} ({holders})")
        per_minute = m["per_minute_limit"] if m["per_minute_limit"] else "unlimited"
        lines.append(f"  last minute      {m['submissions_last_minute']} submissions (limit {per_minute})")
        budget = m["recipients_per_day_limit"] or "unlimited"
        lines.append(f"  last 24 hours    {m['recipients_last_24h']} recipients (budget {budget})")
        lines.append("  " + _block_line(m["block"]))
    for b in status["app_blocks"]:
        lines.append(f"app {b['name']}: " + _block_line(b))
    return "\n".join(lines)


def _block_line(block: dict[str, Any] | None) -> str:
    if block is None:
        return "hold/pause       none"
    until = f", until {_when(block['until'])}" if block["kind"] == "pause" else ""
    return (f"{block['kind']:<16} {block['reason']} since {_when(block['since'])}{until}, found by {block['by']}: "
            f"{block['reply']}")
