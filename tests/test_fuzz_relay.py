"""A real relay process fed 100,000 hostile frames from several connections
at once keeps serving well-behaved nodes.

Four hostile clients (enrolled nodes, so they get past the hello) send, as
fast as the relay takes them, a seeded mix of frames: pings, junk and
repeated Yjs updates, sync requests, and now and then a fatal one (random
bytes, a mutated frame, a text frame, a chunk out of order, a garbage state
vector, an unknown document, a frame before the handshake). A connection the
relay ends is opened again until 100,000 frames went out. Meanwhile two
``branchline node run`` processes write and sync. Then: both nodes hold the
same records including every write; the hostile connections were refused
with error frames and closed; the relay answers /healthz.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pycrdt import Doc, Map
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from engine.node import Node
from engine.protocol import ClientSession, ErrorReceived, Opened, encode_message
from engine.protocol.messages import Ping, Sync1, Update
from engine.relay import SqliteRelayStore
from harness.net import free_port as _free_port
from harness.soak.checks import records_digest

# The suite sends 10,000 hostile frames (about a minute here); the issue's
# 100,000 take several minutes on 2 cores: BRANCHLINE_FUZZ_FRAMES=100000
# (docs/reliability.md has the latest such run).
FRAMES = int(os.environ.get("BRANCHLINE_FUZZ_FRAMES", "10000"))
HOSTILE = 4
SEED = int(os.environ.get("BRANCHLINE_FUZZ_SEED", "20261123"))
EXE = str(Path(sys.executable).parent / "branchline")

if os.environ.get("BRANCHLINE_SKIP_LIVE"):  # pragma: no cover - opt-out on slow CI
    pytestmark = pytest.mark.skip("BRANCHLINE_SKIP_LIVE set")


def _junk_updates(rng: random.Random, n: int) -> list[bytes]:
    """Valid Yjs updates of entries no merge accepts (not JSON objects)."""
    doc: Doc[Any] = Doc(client_id=rng.getrandbits(40) + 1)
    entries = doc.get("r", type=Map)
    out = []
    for i in range(n):
        before = doc.get_state()
        entries[f"junk{i % 7}|H"] = rng.choice(["x", "[1,2]", "{", "null", "9" * 50])
        out.append(doc.get_update(before))
    return out


def _fatal(rng: random.Random, valid: bytes) -> bytes | str:
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 64))
    if kind == 1:
        data = bytearray(valid)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    if kind == 2:
        return "text frames are refused"
    if kind == 3:
        return encode_message(Sync1("customers", b"\xff\xff\xff"), max_frame=1 << 20)
    if kind == 4:
        return encode_message(Update("no such doc!", b"\x00\x00", 1), max_frame=1 << 20)
    # A chunk that is not the first of its transfer.
    header = b'{"t":"chunk","id":1,"i":3,"n":5}'
    return len(header).to_bytes(4, "big") + header + b"abc"


class Hostile:
    """One hostile node: reconnects and sends until the shared quota is spent."""

    def __init__(self, url: str, node: str, token: str, rng: random.Random) -> None:
        self.url, self.node, self.token, self.rng = url, node, token, rng
        self.junk = _junk_updates(rng, 64)
        self.sent = 0
        self.connections = 0
        self.errors: Counter[str] = Counter()
        self.closed_by_relay = 0

    def frame(self, ref: int) -> bytes | str:
        r = self.rng.random()
        if r < 0.65:
            return encode_message(Ping(), max_frame=1 << 20)
        if r < 0.85:
            update = self.rng.choice(self.junk)
            return encode_message(Update("customers", update, ref), max_frame=1 << 20)
        if r < 0.997:
            return encode_message(Sync1("items", b"\x00"), max_frame=1 << 20)
        return _fatal(self.rng, encode_message(Ping(), max_frame=1 << 20))

    async def run(self, quota: list[int]) -> None:
        while quota[0] > 0:
            self.connections += 1
            try:
                async with connect(self.url, max_size=None, compression=None) as ws:
                    session = ClientSession(dataset="acme", node=self.node, token=self.token)
                    for f in session.data_to_send():
                        await ws.send(f)
                    if self.rng.random() < 0.02:  # talk before the handshake ends
                        await ws.send(encode_message(Ping(), max_frame=1 << 20))
                    opened = False
                    while not opened:
                        events = session.receive_frame(await ws.recv())
                        for ev in events:
                            if isinstance(ev, ErrorReceived):
                                self.errors[ev.code] += 1
                                raise ConnectionClosed(None, None)
                            opened = opened or isinstance(ev, Opened)
                    reader = asyncio.create_task(self._read(ws, session))
                    ref = 0
                    try:
                        while quota[0] > 0:
                            ref += 1
                            await ws.send(self.frame(ref))
                            self.sent += 1
                            quota[0] -= 1
                            if ref % 32 == 0:
                                # send() does not yield while the socket
                                # takes data: let the loop read the relay.
                                await asyncio.sleep(0)
                    finally:
                        await asyncio.wait_for(asyncio.shield(reader), 30)
            except (ConnectionClosed, InvalidHandshake, OSError, TimeoutError):
                self.closed_by_relay += 1

    async def _read(self, ws: Any, session: ClientSession) -> None:
        try:
            async for message in ws:
                if isinstance(message, bytes) and message[4:20].find(b'"error"') >= 0:
                    header = message[4 : 4 + int.from_bytes(message[:4], "big")]
                    import orjson

                    self.errors[str(orjson.loads(header)["code"])] += 1
        except ConnectionClosed:
            pass


# Three valid Yjs updates (minimized from this test's first failing run) that
# make yrs 0.28 panic in MapEvent.keys while a RecordDoc observes its Map.
# pyo3's PanicException is a BaseException: it escaped import_updates and
# killed `branchline node run`. RecordDoc.apply now turns it into UpdateError
# (the update is refused, the node drops the half-changed document and goes on).
PANIC_UPDATES = [
    bytes.fromhex(
        "010187b39bbceb1c24a887b39bbceb1c1d0177323939393939393939393939393939393939393939"
        "3939393939393939393939393939393939393939393939393939393939390187b39bbceb1c01001e"
    ),
    bytes.fromhex(
        "010187b39bbceb1c0528010172076a756e6b357c4801773239393939393939393939393939393939"
        "3939393939393939393939393939393939393939393939393939393939393939393900"
    ),
    bytes.fromhex("01018497abc3ef070528010172076a756e6b357c480177017b00"),
]


def test_updates_that_make_yrs_panic_are_refused_not_fatal(tmp_path: Path) -> None:
    from engine.errors import UpdateError

    with Node.create(tmp_path / "n", dataset="acme", node="n") as node:
        try:
            for data in PANIC_UPDATES:
                node.import_updates({"customers": data})
        except UpdateError:
            pass  # refused with the documented error: fine
        node.put("customers", {"code": "K", "name": "still usable"})
        assert node.get("customers", "K") is not None


def test_relay_fed_100k_hostile_frames_keeps_serving_nodes(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    db = tmp_path / "relay.db"
    with SqliteRelayStore.create(db) as store:
        tokens = {n: store.enroll("acme", n).token for n in ("G1", "G2", "H1", "H2", "H3", "H4")}
    port = _free_port()
    url = f"ws://127.0.0.1:{port}/"
    relay = subprocess.Popen(
        [EXE, "relay", "serve", str(db), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "relay.log").open("wb"),
    )
    homes = {n: tmp_path / n for n in ("G1", "G2")}
    runs: list[subprocess.Popen[bytes]] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "relay did not start"
                time.sleep(0.1)
        for n, home in homes.items():
            Node.create(home, dataset="acme", node=n, relay=url, token=tokens[n]).close()
            runs.append(
                subprocess.Popen(
                    [EXE, "node", "run", "--home", str(home), "--backoff-max", "0.5"],
                    stderr=(tmp_path / f"{n}.log").open("wb"),
                )
            )
        hostile = [
            Hostile(url, f"H{i + 1}", tokens[f"H{i + 1}"], random.Random(rng.getrandbits(64)))
            for i in range(HOSTILE)
        ]
        written: list[str] = []

        async def good_writer(flood: asyncio.Task[Any]) -> int:
            """Write at both good nodes while the flood runs; how many writes."""
            i = 0
            nodes = {n: Node.open(h) for n, h in homes.items()}
            try:
                while not flood.done() or i < 10:
                    name = "G1" if i % 2 else "G2"
                    code = f"{name}-{i}"
                    # On the loop: a write takes milliseconds, and a Node
                    # belongs to the thread that opened it.
                    nodes[name].put("customers", {"code": code, "name": "good"})
                    written.append(code)
                    i += 1
                    await asyncio.sleep(0.05)
            finally:
                for n in nodes.values():
                    n.close()
            return i

        async def main() -> float:
            quota = [FRAMES]
            start = time.monotonic()
            flood = asyncio.gather(*(h.run(quota) for h in hostile))
            await good_writer(asyncio.ensure_future(flood))
            await flood
            return time.monotonic() - start

        flood_s = asyncio.run(main())
        sent = sum(h.sent for h in hostile)
        errors = sum((h.errors for h in hostile), Counter())
        # The relay is still healthy and the good nodes converge with every write.
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10).read()
        assert body == b"ok\n"
        start = time.monotonic()
        while True:
            digests = [records_digest(h) for h in homes.values()]
            with Node.open(homes["G1"]) as n:
                codes = {str(r["code"]) for r in n.list("customers")}
            same = len({d for d, *_ in digests}) == 1
            if same and set(written) <= codes and all(p == 0 for _, _, p, _ in digests):
                break
            for proc in runs:  # a crashed node cannot converge: say so at once
                assert proc.poll() is None, f"node run exited {proc.returncode}"
            # A liveness bound, not a timing target: generous for a loaded machine.
            assert time.monotonic() - start < 180, f"no convergence: {digests}"
            time.sleep(0.2)
        converge_s = time.monotonic() - start
        print(
            f"\n{sent} hostile frames over {sum(h.connections for h in hostile)} connections "
            f"in {flood_s:.1f} s; errors received {dict(errors)}; {len(written)} good writes "
            f"converged {converge_s:.2f} s after the flood"
        )
        assert sent >= FRAMES
        assert errors  # hostile connections were told why before being closed
        assert sum(h.connections for h in hostile) > HOSTILE  # ... and closed, then reopened
        assert relay.poll() is None  # the relay never went down
    finally:
        for proc in runs:
            proc.terminate()
        relay.terminate()
        for proc in [*runs, relay]:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
