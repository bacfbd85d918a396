"""Silent networks on loopback: servers that accept a connection and then never answer.

What blackholing firewalls and broken TLS-inspecting proxies do to the relay, reproduced for tests:

* :class:`Tarpit` accepts TCP on 127.0.0.1 and, by ``mode``:

  - ``"silent"``: reads whatever the client sends and never writes a byte (no TLS handshake, no
    HTTP answer, no SMTP greeting);
  - ``"tls-silent"``: completes the TLS handshake (with the simulated Microsoft 365's certificate)
    and then says nothing;
  - ``"forward"``: pipes the connection to ``target`` (the real simulated endpoint), so a test can
    switch a silent endpoint back to one that answers, on the same port.

* :class:`SilentProxy` is an HTTP ``CONNECT`` proxy (``apps[].proxy``) that, by ``mode``:

  - ``"silent"``: reads the ``CONNECT`` request and never answers it;
  - ``"blackhole"``: answers ``200 Connection established`` and then forwards nothing;
  - ``"forward"``: a working tunnel, to loopback targets only.

Mode changes apply to new connections; connections already held stay silent (as they would behind
a real blackhole). Everything runs in daemon threads; :meth:`stop` closes every socket it holds.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from types import TracebackType
from typing import Self

_LOOPBACK = {"localhost", "127.0.0.1", "::1", "[::1]"}


class Tarpit:
    """A TCP listener on 127.0.0.1 that accepts and then stays silent (or forwards; see the module)."""

    def __init__(self, *, mode: str = "silent", target: tuple[str, int] | None = None,
                 tls_context: ssl.SSLContext | None = None, port: int = 0) -> None:
        self.mode = mode
        self.target = target
        self.tls_context = tls_context
        self._port = port
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._lock = threading.Lock()
        self._held: set[socket.socket] = set()
        self._stopped = threading.Event()
        self.accepted = 0  # connections accepted so far (all modes)
        self.received = bytearray()  # what silent connections sent (bounded)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Self:
        listener = socket.create_server(("127.0.0.1", self._port), backlog=64)
        self._port = listener.getsockname()[1]
        listener.settimeout(0.1)  # the accept loop looks at _stopped this often
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"tarpit-{self._port}", daemon=True)
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Close the listening socket (the port is free when this returns) and every held connection."""
        self._stopped.set()
        if self._acceptor is not None:
            self._acceptor.join(timeout=5)
        with self._lock:
            held, self._held = set(self._held), set()
        for sock in held:
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    # -- connections ---------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        try:
            while not self._stopped.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                conn.settimeout(None)
                self._track(conn)
        finally:
            listener.close()

    def _track(self, conn: socket.socket) -> None:
        with self._lock:
            self.accepted += 1
            self._held.add(conn)
        threading.Thread(target=self._serve, args=(conn, self.mode), daemon=True).start()

    def _serve(self, conn: socket.socket, mode: str) -> None:
        try:
            self.handle(conn, mode)
        except OSError:
            pass
        finally:
            with self._lock:
                self._held.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def handle(self, conn: socket.socket, mode: str) -> None:
        if mode == "forward" and self.target is not None:
            self._pipe(conn, self.target)
        elif mode == "tls-silent" and self.tls_context is not None:
            tls = self.tls_context.wrap_socket(conn, server_side=True)
            with self._lock:
                self._held.add(tls)
            self._swallow(tls)
        else:
            self._swallow(conn)

    def _swallow(self, conn: socket.socket) -> None:
        """Read until the peer or :meth:`stop` closes the connection; never write."""
        while not self._stopped.is_set():
            ready, _, _ = select.select([conn], [], [], 0.2)
            if not ready:
                continue
            data = conn.recv(65536)
            if not data:
                return
            with self._lock:
                if len(self.received) < 65536:
                    self.received += data[: 65536 - len(self.received)]

    def _pipe(self, conn: socket.socket, target: tuple[str, int], preface: bytes = b"") -> None:
        """Both directions between ``conn`` and a new connection to ``target`` until either closes."""
        with socket.create_connection(target, timeout=10) as upstream:
            upstream.settimeout(None)
            with self._lock:
                self._held.add(upstream)
            if preface:
                conn.sendall(preface)
            peers = {conn: upstream, upstream: conn}
            while not self._stopped.is_set():
                ready, _, _ = select.select(list(peers), [], [], 0.2)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)


class SilentProxy(Tarpit):
    """An HTTP CONNECT proxy that accepts the tunnel request and then forwards nothing (see the module)."""

    def __init__(self, *, mode: str = "silent", port: int = 0) -> None:
        super().__init__(mode=mode, port=port)
        self.connects: list[str] = []  # the CONNECT targets asked for, in order

    def handle(self, conn: socket.socket, mode: str) -> None:
        request = b""
        conn.settimeout(10)
        while b"\r\n\r\n" not in request and len(request) < 8192:
            chunk = conn.recv(4096)
            if not chunk:
                return
            request += chunk
        conn.settimeout(None)
        first = request.split(b"\r\n", 1)[0].decode("latin-1")
        parts = first.split()
        if len(parts) != 3 or parts[0].upper() != "CONNECT":
            conn.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        with self._lock:
            self.connects.append(parts[1])
        if mode == "silent":
            self._swallow(conn)
            return
        if mode == "blackhole":
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self._swallow(conn)
            return
        host, _, port = parts[1].rpartition(":")
        if host.lower() not in _LOOPBACK or not port.isdigit():  # never a tunnel off this machine
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        self._pipe(conn, (host.strip("[]"), int(port)), b"HTTP/1.1 200 Connection established\r\n\r\n")


__all__ = ["SilentProxy", "Tarpit"]
