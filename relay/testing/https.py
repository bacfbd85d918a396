"""The HTTPS server the simulated Entra ID and Graph endpoints share.

ThreadingHTTPServer that does the TLS handshake in the handler thread: wrapping the listening socket
would run handshakes in the accept loop, where one silent client could stall everyone.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("relay.testing.https")


class TLSHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], context: ssl.SSLContext,
                 *, name: str, timeout: float = 10.0) -> None:
        self.tls_context = context
        self.name = name
        self.request_timeout = timeout
        super().__init__(address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        assert isinstance(request, socket.socket)
        request.settimeout(self.request_timeout)
        try:
            tls = self.tls_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.debug("%s: TLS handshake with %s failed: %s", self.name, client_address, exc)
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)  # type: ignore[arg-type]
        finally:
            tls.close()


class ServerThread:
    """Runs one TLSHTTPServer in a daemon thread on 127.0.0.1: an ephemeral port the first time, the
    same port after a restart (``stop`` + ``start`` simulates an endpoint that is down, then back)."""

    def __init__(self, name: str, make_server: Callable[[int], TLSHTTPServer]) -> None:
        self.name = name
        self._make_server = make_server
        self._lock = threading.Lock()
        self._server: TLSHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        with self._lock:
            if self._server is not None:
                return
            server = self._make_server(self.port)
            self.port = server.server_address[1]
            self._server = server
            self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                            name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Close the listening socket: new connections are refused until :meth:`start`."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)
