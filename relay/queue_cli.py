"""``oauth-smtp-relay queue ...``: postqueue/postsuper for our spool, safe while the daemon runs.

It opens the same SQLite spool as the daemon (WAL mode allows that); state changes are single
transactions, and a message being delivered (ACTIVE) cannot be deleted or held under the daemon.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from relay.config import load_settings
from relay.spool import Entry, Spool, State


def _spool(args: argparse.Namespace) -> Spool:
    path: Path = args.spool if args.spool else load_settings(args.config).spool.path
    spool = Spool(path)
    spool.open(recover=False)
    return spool


def entry_dict(entry: Entry, now: float) -> dict[str, Any]:
    return {
        "id": entry.id,
        "state": str(entry.state),
        "age_seconds": round(now - entry.created_at),
        "sender": entry.envelope.mail_from or "<>",
        "recipients": list(entry.envelope.rcpt_tos),
        "recipients_done": list(entry.recipients_done),
        "recipients_failed": dict(entry.recipients_failed),
        "mailbox": entry.route.mailbox,
        "app": entry.route.app,
        "attempts": entry.attempts,
        "next_attempt_in": max(round(entry.next_attempt_at - now), 0),
        "last_reply": entry.last_reply,
        "reason": entry.reason,
        "message_id": entry.message_id,
        "size": entry.size,
        "client": entry.client,
    }


def _age(seconds: float) -> str:
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _print_table(entries: list[Entry], now: float) -> None:
    if not entries:
        print("queue is empty")
        return
    print(f"{'ID':<22} {'STATE':<7} {'AGE':>5} {'TRIES':>5}  SENDER -> RECIPIENTS")
    for e in entries:
        rcpts = ", ".join(e.envelope.rcpt_tos[:3]) + (f" (+{len(e.envelope.rcpt_tos) - 3})"
                                                      if len(e.envelope.rcpt_tos) > 3 else "")
        print(f"{e.id:<22} {e.state!s:<7} {_age(now - e.created_at):>5} {e.attempts:>5}  "
              f"{e.envelope.mail_from or '<>'} -> {rcpts}")
        why = e.reason or e.last_reply
        if why:
            print(f"{'':<22} {why[:200]}")
    print(f"-- {len(entries)} message(s)")


def run_queue(args: argparse.Namespace) -> int:
    spool = _spool(args)
    now = time.time()
    try:
        cmd = args.queue_command
        if cmd in ("list", "dead-letters"):
            states = [State.DEAD] if cmd == "dead-letters" else [State.QUEUED, State.ACTIVE, State.HOLD]
            entries = spool.list(states)
            if args.json:
                print(json.dumps([entry_dict(e, now) for e in entries], indent=2))
            else:
                _print_table(entries, now)
            return 0
        if cmd == "show":
            entry = spool.get(args.id)
            if entry is None:
                print(f"no message {args.id}", file=sys.stderr)
                return 1
            data = entry_dict(entry, now)
            if args.json:
                print(json.dumps(data, indent=2))
            else:
                for key, value in data.items():
                    print(f"{key:>18}: {value}")
            return 0
        if cmd == "retry":
            if args.all:
                n = spool.retry(None)
            elif args.id:
                n = spool.retry(args.id)
            else:
                print("give a queue id or --all", file=sys.stderr)
                return 2
            _say(args, {"retried": n}, f"{n} message(s) due now")
            return 0 if n or args.all else 1
        actions = {
            "hold": lambda i: spool.hold(i, "held by admin"),
            "release": spool.release,
            "delete": spool.delete,
            "requeue": spool.requeue,
        }
        ok = actions[cmd](args.id)
        _say(args, {"id": args.id, "ok": ok},
             f"{cmd}: {args.id} done" if ok else f"{cmd}: {args.id} not possible (unknown id or wrong state)")
        return 0 if ok else 1
    finally:
        spool.close()


def _say(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data) if args.json else text)
