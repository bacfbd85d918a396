"""The latency proxy delays the path, not the server: pipelined requests share one round trip."""

from __future__ import annotations

import asyncio
import hashlib
import time

from relay.testing.latency import LatencyProxy

RTT = 0.2


async def _echo_server() -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(b"re: " + line)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def test_one_round_trip_per_flight_and_bytes_intact() -> None:
    server = await _echo_server()
    port = server.sockets[0].getsockname()[1]
    with LatencyProxy("127.0.0.1", port, RTT) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        # Warm up: the connection's own round trip is behind us.
        writer.write(b"hello\n")
        assert await asyncio.wait_for(reader.readline(), 5) == b"re: hello\n"

        started = time.monotonic()
        writer.write(b"one\n")
        assert await asyncio.wait_for(reader.readline(), 5) == b"re: one\n"
        single = time.monotonic() - started
        assert single >= RTT, "a request and its reply cost at least one round trip"

        started = time.monotonic()
        writer.write(b"".join(b"p%d\n" % i for i in range(5)))
        got = [await asyncio.wait_for(reader.readline(), 5) for _ in range(5)]
        flight = time.monotonic() - started
        assert got == [b"re: p%d\n" % i for i in range(5)]
        assert RTT <= flight < 3 * RTT, f"five pipelined requests took {flight:.3f}s: one round trip, not five"

        lines = [bytes((i + j) % 200 + 32 for j in range(999)) + b"\n" for i in range(2000)]  # 2 MB, many chunks
        writer.write(b"".join(lines))
        echoed = b"".join([await asyncio.wait_for(reader.readline(), 10) for _ in lines])
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(b"".join(b"re: " + x for x in lines)).digest()
        writer.close()
        assert proxy.connections == 1
    server.close()
    await server.wait_closed()
