"""Wires the parts and owns the lifecycle: start, reload (SIGHUP), drain and stop (SIGTERM/SIGINT).

The only module that knows every other one. Order of start: spool (recover what a crash left) ->
tokens -> upstream pool -> delivery scheduler -> listeners (last: we accept mail only when we can keep
it) -> health endpoint -> READY=1 to systemd. Stop is the reverse; in-flight deliveries get a grace
period and otherwise stay in the spool for the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import aiosmtplib

from relay.config import Settings, load_settings, load_warnings, open_relay_problem, parse_host_port
from relay.delivery.classify import Action, Scope, Stage, Verdict, classify_exception, classify_reply
from relay.delivery.scheduler import Delivery
from relay.envelope import Envelope, Route
from relay.errors import ConfigError, ListenError, SpoolError, SpoolFull, TokenError
from relay.fleet import Fleet
from relay.intake.data import BodySink
from relay.intake.limits import AuthLimiter
from relay.intake.listener import ListenerState, start_listener
from relay.intake.policy import Policy
from relay.intake.tls import listener_tls
from relay.microsoft.tokens import Token, TokenProviders
from relay.microsoft.transport import Dispatcher
from relay.microsoft.upstream import SessionPool, Submitter, tls_context_for
from relay.observability import HealthServer, Metrics
from relay.queue.committer import GroupCommitter
from relay.queue.spool import BodyWriter, Entry, Spool, State, StoreRequest

if TYPE_CHECKING:
    from relay.microsoft.graph import GraphSender

log = logging.getLogger("relay.service")

#: A received body up to this size stays in memory for its immediate attempt (no read-back from the
#: spool file); bigger ones are streamed from the file. Bounded: this times the connection limit.
KEEP_IN_MEMORY = 64 * 1024
#: Seconds beyond delivery.stop_grace that a stop may take in all (closing sessions, the fleet, the spool).
STOP_MARGIN = 15.0


def _bind_problem(exc: OSError) -> str:
    """``address already in use`` and the like, with the fix where there is an obvious one."""
    reason = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
    if exc.errno == errno.EADDRINUSE:
        return f"{reason} (another process listens there: stop it, or choose another port)"
    if exc.errno == errno.EACCES:
        return f"{reason} (ports below 1024 need CAP_NET_BIND_SERVICE: see docs/systemd.md)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{reason} (no interface of this host has that address)"
    return reason


class ReloadRefused(ConfigError):
    """A reload that would make the running relay an open relay: the running configuration stays."""


def sd_notify(message: str) -> bool:
    """Tell systemd about our state (READY=1, STOPPING=1, WATCHDOG=1, STATUS=...). No-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError:
        return False


class Relay:
    """One running relay. ``await start()``, then ``await stop()``; or ``await serve_forever()``."""

    def __init__(
        self,
        settings: Settings,
        *,
        config_path: str | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.clock = clock
        self.environ = os.environ if environ is None else environ
        self.metrics = Metrics()
        self.spool = Spool(settings.spool.path, clock=clock, fsync=settings.spool.fsync,
                           min_free=settings.spool.min_free)
        self.tokens = TokenProviders(settings.apps, environ=self.environ, clock=clock,
                                     config_file=config_path or "<config>")
        for provider in self.tokens:
            provider.on_acquired = self._token_acquired(provider.app.name)
            provider.on_failed = self._token_failed(provider.app.name)
        # With a fleet, an idle session is closed soon: its slot is the whole fleet's.
        idle_close = (min(settings.delivery.idle_close, settings.fleet.idle_release) if settings.fleet
                      else settings.delivery.idle_close)
        self.pool = SessionPool(local_hostname=settings.hostname or socket.getfqdn() or "localhost",
                                timeout=settings.delivery.timeout, idle_close=idle_close)
        providers = {p.app.name: p for p in self.tokens}
        # Graph (sendMail) for ``transport: graph`` mailboxes, imported only then; SMTP for the others.
        self.graph: GraphSender | None = None
        if any(m.transport == "graph" for m in settings.mailboxes):
            from relay.microsoft.graph import GraphSender

            self.graph = GraphSender.from_settings(settings, providers, environ=self.environ)
        self.submitter = Dispatcher(Submitter(self.pool, {a.name: a for a in settings.apps}, providers),
                                    self._connections_for, graph=self.graph)
        self.committer = GroupCommitter(self.spool)
        self.delivery = Delivery(settings, self.spool, self.submitter, self.metrics, clock=clock,
                                 committer=self.committer,
                                 sleep=sleep, probe=self.probe)
        self.delivery.attempts.on_dead = self.notify_dead
        #: Optional: the mailboxes' limits shared with other relays through Redis (fleet: in the config).
        self.fleet: Fleet | None = None
        if settings.fleet is not None:
            self.fleet = Fleet(settings.fleet, self.delivery.pacing.configured_limits, metrics=self.metrics)
            self.fleet.on_blocks = self.delivery.held.fleet_blocks
            self.fleet.link.on_state = self._fleet_state
            self.pool.fleet = self.fleet
            self.delivery.fleet = self.fleet
        self.listener_state = ListenerState(
            settings=settings,
            policy=Policy(settings),
            intake=self,
            auth_limiter=AuthLimiter(settings.limits.auth_failures.max, settings.limits.auth_failures.window,
                                     settings.limits.auth_failures.ban, on_failure=self.metrics.auth_failures.inc),
        )
        self.servers: list[asyncio.base_events.Server] = []
        self.health: HealthServer | None = None
        self._scheduler: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self.ports: list[int] = []

    # ------------------------------------------------------------------ wiring helpers

    def _connections_for(self, mailbox: str) -> int:
        mbx = self.settings.mailbox(mailbox)
        return self.settings.mailbox_connections(mbx) if mbx else self.settings.delivery.per_mailbox.connections

    def _token_acquired(self, app: str) -> Callable[[Token], None]:
        def record(token: Token) -> None:
            self.metrics.token_requests.labels(app).inc()
            self.metrics.token_expiry.labels(app).set(token.expires_at - self.clock())
        return record

    def _token_failed(self, app: str) -> Callable[[TokenError], None]:
        def record(exc: TokenError) -> None:
            self.metrics.token_requests.labels(app).inc()
            code = f"AADSTS{exc.aadsts}" if exc.aadsts else exc.error
            self.metrics.token_failures.labels(app, code).inc()
        return record

    # ------------------------------------------------------------------ Intake (for the listener)

    def new_body(self) -> BodySink:
        writer: BodyWriter = self.spool.writer(keep=KEEP_IN_MEMORY)
        return writer

    async def accept(self, envelope: Envelope, route: Route, body: BodySink, *, message_id: str,
                     client: str) -> str:
        assert isinstance(body, BodyWriter)
        try:
            entry = await self.committer.store(
                StoreRequest(envelope, route, body, message_id=message_id, client=client, state=State.ACTIVE),
                on_orphan=self._adopt)
        except SpoolFull:
            log.error("spool full: message refused with 452", extra={"event": "spool_full", "client": client})
            raise
        self._received(entry)
        return await self.delivery.deliver_now(entry, self.settings.delivery.sync_wait, body=body.kept())

    def _received(self, entry: Entry, note: str = "") -> None:
        self.metrics.received.inc()
        notes = [*entry.route.notes, *([note] if note else [])]
        log.info("received", extra={"event": "received", "queue_id": entry.id, "message_id": entry.message_id,
                                    "client": entry.client, "mailbox": entry.route.mailbox,
                                    "recipients": len(entry.envelope.rcpt_tos), "size": entry.size,
                                    **({"note": "; ".join(notes)} if notes else {})})

    def _adopt(self, entry: Entry) -> None:
        """A message made durable after its client had gone (no reply reached it): log it like any
        other, then let delivery take it. The client may send it again (a possible duplicate)."""
        self._received(entry, "client disconnected before the reply; delivered anyway")
        self.delivery.adopt(entry)

    # ------------------------------------------------------------------ DSNs

    async def notify_dead(self, entry: Entry, reason: str) -> None:
        """RFC 3464 DSN for a dead letter, to the sender and/or the admin, as configured."""
        dsn = self.settings.delivery.dsn
        if not (dsn.to_sender or dsn.admin):
            return
        # The email package's MIME classes, only once a message has died (rare): not at start.
        from relay.delivery.dsn import build_dsn, dsn_recipients, dsn_route, read_headers

        try:
            headers = await asyncio.to_thread(read_headers, self.spool.body_path(entry.id))
        except OSError:
            headers = b""
        # Off the event loop: the header block is whatever the client sent (up to 256 KiB).
        targets = await asyncio.to_thread(dsn_recipients, entry.envelope, headers, to_sender=dsn.to_sender,
                                          admin=dsn.admin)
        if not targets:
            return
        failed = dict(entry.recipients_failed) or {r: entry.last_reply or reason for r in entry.pending_recipients}
        route = dsn_route(entry.route)
        body = await asyncio.to_thread(
            build_dsn, reporting_host=self.settings.hostname or socket.getfqdn(), mailbox=route.mailbox,
                         original=entry.envelope, original_headers=headers, failed=failed, queue_id=entry.id,
                         arrival=entry.created_at, recipients=tuple(targets), reason=reason)
        try:
            envelope = Envelope(mail_from=route.sender, rcpt_tos=tuple(targets))
            notice = await asyncio.to_thread(self.spool.store, envelope, route, body, message_id="",
                                             client=f"dsn for {entry.id}")
        except SpoolError as exc:
            log.error("could not queue a DSN", extra={"event": "dsn_failed", "queue_id": entry.id, "error": str(exc)})
            return
        log.info("DSN queued", extra={"event": "dsn_queued", "queue_id": notice.id, "about": entry.id,
                                      "recipients": len(targets)})
        self.delivery.wake()

    # ------------------------------------------------------------------ hold probes

    async def probe(self, route: Route) -> Verdict:
        """Token + STARTTLS + AUTH for ``route.mailbox``, no message: does the admin's fix work yet?"""
        graph = self.submitter.graph_for(route.mailbox)
        if graph is not None:
            return await graph.probe(route)
        provider = self.tokens[route.app]
        stage = Stage.TOKEN
        try:
            await provider.evict()
            token = await provider.get()
            stage = Stage.CONNECT
            # A probe is a session like any other: it counts against the mailbox's connection limit.
            async with self.pool.slots(route.mailbox, self._connections_for(route.mailbox)):
                session = await self.pool.connect(provider.app, route.mailbox, token)
                self.pool.release(session)
        except TokenError as exc:
            return classify_exception(exc, Stage.TOKEN)
        except aiosmtplib.SMTPResponseException as exc:
            return classify_reply(exc.code, exc.message, Stage.AUTH)
        except (TimeoutError, aiosmtplib.SMTPException, OSError, ssl.SSLError) as exc:
            return classify_exception(exc, stage)
        return Verdict(action=Action.DELIVERED, reason="probe_ok", reply="235 2.7.0 Authentication successful",
                       scope=Scope.MAILBOX, retry_after=None, evict_token=False, hint="", code=235,
                       enhanced="2.7.0")

    def _fleet_state(self, connected: bool) -> None:
        """Redis went away: keep no more idle sessions than the fallback share. Back: mail waits no more."""
        if not connected and self.settings.fleet is not None:
            keep = self.settings.fleet.fallback.connections
            task = asyncio.ensure_future(self.pool.trim(keep))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        self.delivery.wake()

    # ------------------------------------------------------------------ readiness

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        holds = [{"scope": b.scope, "name": b.name, "reason": b.reason, "reply": b.reply, "hint": b.hint}
                 for b in self.delivery.held.holds()]
        # A paused app (its token endpoint or Exchange does not answer) moves no mail either.
        pauses = [{"scope": b.scope, "name": b.name, "reason": b.reason, "reply": b.reply, "hint": b.hint,
                   "seconds_left": round(b.until - self.clock(), 1)} for b in self.delivery.held.app_pauses()]
        listening = bool(self.servers) and all(s.is_serving() for s in self.servers)
        writable = self.spool.writable()
        ok = listening and writable and not holds and not pauses
        detail: dict[str, Any] = {"listening": listening, "spool_writable": writable, "holds": holds,
                                  "pauses": pauses}
        if self.fleet is not None:
            # Redis away does not make the relay unready: mail flows on the fallback share.
            detail["fleet"] = {"connected": self.fleet.link.connected, "instance": self.fleet.instance_id,
                               "limits": "shared" if self.fleet.link.connected else "fallback share"}
        return ok, detail

    def refresh_gauges(self) -> None:
        try:
            stats = self.spool.stats()
        except Exception:  # metrics must never take the relay down
            return
        for state, count in stats.counts.items():
            self.metrics.queue_depth.labels(str(state)).set(count)
        oldest = stats.oldest_created_at
        self.metrics.oldest_age.set(self.clock() - oldest if oldest else 0)
        for provider in self.tokens:
            if provider.current.value:
                self.metrics.token_expiry.labels(provider.app.name).set(provider.current.expires_at - self.clock())

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        for warning in load_warnings:
            log.warning(warning, extra={"event": "config_warning"})
        report = await asyncio.to_thread(self.spool.open)
        await asyncio.to_thread(self.spool.publish_holds, [])  # a crash may have left the last ones
        # Build the upstream TLS contexts now (loading a CA bundle is slow), not on the first delivery.
        for app in self.settings.apps:
            await asyncio.to_thread(tls_context_for, app)
        log.info("spool opened", extra={"event": "spool_opened", "path": str(self.settings.spool.path),
                                        "recovery": str(report)})
        if self.fleet is not None:
            # Bounded by fleet.deadline: without Redis the relay starts on its fallback share.
            await self.fleet.start([m.address for m in self.settings.mailboxes], [a.name for a in self.settings.apps])
        self._scheduler = asyncio.get_running_loop().create_task(self.delivery.run(), name="scheduler")
        try:
            tls = listener_tls(self.settings, self.config_path or "<config>")
        except ConfigError:
            await self.stop(grace=0)
            raise
        for listen in self.settings.listen:
            try:
                server = await start_listener(listen, self.listener_state, tls)
            except OSError as exc:
                error = ListenError(listen.address, _bind_problem(exc))
                await self._abort_start(error)
                raise error from None
            self.servers.append(server)
            port = server.sockets[0].getsockname()[1]
            self.ports.append(port)
            log.info("listening", extra={"event": "listening", "address": f"{listen.host}:{port}",
                                         "tls": str(listen.tls)})
        if self.settings.observability.http:
            host, port = parse_host_port(self.settings.observability.http, 9465)
            try:
                self.health = HealthServer(host, port, self.metrics, self.readiness, self.refresh_gauges)
            except OSError as exc:
                error = ListenError(self.settings.observability.http, _bind_problem(exc),
                                    "observability.http, the metrics and health endpoint")
                await self._abort_start(error)
                raise error from None
            self.health.start()
            log.info("health endpoint", extra={"event": "health_listening",
                                               "address": f"{host}:{self.health.port}"})
        sd_notify("READY=1\nSTATUS=accepting mail")
        self._watchdog = asyncio.get_running_loop().create_task(self._watchdog_loop(), name="watchdog")
        self._housekeeping = asyncio.get_running_loop().create_task(self._housekeeping_loop(), name="housekeeping")

    async def _abort_start(self, error: ListenError) -> None:
        """A listen socket could not be opened: undo what start() did (the spool lock above all)."""
        log.error(str(error), extra={"event": "listen_failed", "address": error.address})
        await self.stop(grace=0)

    async def _housekeeping_loop(self) -> None:
        """Close Exchange sessions idle longer than delivery.idle_close (fleet.idle_release with a
        fleet), QUIT, politely."""
        while True:
            idle = self.settings.delivery.idle_close
            if self.settings.fleet is not None:
                idle = min(idle, self.settings.fleet.idle_release)
            await asyncio.sleep(max(min(idle / 2, 30.0), 0.5))
            try:
                closed = await self.pool.close_idle(older_than=idle)
            except Exception as exc:  # housekeeping must never take the relay down
                log.warning("closing idle sessions failed: %s", type(exc).__name__,
                            extra={"event": "housekeeping_error"})
                continue
            if closed:
                log.debug("closed idle Exchange sessions", extra={"event": "sessions_closed", "count": closed})

    async def _watchdog_loop(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC")
        if not usec or not usec.isdigit():
            return
        interval = int(usec) / 1e6 / 2
        while True:
            await asyncio.sleep(interval)
            sd_notify("WATCHDOG=1")

    def listening_addresses(self) -> list[tuple[str, str]]:
        """(host, host:port) of every socket the listeners have bound (what takes mail right now)."""
        bound: list[tuple[str, str]] = []
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                bound.append((str(host), f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"))
        return bound

    async def reload(self, settings: Settings | None = None) -> None:
        """Apply new users, sender policy and limits without dropping connections or mail.

        Apps, mailboxes, listeners and the spool path need a restart; a change there is logged.
        The new file is judged against the listeners actually running (their sockets stay until a
        restart): one that would make them an open relay raises :class:`ReloadRefused`, and the
        running configuration stays, whole."""
        if settings is None:
            if self.config_path is None:
                return
            settings = await asyncio.to_thread(load_settings, self.config_path)
        problem = open_relay_problem(settings, self.listening_addresses())
        if problem is not None:
            key, text = problem
            self.metrics.reloads.labels("refused").inc()
            log.error("reload refused, the running configuration stays", extra={
                "event": "reload_refused", "key": key, "error": text})
            raise ReloadRefused(self.config_path or "<config>", key,
                                f"{text} (judged against the listeners running now: a change of listen "
                                "takes effect only after a restart)")
        restart_needed = [k for k in ("listen", "apps", "mailboxes", "spool", "tls", "fleet")
                          if getattr(settings, k) != getattr(self.settings, k)]
        state = self.listener_state
        state.settings = settings
        state.policy = Policy(settings)
        limits = settings.limits.auth_failures
        state.auth_limiter.max_failures, state.auth_limiter.window, state.auth_limiter.ban = (
            limits.max, limits.window, limits.ban)
        self.delivery.settings = settings
        self.settings = settings
        self.metrics.reloads.labels("applied").inc()
        log.info("configuration reloaded", extra={"event": "reloaded", "restart_needed_for": restart_needed})
        if restart_needed:
            log.warning("some changes take effect only after a restart",
                        extra={"event": "reload_partial", "sections": restart_needed})

    async def stop(self, grace: float = 10.0) -> None:
        sd_notify("STOPPING=1")
        for server in self.servers:
            server.close()
        for server in self.servers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), timeout=1.0)
        await self.delivery.stop(grace)
        if self._scheduler is not None:
            self._scheduler.cancel()
            # asyncio.wait, not await: a cancel of stop() itself must not be swallowed with the task's.
            await asyncio.wait({self._scheduler}, timeout=5)
        for task in (self._watchdog, self._housekeeping):
            if task is not None:
                task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.pool.close_idle(), timeout=5)
        if self.fleet is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.fleet.stop(), timeout=5)
        if self.health is not None:
            self.health.stop()
        if self.graph is not None:
            self.graph.close()
        self.tokens.close()
        await self.committer.close()
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self.spool.publish_holds, [])
        await asyncio.to_thread(self.spool.close)
        self._stopped.set()
        log.info("stopped", extra={"event": "stopped"})

    async def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT; SIGHUP reloads the configuration."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._safe_reload()))
        await self.start()
        try:
            await stop.wait()
        finally:
            log.info("stopping", extra={"event": "stopping"})
            grace = self.settings.delivery.stop_grace
            # Every step of stop() is bounded; this bounds the whole, whatever a library does, so that
            # systemctl stop and container stops end (the spool keeps what was not finished).
            try:
                await asyncio.wait_for(self.stop(grace=grace), timeout=grace + STOP_MARGIN)
            except TimeoutError:
                log.error("stop did not finish in time; exiting anyway (unfinished mail stays in the spool)",
                          extra={"event": "stop_timeout", "seconds": grace + STOP_MARGIN})

    async def _safe_reload(self) -> None:
        sd_notify("RELOADING=1")
        try:
            await self.reload()
        except ReloadRefused:
            pass  # logged and counted by reload()
        except ConfigError as exc:
            self.metrics.reloads.labels("invalid").inc()
            log.error("reload refused, the running configuration stays", extra={
                "event": "reload_failed", "error": str(exc)})
        finally:
            sd_notify("READY=1")

