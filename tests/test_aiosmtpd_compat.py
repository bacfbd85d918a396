"""relay.intake.aiosmtpd_compat: the only module that touches aiosmtpd's private names.

These tests fail loudly when aiosmtpd is a release the module was not written for, when a private
name it relies on is gone or takes other parameters, and when a hook no longer reaches the relay
(checked on a real loopback connection).
"""

from __future__ import annotations

import asyncio
import inspect
import tomllib
from pathlib import Path
from typing import Any

import aiosmtpd
import pytest
from aiosmtpd.smtp import SMTP

from relay.intake.aiosmtpd_compat import INSTANCE_ATTRIBUTES, PRIVATE_METHODS, WRITTEN_FOR, CompatSMTP

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_installed_aiosmtpd_is_a_release_the_compat_module_was_written_for() -> None:
    assert aiosmtpd.__version__ in WRITTEN_FOR, (
        f"aiosmtpd {aiosmtpd.__version__} is installed, relay/intake/aiosmtpd_compat.py was written for "
        f"{', '.join(WRITTEN_FOR)}: check each name in PRIVATE_METHODS and INSTANCE_ATTRIBUTES against "
        "the new aiosmtpd/smtp.py, then add the version to WRITTEN_FOR and widen pyproject.toml")


def test_pyproject_bounds_aiosmtpd_to_the_written_for_releases() -> None:
    deps = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("aiosmtpd"))
    assert ",<" in spec, f"pyproject.toml: {spec!r} needs an upper bound (aiosmtpd_compat uses private names)"
    assert f">={min(WRITTEN_FOR)}" in spec


@pytest.mark.parametrize("name", sorted(PRIVATE_METHODS))
def test_private_method_exists_with_the_expected_parameters(name: str) -> None:
    method = getattr(SMTP, name, None)
    assert callable(method), f"aiosmtpd.smtp.SMTP.{name} is gone: relay/intake/aiosmtpd_compat.py must change"
    assert tuple(inspect.signature(method).parameters) == PRIVATE_METHODS[name], name


class _Recorder(CompatSMTP):
    """Records which public hooks aiosmtpd reached through the private names."""

    def __init__(self, seen: dict[str, asyncio.Event], handler: Any, **kwargs: Any) -> None:
        self.seen = seen
        super().__init__(handler, **kwargs)

    def _mark(self, hook: str) -> None:
        self.seen.setdefault(hook, asyncio.Event()).set()

    async def serve_client(self) -> None:
        self._mark("serve_client")
        if isinstance(self.stream_reader(), asyncio.StreamReader):
            self._mark("stream_reader")
        if self.offered_mechanisms():
            self._mark("offered_mechanisms")
        if not self.tls_started():
            self._mark("tls_started")
        await super().serve_client()

    def parse_address(self, arg: str) -> tuple[str | None, str | None]:
        self._mark("parse_address")
        return super().parse_address(arg)

    def transaction_reset(self) -> None:
        self._mark("transaction_reset")

    def idle_timeout(self) -> None:
        self._mark("idle_timeout")
        super().idle_timeout()


class _Handler:
    pass


async def test_hooks_reach_the_relay_on_a_real_connection() -> None:
    seen: dict[str, asyncio.Event] = {}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Recorder(seen, _Handler(), timeout=0.5), host="127.0.0.1", port=0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"220")
        for line in (b"EHLO client.example\r\n", b"MAIL FROM:<a@example.com>\r\n", b"RSET\r\n"):
            writer.write(line)
            reply = await asyncio.wait_for(reader.readline(), 5)
            while reply[3:4] == b"-":
                reply = await asyncio.wait_for(reader.readline(), 5)
            assert reply.startswith(b"250"), reply
        # Then stay silent: the idle timeout (0.5 s) must reach idle_timeout and close the connection.
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        for hook in ("serve_client", "stream_reader", "offered_mechanisms", "tls_started", "parse_address",
                     "transaction_reset", "idle_timeout"):
            await asyncio.wait_for(seen.setdefault(hook, asyncio.Event()).wait(), 5)
    finally:
        server.close()
        await server.wait_closed()


async def test_instance_attributes_exist_on_a_connected_protocol() -> None:
    holder: list[CompatSMTP] = []
    connected = asyncio.Event()

    class Probe(CompatSMTP):
        async def serve_client(self) -> None:
            holder.append(self)
            connected.set()
            await super().serve_client()

    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Probe(_Handler()), host="127.0.0.1", port=0)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        await asyncio.wait_for(connected.wait(), 5)
        missing = [name for name in INSTANCE_ATTRIBUTES if not hasattr(holder[0], name)]
        assert missing == [], f"aiosmtpd no longer sets {missing}: relay/intake/aiosmtpd_compat.py must change"
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


def test_no_other_relay_module_touches_those_private_names() -> None:
    """Of the modules that import aiosmtpd (the simulated Exchange in relay/testing is built on
    aiosmtpd too and is not part of the relay)."""
    import ast

    relay_dir = PYPROJECT.parent / "relay"
    private = set(PRIVATE_METHODS) | set(INSTANCE_ATTRIBUTES)
    found = []
    for path in sorted(relay_dir.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        if path.name == "aiosmtpd_compat.py" or "testing" in path.parts or "aiosmtpd" not in source:
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute):
                name = node.attr
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                name = node.name
            else:
                continue
            if name in private:
                found.append(f"{path.relative_to(relay_dir.parent)}:{node.lineno} {name}")
    assert found == [], "aiosmtpd private names outside relay/intake/aiosmtpd_compat.py: " + ", ".join(found)
