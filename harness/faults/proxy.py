"""A fault-injecting TCP proxy for loopback tests and the soak.

``FaultProxy`` listens on a loopback port and forwards every connection to a
target port, byte for byte and in order, unless told otherwise:

- ``delay(ms, jitter_ms)``: every chunk read is held ``ms`` (plus a uniform
  ``0..jitter_ms`` drawn from the injected ``random.Random``) before it is
  written on; order is kept (a chunk never overtakes an earlier one).
- ``cut()``: a partition. Nothing moves in either direction and new
  connections are accepted but not forwarded (the TCP handshake succeeds,
  then silence), like a link that died without a FIN or RST. Nothing is
  dropped: bytes wait (bounded, then TCP backpressure) and flow again after
  ``resume()`` or ``heal()``, as TCP would retransmit them; endpoints whose heartbeats gave
  up meanwhile close their side, which the proxy passes on.
- ``reset()``: abort every open connection with a TCP RST on both sides.
- ``refuse(True)``: new connections are reset at once (a port that answers
  with RST) until ``refuse(False)``.
- ``limit(bytes_per_s)``: a slow line. Each direction of each connection
  carries at most that many bytes per second (paced in ``PACE_BYTES``
  pieces), as a branch office's uplink would; ``limit(None)`` lifts it.
- ``heal()``: no delay, no cut, no refusal, no limit.

Guarantees: the proxy never reorders, duplicates, corrupts or drops bytes of
a connection that stays open (faults are delays, stalls and whole-connection
aborts, which is what TCP can exhibit); memory is bounded by
``max_buffer_chunks`` chunks of at most ``CHUNK_BYTES`` per direction and
connection; every connection it opened is closed by ``stop()``. It only
listens on and connects to loopback addresses.

The proxy runs on an asyncio loop. ``ProxyHost`` runs that loop in a daemon
thread for synchronous callers (tests, the soak) and makes the calls
thread-safe: ``host.add(target_port)`` starts a proxy, ``host.call(fn)`` runs
``fn`` on the loop and returns its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

CHUNK_BYTES = 64 << 10
#: What a limited line sends at once: small enough that pacing is smooth.
PACE_BYTES = 4 << 10
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass
class ProxyCounters:
    """What a proxy saw and did (read on the proxy's loop, or after ``stop``)."""

    connections: int = 0
    bytes_up: int = 0  # client -> target
    bytes_down: int = 0  # target -> client
    resets: int = 0  # connections aborted by reset()
    refused: int = 0  # connections reset at once while refusing
    upstream_failures: int = 0  # the target did not accept the connection


class _Link:
    """One proxied connection: the client's and the target's transports."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.target: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        for writer in (self.client, self.target):
            if writer is not None:
                _rst(writer)
        for task in self.tasks:
            task.cancel()


def _rst(writer: asyncio.StreamWriter) -> None:
    """Abort with RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """A loopback TCP proxy to ``target_port`` with injectable faults (see the
    module docstring). Create and use it on one asyncio loop.

    Raises ValueError for a non-loopback host.
    """

    def __init__(
        self,
        target_port: int,
        *,
        target_host: str = "127.0.0.1",
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        rng: random.Random | None = None,
        max_buffer_chunks: int = 64,
        max_connections: int = 1024,
    ) -> None:
        for host in (target_host, listen_host):
            if host not in LOOPBACK:
                raise ValueError(f"FaultProxy only works on loopback, not {host!r}")
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self._listen_port = listen_port
        self._rng = rng or random.Random(0)
        self._max_chunks = max_buffer_chunks
        self._max_connections = max_connections
        self.counters = ProxyCounters()
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._delay_ms = 0.0
        self._jitter_ms = 0.0
        self._refusing = False
        self._rate: float | None = None

    # -- lifecycle ---------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port listened on. Raises RuntimeError before ``start``."""
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        return int(next(iter(self._server.sockets)).getsockname()[1])

    async def start(self) -> None:
        """Listen. Raises OSError when the port cannot be bound."""
        self._server = await asyncio.start_server(
            self._accept, self.listen_host, self._listen_port, reuse_address=True
        )

    async def stop(self) -> None:
        """Stop listening and abort every connection. Idempotent."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for link in list(self._links):
            link.abort()
        self._links.clear()

    # -- faults ------------------------------------------------------------------

    def delay(self, ms: float, jitter_ms: float = 0.0) -> None:
        """Hold every chunk ``ms`` + uniform(0, ``jitter_ms``) before writing it on."""
        if ms < 0 or jitter_ms < 0:
            raise ValueError("delay and jitter must be >= 0")
        self._delay_ms, self._jitter_ms = ms, jitter_ms

    def cut(self) -> None:
        """Stall every connection (no bytes move, none are lost) until ``heal``."""
        self._flowing.clear()

    def resume(self) -> None:
        """End a ``cut``: bytes waiting flow again, in order."""
        self._flowing.set()

    def reset(self) -> int:
        """Abort every open connection with an RST; returns how many."""
        links = list(self._links)
        for link in links:
            link.abort()
        self._links.clear()
        self.counters.resets += len(links)
        return len(links)

    def refuse(self, on: bool = True) -> None:
        """While on, new connections are reset as soon as they are accepted."""
        self._refusing = on

    def limit(self, bytes_per_s: float | None) -> None:
        """Carry at most ``bytes_per_s`` per direction and connection (None:
        no limit). Raises ValueError for a rate that is not positive."""
        if bytes_per_s is not None and bytes_per_s <= 0:
            raise ValueError("a line's rate must be > 0 bytes per second")
        self._rate = bytes_per_s

    def heal(self) -> None:
        """Forward normally again: no delay, no cut, no refusal, no limit."""
        self._delay_ms = self._jitter_ms = 0.0
        self._refusing = False
        self._rate = None
        self._flowing.set()

    @property
    def open_connections(self) -> int:
        return len(self._links)

    # -- forwarding --------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counters.connections += 1
        if self._refusing or len(self._links) >= self._max_connections:
            self.counters.refused += 1
            _rst(writer)
            return
        link = _Link(writer)
        self._links.add(link)
        try:
            # A new connection during a cut: the handshake succeeded, nothing else.
            await self._flowing.wait()
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                self.counters.upstream_failures += 1
                _rst(writer)  # like a refused port, seen through the proxy
                return
            link.target = up_writer
            if link not in self._links:  # reset while connecting
                link.abort()
                return
            link.tasks = [
                asyncio.ensure_future(self._pipe(reader, up_writer, up=True)),
                asyncio.ensure_future(self._pipe(up_reader, writer, up=False)),
            ]
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            self._links.discard(link)
            for w in (writer, link.target):
                if w is not None:
                    with contextlib.suppress(Exception):
                        w.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        """Copy one direction through a bounded queue of (due time, chunk);
        None marks the end of the stream."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(self._max_chunks)
        sender = asyncio.ensure_future(self._send(queue, writer, up=up))
        try:
            while True:
                await self._flowing.wait()
                try:
                    data = await reader.read(CHUNK_BYTES)
                except (ConnectionError, OSError):
                    data = b""
                if not data:
                    break
                due = time.monotonic() + self._lag()
                await queue.put((due, data))
            await queue.put(None)
            await sender
        finally:
            sender.cancel()

    def _lag(self) -> float:
        if not self._delay_ms and not self._jitter_ms:
            return 0.0
        return (self._delay_ms + self._rng.uniform(0, self._jitter_ms)) / 1000

    async def _send(
        self,
        queue: asyncio.Queue[tuple[float, bytes] | None],
        writer: asyncio.StreamWriter,
        *,
        up: bool,
    ) -> None:
        line_free = 0.0  # when a limited line has sent what it was given
        try:
            while True:
                item = await queue.get()
                if item is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                rate = self._rate
                step = PACE_BYTES if rate else len(data)
                for i in range(0, len(data), step):
                    piece = data[i : i + step]
                    if rate:
                        line_free = max(line_free, time.monotonic()) + len(piece) / rate
                        wait = line_free - time.monotonic()
                        if wait > 0:
                            await asyncio.sleep(wait)
                    await self._flowing.wait()
                    writer.write(piece)
                    await writer.drain()
                    if up:
                        self.counters.bytes_up += len(piece)
                    else:
                        self.counters.bytes_down += len(piece)
        except (ConnectionError, OSError):
            return


class ProxyHost:
    """Runs ``FaultProxy`` instances on an asyncio loop in a daemon thread.

    ``add`` and ``call`` block until the loop has done the work (at most
    ``timeout`` seconds, else TimeoutError). ``close`` stops every proxy and
    the thread.
    """

    def __init__(self, rng: random.Random | None = None, timeout: float = 10.0) -> None:
        self._rng = rng or random.Random(0)
        self._timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fault-proxies", daemon=True
        )
        self._thread.start()
        self.proxies: list[FaultProxy] = []

    def add(self, target_port: int, listen_port: int = 0) -> FaultProxy:
        """Start a proxy to ``target_port`` (on ``listen_port``, 0 = any free one)."""

        async def make() -> FaultProxy:
            proxy = FaultProxy(
                target_port,
                listen_port=listen_port,
                rng=random.Random(self._rng.getrandbits(64)),
            )
            await proxy.start()
            return proxy

        proxy = asyncio.run_coroutine_threadsafe(make(), self._loop).result(self._timeout)
        self.proxies.append(proxy)
        return proxy

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the proxies' loop and return its result."""

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(self._timeout)

    def close(self) -> None:
        """Stop every proxy and the loop's thread. Idempotent."""
        if not self._loop.is_running():
            return

        async def stop_all() -> None:
            for proxy in self.proxies:
                await proxy.stop()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop_all(), self._loop).result(self._timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self._timeout)
        self._loop.close()

    def __enter__(self) -> ProxyHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
