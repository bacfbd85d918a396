"""A network round trip on loopback: a TCP proxy that delays every chunk by half the RTT each way.

Exchange Online is tens of milliseconds away; on loopback it is not. A delay inside the simulated
server (before each reply) would not do: it would serialise pipelined commands and hide what a
client gains by sending several at once. This proxy delays the bytes on the path instead: every
chunk read from one side is written to the other ``rtt / 2`` seconds after it was read, in order, so
a command and its reply cost one RTT however many commands travel together. TLS passes through
untouched (the proxy never looks inside the bytes).

It runs its own event loop in a daemon thread, like the simulators: synchronous code (a benchmark, a
test) and asyncio code use it alike. Bandwidth is not limited; the delay is what it emulates.
"""

from __future__ import annotations

import asyncio
import contextlib

from relay.testing.loop_thread import LoopThread

__all__ = ["LatencyProxy"]

_CHUNK = 64 * 1024


class LatencyProxy:
    """``127.0.0.1:<port>`` -> ``target_host:target_port`` with ``rtt`` seconds of round trip."""

    def __init__(self, target_host: str, target_port: int, rtt: float) -> None:
        if rtt < 0:
            raise ValueError("rtt must be >= 0 seconds")
        self.target_host = target_host
        self.target_port = target_port
        self.rtt = rtt
        self.connections = 0
        self._runner = LoopThread("latency-proxy")
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._port = 0

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> LatencyProxy:
        if self._runner.running:
            return self
        self._runner.start()
        self._server = self._runner.call(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self._runner.stop(self._shutdown)
        self._server = None

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            try:
                server_reader, server_writer = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError:
                client_writer.close()
                return
            # The connection itself takes a round trip (SYN, SYN-ACK) before the first byte can go.
            await asyncio.sleep(self.rtt)
            try:
                # Each direction ends with a half close; the connection ends when both have.
                await asyncio.gather(self._pump(client_reader, server_writer),
                                     self._pump(server_reader, client_writer))
            finally:
                server_writer.close()
        except asyncio.CancelledError:
            pass  # the proxy stops: this connection ends with it
        finally:
            self._tasks.discard(task)
            client_writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction: each chunk written half an RTT after it was read, order kept."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        half = self.rtt / 2

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)  # the emulated wire, not a synchronisation
                if not data:
                    with contextlib.suppress(OSError):
                        if writer.can_write_eof():
                            writer.write_eof()
                    return
                try:
                    writer.write(data)
                    await writer.drain()
                except OSError:
                    return

        sender = asyncio.create_task(deliver())
        try:
            while True:
                try:
                    data = await reader.read(_CHUNK)
                except OSError:
                    data = b""
                queue.put_nowait((loop.time() + half, data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()
