"""Relay fan-out workload shared by every compared system (issue 7).

N node connections each write single-record updates (one update per
websocket message) with at most ``window`` of their own updates unconfirmed,
and each receives every other node's updates. The same load generator drives
every system; only the wire format differs:

- ``branchline``: docs/protocol.md ``update`` frames with a ref; confirmed by
  the relay's ``ack`` (sent after the durable commit); the relay never echoes
  an update to its sender.
- ``y``: the y-protocol sync ``update`` message (``[0, 2, len, update]``) that
  y-websocket and pycrdt-websocket speak; these servers broadcast every update
  to all the room's connections, the sender included, and have no ack, so a
  node's own update coming back is its confirmation (the server has applied
  and broadcast it; nothing says it is stored).

Updates are built before the clock starts: node ``k``'s ``i``-th update sets
map key ``n{k:03d}u{i:06d}`` to a 10-field record as JSON (Yjs client id fixed
per node). Receivers find the keys in the received bytes (the key text is in
every Yjs encoding of the update), so they need not decode Yjs and leave the
CPU to the server. Connections are spread over ``PROCESSES`` client
processes (fork); CLOCK_MONOTONIC is shared, so write->delivery latency is
the receiver's clock minus the sender's.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import random
import re
import time
from array import array
from dataclasses import dataclass
from typing import Any

import orjson
from pycrdt import Doc, Map
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from engine.protocol import Limits, decode_frame, encode_message
from engine.protocol.messages import Update
from engine.protocol.session import encode_batch, pack_updates

from .stats import latency_summary
from .workload import record

KEY = re.compile(rb"n(\d{3})u(\d{6})")
PROCESSES = 2
PING_EVERY_S = 1.0
DOC = "customers"  # Branchline document the updates go to
ROOM = "bench"  # y room (websocket path)


@dataclass(frozen=True)
class Load:
    nodes: int
    per_node: int
    window: int
    batch: int  # updates per Branchline frame (1: one per message, as y clients send)
    send_for_s: float  # no new update is sent after this long (the run may end earlier)
    drain_s: float  # then wait at most this long with nothing arriving


def build_updates(node: int, n: int) -> list[bytes]:
    """Single-record updates of node ``N{node}``: entries of its own (root
    ``r``, key ``record|N{node}``), so the relay's authorship check runs."""
    doc: Doc[Any] = Doc(client_id=5000 + node)
    m: Map[Any] = doc.get("r", type=Map)
    rng = random.Random(node)
    out: list[bytes] = []
    for i in range(n):
        fields = {k: str(v) for k, v in record(node * 1_000_000 + i, rng).items()}
        before = doc.get_state()
        m[f"n{node:03d}u{i:06d}|N{node}"] = orjson.dumps(fields).decode()
        out.append(doc.get_update(before))
    return out


def _varuint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def y_update_message(update: bytes) -> bytes:
    """y-protocol: messageSync (0), syncUpdate (2), varUint8Array(update)."""
    return b"\x00\x02" + _varuint(len(update)) + update


def frames_for(kind: str, node: int, n: int, batch: int = 1) -> list[tuple[bytes, int]]:
    """(frame, updates in it): one update per message, or for Branchline with
    ``batch`` > 1, ``updates`` frames of ``batch`` updates (how a node ships
    its outbox when it has several pending)."""
    updates = build_updates(node, n)
    if kind == "y":
        return [(y_update_message(u), 1) for u in updates]
    max_frame = Limits().max_frame
    if batch == 1:
        return [
            (encode_message(Update(DOC, u, i + 1), max_frame=max_frame), 1)
            for i, u in enumerate(updates)
        ]
    out = []
    for first in range(0, n, batch):
        items = [(DOC, updates[i], i + 1) for i in range(first, min(n, first + batch))]
        (group,) = list(pack_updates(items, max_frame))
        out.append((encode_batch(group, max_frame), len(items)))
    return out


@dataclass
class _NodeRun:
    node: int
    sent_at: array  # type: ignore[type-arg]
    recv_at: array  # type: ignore[type-arg]
    sent: int = 0
    confirmed: int = 0
    got: int = 0
    duplicates: int = 0
    last_confirm: float = 0.0
    last_recv: float = 0.0
    error: str = ""


async def _open(kind: str, url: str, node: int, token: str | None) -> ClientConnection:
    if kind == "branchline":
        from .sync import open_client

        assert token is not None
        ws, _session = await open_client(url, f"N{node}", token)
        return ws
    return await connect(
        url + ROOM, max_size=None, compression=None, ping_interval=None, open_timeout=60
    )


async def _run_node(
    kind: str,
    ws: ClientConnection,
    run: _NodeRun,
    frames: list[tuple[bytes, int]],
    load: Load,
    t0: float,
) -> None:
    per, me, window = load.per_node, run.node, load.window
    expected = (load.nodes - 1) * per
    space = asyncio.Event()
    done = asyncio.Event()
    ping = encode_message_ping() if kind == "branchline" else b""
    pong = encode_message_pong() if kind == "branchline" else b""
    max_frame = Limits().max_frame

    async def reader() -> None:
        try:
            async for msg in ws:
                now = time.monotonic()
                if not isinstance(msg, bytes):
                    continue
                found = False
                for m in KEY.finditer(msg):
                    found = True
                    j, i = int(m[1]), int(m[2])
                    if j == me:
                        run.confirmed += 1
                        run.last_confirm = now
                        space.set()
                    else:
                        idx = j * per + i
                        if run.recv_at[idx] == 0.0:
                            run.recv_at[idx] = now
                            run.got += 1
                            run.last_recv = now
                        else:
                            run.duplicates += 1
                if not found and kind == "branchline":
                    header, _ = decode_frame(msg, max_frame=max_frame)
                    t = header["t"]
                    if t == "ack":
                        run.confirmed += len(header["refs"])
                        run.last_confirm = now
                        space.set()
                    elif t == "ping":
                        await ws.send(pong)
                    elif t == "error":
                        run.error = f"{header.get('code')}: {header.get('message')}"
                        break
                if run.got >= expected and run.confirmed >= per:
                    done.set()
        except ConnectionClosed as exc:
            run.error = run.error or f"connection closed: {exc}"
        done.set()

    async def pinger() -> None:
        while not done.is_set():
            await asyncio.sleep(PING_EVERY_S)
            try:
                await ws.send(ping)
            except ConnectionClosed:
                return

    tasks = [asyncio.create_task(reader())]
    if kind == "branchline":
        tasks.append(asyncio.create_task(pinger()))
    stop_sending = t0 + load.send_for_s
    next_frame = 0
    try:
        while next_frame < len(frames) and not done.is_set():
            now = time.monotonic()
            if now > stop_sending:
                break
            frame, count = frames[next_frame]
            if run.sent - run.confirmed + count <= window:
                await ws.send(frame)
                for i in range(run.sent, run.sent + count):
                    run.sent_at[i] = now
                run.sent += count
                next_frame += 1
            else:
                space.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(space.wait(), 1.0)
        # Wait for the rest to arrive: until complete, or nothing new for drain_s.
        while not done.is_set():
            before = (run.got, run.confirmed)
            try:
                await asyncio.wait_for(done.wait(), load.drain_s)
            except TimeoutError:
                if (run.got, run.confirmed) == before:
                    break
    except ConnectionClosed as exc:
        run.error = run.error or f"connection closed: {exc}"
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await ws.close()


def encode_message_ping() -> bytes:
    from engine.protocol.messages import Ping

    return encode_message(Ping(), max_frame=Limits().max_frame)


def encode_message_pong() -> bytes:
    from engine.protocol.messages import Pong

    return encode_message(Pong(), max_frame=Limits().max_frame)


def _client_process(
    kind: str,
    url: str,
    nodes: list[int],
    tokens: dict[int, str],
    load: Load,
    ready: Any,
    start_at: Any,
    out: Any,
) -> None:
    frames = {k: frames_for(kind, k, load.per_node, load.batch) for k in nodes}
    size = load.nodes * load.per_node

    async def main() -> dict[str, Any]:
        conns = []
        for k in nodes:  # one by one: a burst of 200 handshakes is not the workload
            conns.append(await _open(kind, url, k, tokens.get(k)))
        ready.put(len(conns))
        while start_at.value == 0.0:
            await asyncio.sleep(0.005)
        t0 = start_at.value
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        runs = [
            _NodeRun(k, array("d", bytes(8 * load.per_node)), array("d", bytes(8 * size)))
            for k in nodes
        ]
        cpu0 = time.process_time()
        await asyncio.gather(
            *[
                _run_node(kind, ws, r, frames[r.node], load, t0)
                for ws, r in zip(conns, runs, strict=True)
            ]
        )
        return {
            "cpu_s": time.process_time() - cpu0,
            "runs": [
                {
                    "node": r.node,
                    "sent_at": r.sent_at.tobytes(),
                    "recv_at": r.recv_at.tobytes(),
                    "sent": r.sent,
                    "confirmed": r.confirmed,
                    "got": r.got,
                    "duplicates": r.duplicates,
                    "last_confirm": r.last_confirm,
                    "last_recv": r.last_recv,
                    "error": r.error,
                }
                for r in runs
            ],
        }

    try:
        out.put(asyncio.run(main()))
    except BaseException as exc:  # the parent reports it instead of waiting forever
        out.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


def run_load(
    kind: str, url: str, load: Load, tokens: dict[int, str] | None = None
) -> dict[str, Any]:
    """Drive ``load.nodes`` connections against a server already listening at
    ``url``; returns rates, latency and per-process CPU seconds."""
    ctx = mp.get_context("fork")
    ready, out = ctx.Queue(), ctx.Queue()
    start_at = ctx.Value("d", 0.0)
    groups = [list(range(load.nodes))[p::PROCESSES] for p in range(PROCESSES)]
    groups = [g for g in groups if g]
    procs = [
        ctx.Process(
            target=_client_process,
            args=(kind, url, g, tokens or {}, load, ready, start_at, out),
            daemon=True,
        )
        for g in groups
    ]
    for p in procs:
        p.start()
    timeout = 120 + load.send_for_s + 3 * load.drain_s
    connected = 0
    try:
        for _ in procs:
            connected += ready.get(timeout=timeout)
        t0 = time.monotonic() + 0.1
        start_at.value = t0
        results = [out.get(timeout=timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"load generator failed: {errors[0]}")
    return summarize(load, t0, results)


def summarize(load: Load, t0: float, results: list[dict[str, Any]]) -> dict[str, Any]:
    per = load.per_node
    runs = [r for res in results for r in res["runs"]]
    sent_at = array("d", bytes(8 * load.nodes * per))
    sent = confirmed = got = dups = 0
    last_confirm = last_recv = t0
    errors = sorted({r["error"] for r in runs if r["error"]})
    for r in runs:
        k = r["node"]
        sent_at[k * per : (k + 1) * per] = array("d", r["sent_at"])
        sent += r["sent"]
        confirmed += r["confirmed"]
        got += r["got"]
        dups += r["duplicates"]
        last_confirm = max(last_confirm, r["last_confirm"])
        last_recv = max(last_recv, r["last_recv"])
    lat: list[float] = []
    for r in runs:
        recv = array("d", r["recv_at"])
        me = r["node"]
        for idx, at in enumerate(recv):
            if at and idx // per != me:
                lat.append(at - sent_at[idx])
    expected = sent * (load.nodes - 1)
    in_s = max(last_confirm - t0, 1e-9)
    out_s = max(last_recv - t0, 1e-9)
    return {
        "nodes": load.nodes,
        "per_node": per,
        "window": load.window,
        "sent": sent,
        "confirmed": confirmed,
        "in_seconds": in_s,
        "in_per_s": confirmed / in_s,
        "delivered": got,
        "delivered_expected": expected,
        "delivered_fraction": got / expected if expected else 0.0,
        "duplicates": dups,
        "out_seconds": out_s,
        "delivered_per_s": got / out_s,
        "latency": latency_summary(lat, over_ms=100) if lat else {},
        "client_cpu_s": [res["cpu_s"] for res in results],
        "errors": errors[:5],
        "connections_with_errors": sum(1 for r in runs if r["error"]),
    }
