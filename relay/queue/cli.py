"""``oauth-smtp-relay queue ...``: postqueue/postsuper for our spool, safe while the daemon runs.

It opens the same SQLite spool as the daemon (WAL mode allows that) without recovery and without the
daemon's lock; every change is one transaction that names the state it expects, so it cannot
interfere with a message the daemon is delivering (ACTIVE): such a message cannot be held, deleted
or retried until its attempt is over. ACTIVE also covers new messages that wait in the daemon's
memory for a free connection of their mailbox during a burst (at most 1024, usually for seconds).
The daemon looks at the spool at least once a second, so a ``retry`` or ``release`` takes effect
within about a second.

The daemon's holds of a whole mailbox or app for a configuration problem live in its memory; it
publishes them to ``holds.json`` in the spool, which ``queue holds`` and ``queue list`` show while the
daemon runs (they are also on the readiness endpoint ``/readyz``, in the metrics and in the logs).

Exit status: 0 done, 1 not possible (unknown id, wrong state), 2 usage.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from relay.config import load_settings
from relay.errors import SpoolError
from relay.queue.problems import os_error
from relay.queue.spool import Entry, Spool, State

#: What each command needs the message to be in, for a helpful refusal.
_NEEDS = {
    "hold": (State.QUEUED,),
    "release": (State.HOLD,),
    "delete": (State.QUEUED, State.HOLD, State.DEAD),
    "requeue": (State.DEAD,),
    "retry": (State.QUEUED,),
}


def _spool(args: argparse.Namespace) -> Spool:
    # The spool path is all the queue needs from the config: no credential is read (or needed).
    path: Path = args.spool if args.spool else load_settings(args.config, read_secrets=False).spool.path
    # Never create a spool: run as another user (root) that would leave a directory the daemon
    # cannot write to, and an empty new spool would only hide a wrong path.
    try:
        exists = (path / "spool.db").is_file()
    except OSError as exc:
        raise os_error(exc, "read the spool", path) from None
    if not exists:
        raise SpoolError(f"no spool at {path} (wrong spool.path, or the relay has not run yet)")
    spool = Spool(path)
    spool.open(recover=False)
    return spool


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds")


def entry_dict(entry: Entry, now: float) -> dict[str, Any]:
    return {
        "id": entry.id,
        "state": str(entry.state),
        "created_at": _iso(entry.created_at),
        "age_seconds": round(now - entry.created_at),
        "sender": entry.envelope.mail_from or "<>",
        "recipients": list(entry.envelope.rcpt_tos),
        "recipients_pending": list(entry.pending_recipients),
        "recipients_done": list(entry.recipients_done),
        "recipients_failed": dict(entry.recipients_failed),
        "mailbox": entry.route.mailbox,
        "app": entry.route.app,
        "attempts": entry.attempts,
        "next_attempt_at": _iso(entry.next_attempt_at),
        "next_attempt_in": max(round(entry.next_attempt_at - now), 0),
        "last_reply": entry.last_reply,
        "reason": entry.reason,
        "message_id": entry.message_id,
        "size": entry.size,
        "client": entry.client,
    }


def _age(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _print_table(entries: list[Entry], now: float, empty: str) -> None:
    if not entries:
        print(empty)
        return
    print(f"{'ID':<16}  {'STATE':<6} {'AGE':>5} {'TRIES':>5}  SENDER -> RECIPIENTS")
    for e in entries:
        rcpts = ", ".join(e.envelope.rcpt_tos[:3]) + (f" (+{len(e.envelope.rcpt_tos) - 3})"
                                                      if len(e.envelope.rcpt_tos) > 3 else "")
        print(f"{e.id:<16}  {e.state!s:<6} {_age(now - e.created_at):>5} {e.attempts:>5}  "
              f"{e.envelope.mail_from or '<>'} -> {rcpts}")
        for line in dict.fromkeys(x for x in (e.last_reply, e.reason) if x):
            print(f"{'':<18}{line[:200]}")
    print(f"-- {len(entries)} message(s)")


def _print_holds(holds: list[dict[str, Any]] | None, now: float, *, quiet: bool) -> None:
    """The running relay's holds, with Exchange's or Entra ID's answer and the admin step to fix."""
    if holds is None:
        if not quiet:
            print("the relay is not running (no holds to report)")
        return
    if not holds:
        if not quiet:
            print("no app or mailbox on hold")
        return
    for hold in holds:
        since = hold.get("since")
        age = f" for {round(now - since)} s" if isinstance(since, int | float) else ""
        label = "PAUSED" if hold.get("kind") == "pause" else "ON HOLD"  # an app whose endpoint does not answer
        print(f"{label} {hold.get('scope')} {hold.get('name')}{age}: {hold.get('reason')}: {hold.get('reply')}")
        for line in str(hold.get("hint") or "").splitlines():
            for part in textwrap.wrap(line, 96, break_on_hyphens=False) or [""]:
                print(f"    {part}")
    print(f"-- {len(holds)} hold(s); their mail waits, and moves by itself once the fix works\n")


def _why_not(spool: Spool, cmd: str, id: str) -> str:
    entry = spool.get(id)
    if entry is None:
        return f"no message {id}"
    needs = " or ".join(str(s) for s in _NEEDS.get(cmd, ()))
    extra = (" (being delivered, or next in line for a connection: try again in a moment)"
             if entry.state is State.ACTIVE else "")
    return f"message {id} is {entry.state}{extra}; {cmd} needs it {needs}"


def run_queue(args: argparse.Namespace) -> int:
    spool = _spool(args)
    now = time.time()
    try:
        cmd = args.queue_command
        if cmd == "holds":
            holds = spool.daemon_holds()
            if args.json:
                print(json.dumps({"relay_running": holds is not None, "holds": holds or []}, indent=2))
            else:
                _print_holds(holds, now, quiet=False)
            return 0
        if cmd in ("list", "dead-letters"):
            dead = cmd == "dead-letters"
            entries = spool.list([State.DEAD] if dead else [State.QUEUED, State.ACTIVE, State.HOLD])
            if args.json:
                print(json.dumps([entry_dict(e, now) for e in entries], indent=2))
            else:
                if not dead:
                    _print_holds(spool.daemon_holds(), now, quiet=True)
                _print_table(entries, now, "no dead letters" if dead else "queue is empty")
            return 0
        if cmd == "show":
            entry = spool.get(args.id)
            if entry is None:
                _fail(args, {"id": args.id, "error": f"no message {args.id}"})
                return 1
            data = entry_dict(entry, now)
            if args.json:
                print(json.dumps(data, indent=2))
            else:
                for key, value in data.items():
                    print(f"{key:>18}: {value}")
            return 0
        if cmd == "retry":
            if args.all == bool(args.id):
                print("give a queue id or --all", file=sys.stderr)
                return 2
            n = spool.retry(None if args.all else args.id)
            if not n and not args.all:
                _fail(args, {"id": args.id, "retried": 0, "error": _why_not(spool, cmd, args.id)})
                return 1
            _say(args, {"retried": n}, f"{n} message(s) due now")
            return 0
        actions = {
            "hold": lambda i: spool.hold(i, "held by admin"),
            "release": spool.release,
            "delete": spool.delete,
            "requeue": spool.requeue,
        }
        if actions[cmd](args.id):
            after = spool.get(args.id)
            _say(args, {"id": args.id, "ok": True, "state": str(after.state) if after else "deleted"},
                 f"{cmd}: {args.id} done")
            return 0
        _fail(args, {"id": args.id, "ok": False, "error": _why_not(spool, cmd, args.id)})
        return 1
    finally:
        spool.close()


def _say(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data) if args.json else text)


def _fail(args: argparse.Namespace, data: dict[str, Any]) -> None:
    """A refusal: JSON on stdout with --json (machine-readable either way), the text on stderr."""
    if args.json:
        print(json.dumps(data))
    print(f"{args.queue_command}: {data['error']}", file=sys.stderr)
