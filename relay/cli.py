"""Console entry: ``oauth-smtp-relay serve | check | exchange-setup | demo | queue ... | fleet status |
hash-password | health | example-config``.

Exit codes: 0 success, 1 a check or command failed, 2 the configuration (or the command line) is
wrong, or a listen address cannot be used. Config errors print ``file: key: problem`` on stderr.
No ordinary condition (a config error, a port in use, a closed pipe, no terminal) prints a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relay import __version__
from relay.config import Settings, load_settings
from relay.errors import ConfigError, ListenError, SpoolError

DEFAULT_CONFIG = "/etc/oauth-smtp-relay/config.yaml"
#: what config errors point to for an example of every key
EXAMPLE_HINT = "`oauth-smtp-relay example-config` prints an example with every key explained"


def _load(path: str) -> Settings:
    return load_settings(path)


def cmd_serve(args: argparse.Namespace) -> int:
    from relay.observability import setup_logging
    from relay.service import Relay

    settings = _load(args.config)
    obs = settings.observability
    setup_logging(args.log_format or obs.log_format, args.log_level or obs.log_level)
    relay = Relay(settings, config_path=args.config)
    asyncio.run(relay.serve_forever())
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from relay.check import run_check

    return run_check(args)


def cmd_exchange_setup(args: argparse.Namespace) -> int:
    from relay.microsoft.exchange_setup import run_exchange_setup

    return run_exchange_setup(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from relay.demo import run_demo

    return run_demo(keep_running=args.keep_running, messages=args.messages, workdir=args.workdir)


def cmd_hash_password(args: argparse.Namespace) -> int:
    from relay.intake.passwords import hash_password

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif not sys.stdin.isatty():
        print("hash-password: standard input is not a terminal, so the password cannot be asked for; to read it "
              "from a pipe add --password-stdin, e.g.\n"
              "  printf '%s\\n' \"$PASSWORD\" | oauth-smtp-relay hash-password --password-stdin", file=sys.stderr)
        return 2
    else:
        password = getpass.getpass("Password: ")
        if password != getpass.getpass("Again: "):
            print("passwords differ", file=sys.stderr)
            return 1
    if not password:
        print("empty password refused", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def cmd_example_config(args: argparse.Namespace) -> int:
    from importlib.resources import files

    sys.stdout.write(files("relay").joinpath("config.example.yaml").read_text(encoding="utf-8"))
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    from relay.queue.cli import run_queue

    return run_queue(args)


def cmd_health(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    url = args.url
    if url is None:
        settings = load_settings(args.config, read_secrets=False)  # asks an HTTP endpoint: no credential needed
        if not settings.observability.http:
            print("observability.http is not set in the config: no health endpoint to ask", file=sys.stderr)
            return 2
        url = f"http://{settings.observability.http}/readyz"
    if not url.startswith(("http://", "https://")):
        print(f"not an http:// URL: {url!r} (e.g. http://127.0.0.1:9465/readyz)", file=sys.stderr)
        return 2
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:  # noqa: S310 - our own endpoint
            body = resp.read().decode()
            print(body)
            return 0
    except urllib.error.HTTPError as exc:
        print(exc.read().decode(errors="replace"))
        return 1
    except (OSError, ValueError) as exc:
        print(f"cannot reach {url}: {getattr(exc, 'reason', None) or exc}", file=sys.stderr)
        return 1


def cmd_fleet(args: argparse.Namespace) -> int:
    from relay.fleet_cli import run_fleet

    return run_fleet(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oauth-smtp-relay",
        description="SMTP relay: plain SMTP in, Exchange Online out with OAuth 2.0 (XOAUTH2) app-only tokens.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")

    p = sub.add_parser("serve", help="run the relay in the foreground (systemd, Docker, terminal)")
    with_config(p)
    p.add_argument("--log-format", choices=["auto", "json", "text"])
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check", help="check the config and, unless --offline, the whole chain to Exchange")
    with_config(p)
    p.add_argument("--offline", action="store_true", help="only validate the configuration")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--send-to", metavar="ADDRESS", help="also send a test message to ADDRESS")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("exchange-setup",
                       help="print the admin consent URL and Exchange Online PowerShell for this config")
    with_config(p)
    p.add_argument("--redirect-uri", help="a redirect URI registered on the app, for the admin-consent URL")
    p.add_argument("--object-id", help="the Enterprise application's Object ID, if known")
    p.add_argument("--service-principal-id", help="the ID field of Get-ServicePrincipal, if known")
    p.set_defaults(func=cmd_exchange_setup)

    p = sub.add_parser("demo", help="run the real relay against a built-in simulated Microsoft 365")
    p.add_argument("--keep-running", action="store_true", help="leave it running for your own SMTP client")
    p.add_argument("--messages", type=int, default=3, help="how many messages the demo app sends")
    p.add_argument("--workdir", type=Path, default=None, help="where to keep the demo's files")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("example-config", help="print an example config.yaml with every key explained")
    p.set_defaults(func=cmd_example_config)

    p = sub.add_parser("hash-password", help="hash a local user's password for users[].password_hash")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    p.set_defaults(func=cmd_hash_password)

    p = sub.add_parser("health", help="ask a running relay's /readyz; exit 0 when ready")
    with_config(p)
    p.add_argument("--url", help="readiness URL (default: from observability.http in the config)")
    p.add_argument("--timeout", type=float, default=5.0)
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("fleet", help="relays sharing the mailboxes' limits through Redis (fleet: in the config)")
    with_config(p)
    fsub = p.add_subparsers(dest="fleet_command", required=True)
    f = fsub.add_parser("status", help="instances seen; per mailbox: slots and holders, last minute, last 24 h, holds")
    f.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_fleet)

    p = sub.add_parser("queue", help="inspect and manage the spool (safe while the relay runs)")
    with_config(p)
    p.add_argument("--spool", type=Path, help="spool directory (default: spool.path from the config)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    qsub = p.add_subparsers(dest="queue_command", required=True)

    def verb(name: str, helptext: str) -> argparse.ArgumentParser:
        q = qsub.add_parser(name, help=helptext)
        # `queue list --json` as well as `queue --json list`: SUPPRESS keeps the verb's parser from
        # resetting a --json given before the verb.
        q.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
        return q

    verb("list", "messages waiting or in flight")
    verb("dead-letters", "messages that could not be delivered")
    verb("holds", "apps and mailboxes the running relay holds for a configuration problem")
    for name, helptext in (("show", "one message's envelope, state and history"),
                           ("hold", "keep a message from being delivered"),
                           ("release", "let a held message go again"),
                           ("delete", "remove a message (not one in flight)"),
                           ("requeue", "give a dead letter a new life")):
        q = verb(name, helptext)
        q.add_argument("id")
    q = verb("retry", "make a message (or all) due now")
    q.add_argument("id", nargs="?")
    q.add_argument("--all", action="store_true")
    p.set_defaults(func=cmd_queue)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: Any = args.func(args)
        code = int(result)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return code
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        if exc.key:
            print(f"({EXAMPLE_HINT})", file=sys.stderr)
        return 2
    except ListenError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except SpoolError as exc:
        print(f"spool error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `oauth-smtp-relay queue list | head`: the reader has gone, which is not an error of ours.
        # Point stdout at /dev/null so the interpreter's final flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, what a tool killed by the closed pipe would return
    except EOFError:
        print("standard input ended before the answer was read", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
