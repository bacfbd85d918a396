"""Streaming DATA from the spool file sends exactly what aiosmtplib's data() would send."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiosmtplib import SMTPResponse
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given, settings
from hypothesis import strategies as st

import relay.microsoft.smtp_transaction as upstream


class _Protocol:
    def __init__(self) -> None:
        self.sent = bytearray()

    def write(self, data: bytes) -> None:
        self.sent += data

    async def read_response(self, timeout: float | None = None) -> SMTPResponse:
        return SMTPResponse(250, "2.0.0 OK")


class _Smtp:
    def __init__(self) -> None:
        self.protocol = _Protocol()

    async def execute_command(self, *args: Any, timeout: float | None = None) -> SMTPResponse:
        assert args == (b"DATA",)
        return SMTPResponse(354, "go ahead")


def expected_wire(body: bytes) -> bytes:
    """What aiosmtplib's own execute_data_command writes after DATA."""
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(body)) + b".\r\n"


def streamed(body: bytes, tmp: Path, chunk: int) -> bytes:
    path = tmp / "body"
    path.write_bytes(body)
    smtp = _Smtp()
    old = upstream.STREAM_CHUNK
    upstream.STREAM_CHUNK = chunk
    try:
        asyncio.run(upstream.stream_data(smtp, path, 5))  # type: ignore[arg-type]
    finally:
        upstream.STREAM_CHUNK = old
    return bytes(smtp.protocol.sent)


_pieces = st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"a", b"\r\n.", b"\n.\n", b"\r.\r\n", b"xyz", b" "])


@settings(max_examples=300, deadline=None)
@given(body=st.lists(_pieces, max_size=60).map(b"".join), chunk=st.integers(min_value=1, max_value=9))
def test_stream_matches_aiosmtplib(body: bytes, chunk: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("s")
    assert streamed(body, tmp, chunk) == expected_wire(body)
    assert from_memory(body) == expected_wire(body), "a small body sent from memory: the same bytes"


def from_memory(body: bytes) -> bytes:
    smtp = _Smtp()
    asyncio.run(upstream.stream_data(smtp, body, 5))  # type: ignore[arg-type]
    return bytes(smtp.protocol.sent)


def test_stream_large_message_in_chunks(tmp_path: Path) -> None:
    body = (b"line one\r\n.leading dot\r\n" + b"x" * 5000 + b"\r\n") * 200
    assert streamed(body, tmp_path, 4096) == expected_wire(body)
