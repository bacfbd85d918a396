"""Logs, metrics and health: everything reports here, nothing in the pipeline reads it back.

- Logs: one event per line. JSON when not on a terminal (journald, Docker, Kubernetes collect it),
  human text on a terminal. Structured fields come from ``extra=`` (queue_id, message_id, event...).
  Nothing that logs here passes a secret, a token, a password or a message body.
- Metrics: Prometheus (prometheus-client), on a private registry so tests can run several relays.
- Health: ``/healthz`` (alive) and ``/readyz`` (listener up, spool writable, nothing on hold, no app
  paused) served with ``/metrics`` by a small WSGI server in a thread, off the event loop.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(_extras(record))
        if record.exc_info and record.exc_info[0] is not None:
            out["error_type"] = record.exc_info[0].__name__  # never the traceback text: it may hold data
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time level msg key=value ...`` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items() if k != "event")
        event = getattr(record, "event", "")
        head = f"{ts} {record.levelname:<7} {record.getMessage()}"
        if event and event not in record.getMessage():
            head += f" [{event}]"
        return f"{head} {fields}".rstrip()


def setup_logging(fmt: str = "auto", level: str = "info", stream: Any = None) -> None:
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if getattr(stream, "isatty", lambda: False)() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Neither formatter shows the caller, thread or process: do not compute them for every record
    # (the optimisations of the logging HOWTO; a few percent of the CPU per message).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Libraries that log request details (URLs with tenant ids are fine; bodies are not) stay quiet.
    for noisy in ("mail.log", "msal", "urllib3", "asyncio", "aiosmtplib"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class Metrics:
    """The relay's Prometheus metrics. Labels are bounded: reasons, mailboxes and apps from config."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._enabled: set[Any] = set()
        r = self.registry
        self.received = Counter("relay_messages_received", "Messages accepted from clients", registry=r)
        self.delivered_total = Counter("relay_messages_delivered", "Messages accepted by Exchange",
                                       ["mailbox"], registry=r)
        self.deferred_total = Counter("relay_messages_deferred", "Attempts deferred, by reason", ["reason"],
                                      registry=r)
        self.failed_total = Counter("relay_messages_failed", "Messages refused permanently, by reason",
                                    ["reason"], registry=r)
        self.dead_total = Counter("relay_messages_dead_lettered", "Messages moved to dead letters", ["reason"],
                                  registry=r)
        self.attempts = Histogram("relay_upstream_attempt_seconds", "Upstream attempt duration",
                                  ["outcome"], registry=r,
                                  buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.queue_depth = Gauge("relay_queue_messages", "Messages in the spool, by state", ["state"], registry=r)
        self.oldest_age = Gauge("relay_queue_oldest_seconds", "Age of the oldest queued message", registry=r)
        self.token_requests = Counter("relay_token_requests", "Token requests to Entra ID", ["app"], registry=r)
        self.token_failures = Counter("relay_token_failures", "Failed token requests", ["app", "error"],
                                      registry=r)
        self.token_expiry = Gauge("relay_token_seconds_to_expiry", "Seconds until the current token expires",
                                  ["app"], registry=r)
        self.held = Gauge("relay_held", "Apps or mailboxes on hold for a configuration problem", registry=r)
        self.hold = Gauge("relay_hold", "1 for each app or mailbox on hold, with the classifier's reason",
                          ["scope", "name", "reason"], registry=r)
        self.auth_failures = Counter("relay_client_auth_failures", "Failed client AUTH attempts", registry=r)
        self.reloads = Counter("relay_reload", "Configuration reloads (SIGHUP), by result: applied, refused "
                               "(would make an open relay), invalid (the file does not load)", ["result"], registry=r)
        # The fleet (relay.fleet): exported only when fleet: is configured (enable_fleet).
        self.fleet_connected = Gauge("relay_fleet_connected",
                                     "1 while the fleet's Redis answers, 0 while this relay uses its fallback share",
                                     registry=None)
        self.fleet_waits = Counter("relay_fleet_waits", "Starts put off because the fleet was at a mailbox's limit",
                                   ["mailbox", "limit"], registry=None)
        self.fleet_calls = Counter("relay_fleet_redis_calls", "Round trips to the fleet's Redis, by call", ["call"],
                                   registry=None)
        self.fleet_call_seconds = Counter("relay_fleet_redis_seconds", "Time spent waiting for the fleet's Redis",
                                          ["call"], registry=None)
        self.fleet_slots = Gauge("relay_fleet_slots_in_use", "Exchange sessions open for a mailbox, fleet-wide",
                                 ["mailbox"], registry=None)
        self.fleet_minute = Gauge("relay_fleet_submissions_last_minute",
                                  "Submissions for a mailbox in the last 60 s, fleet-wide", ["mailbox"], registry=None)
        self.fleet_day = Gauge("relay_fleet_recipients_last_day",
                               "Recipients submitted for a mailbox in the last 24 h, fleet-wide", ["mailbox"],
                               registry=None)

    def attempt(self, mailbox: str, reason: str, seconds: float) -> None:
        self.attempts.labels(reason).observe(seconds)

    def delivered(self, mailbox: str) -> None:
        self.delivered_total.labels(mailbox).inc()

    def deferred(self, reason: str) -> None:
        self.deferred_total.labels(reason).inc()

    def failed(self, reason: str) -> None:
        self.failed_total.labels(reason).inc()

    def dead(self, reason: str) -> None:
        self.dead_total.labels(reason[:40]).inc()

    def set_holds(self, holds: Iterable[tuple[str, str, str]]) -> None:
        """The current holds as (scope, name, reason): names come from the config, reasons from the
        classifier's fixed set, so the labels stay bounded."""
        holds = list(holds)
        self.held.set(len(holds))
        self.hold.clear()
        for scope, name, reason in holds:
            self.hold.labels(scope, name, reason).set(1)

    def enable_fleet(self) -> None:
        """Export the fleet's metrics (a relay without ``fleet:`` does not show them at all)."""
        for collector in (self.fleet_connected, self.fleet_waits, self.fleet_calls, self.fleet_call_seconds,
                          self.fleet_slots, self.fleet_minute, self.fleet_day):
            if collector not in self._enabled:
                self.registry.register(collector)
                self._enabled.add(collector)

    def fleet_budget(self, mailbox: str, slots: int, last_minute: int, last_day: int) -> None:
        self.fleet_slots.labels(mailbox).set(slots)
        self.fleet_minute.labels(mailbox).set(last_minute)
        self.fleet_day.labels(mailbox).set(last_day)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


#: at most this many connections are served at once; more are closed at once (a thread each).
HEALTH_MAX_CONNECTIONS = 16
#: a connection gets this long, in all, to send its request and read the answer.
HEALTH_REQUEST_TIMEOUT = 5.0


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most ``max_connections`` at once: the ones over it are closed
    unanswered (a scraper retries; a client opening connections by the thousand gets no threads)."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # the listen backlog: connections wait their turn in order (5 by default)
    max_connections = HEALTH_MAX_CONNECTIONS
    request_timeout = HEALTH_REQUEST_TIMEOUT

    def server_activate(self) -> None:
        super().server_activate()
        self._slots = threading.BoundedSemaphore(self.max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        return  # a client that went away or timed out: nothing to report (and no traceback on stderr)


class _QuietHandler(WSGIRequestHandler):
    """Bounded in time: each read waits at most the request timeout, and the whole connection is
    shut down when that much time has passed (a client sending a byte now and then cannot hold its
    thread either)."""

    server: _ThreadingWSGIServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.request_timeout)
        self._deadline = threading.Timer(self.server.request_timeout, self._expire)
        self._deadline.daemon = True
        self._deadline.start()

    def _expire(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._deadline.cancel()
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        return


Readiness = Callable[[], tuple[bool, dict[str, Any]]]


class HealthServer:
    """``/metrics``, ``/healthz``, ``/readyz`` on a loopback address, in its own thread."""

    def __init__(self, host: str, port: int, metrics: Metrics, readiness: Readiness,
                 refresh: Callable[[], None] | None = None, *,
                 max_connections: int = HEALTH_MAX_CONNECTIONS,
                 request_timeout: float = HEALTH_REQUEST_TIMEOUT) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self.refresh = refresh
        server_class = type("_HealthWSGIServer", (_ThreadingWSGIServer,), {
            "max_connections": max_connections, "request_timeout": request_timeout})
        self._server: WSGIServer = make_server(host, port, self._app, server_class=server_class,
                                   handler_class=_QuietHandler)
        self.port: int = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="health-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            ok, detail = self.readiness()
            body = json.dumps({"ready": ok, **detail}, default=str).encode()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "application/json")])
            return [body]
        if path == "/metrics":
            if self.refresh is not None:
                self.refresh()
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [self.metrics.render()]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
