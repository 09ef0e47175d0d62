"""The loopback fault proxy of harness.faults: bytes go through whole and in
order, and a limited line is never faster than its rate."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import pytest

from harness.faults.proxy import FaultProxy


async def _echo_through(
    setup: Callable[[FaultProxy], None], payload: bytes
) -> tuple[bytes, float, FaultProxy]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = FaultProxy(port)
    setup(proxy)
    await proxy.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        started = time.monotonic()
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(-1), 30)
        took = time.monotonic() - started
        writer.close()
        return got, took, proxy
    finally:
        await proxy.stop()
        server.close()


def test_a_limited_line_carries_everything_in_order_and_no_faster_than_its_rate() -> None:
    payload = os.urandom(200_000)
    rate = 1_000_000  # bytes per second, each way
    got, took, proxy = asyncio.run(_echo_through(lambda p: p.limit(rate), payload))
    assert got == payload
    assert proxy.counters.bytes_up == proxy.counters.bytes_down == len(payload)
    # Up and back down through one line each way; the pieces overlap, so the
    # floor is one direction's time (a lower bound, whatever the load).
    assert took >= len(payload) / rate * 0.95


def test_a_line_without_limit_after_heal() -> None:
    payload = os.urandom(50_000)

    def setup(p: FaultProxy) -> None:
        p.limit(10)  # would take hours
        p.heal()

    got, _, _ = asyncio.run(_echo_through(setup, payload))
    assert got == payload


@pytest.mark.parametrize("rate", [0, -5])
def test_a_line_rate_must_be_positive(rate: float) -> None:
    with pytest.raises(ValueError, match="rate must be > 0"):
        FaultProxy(1).limit(rate)
