"""The simulator's relay and the real server are one relay: both drive the
relay core (engine.relay.hub), so the same scripted sessions get the same
frames from them, byte for byte. The script covers hello and a refused
token, sync requests, acks, fan-out to several subscribers (frames shared
between them), a bad update, refusals (locked period, another node's
entry), a read-only node's update, a lease, a pass end, and a revoked
node's update (a fatal code whose message quotes the document)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pycrdt import Doc, Map
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from engine.protocol import Limits, codes, decode_message, encode_message
from engine.protocol import messages as m
from engine.relay import SqliteRelayStore
from engine.relay.hub import HubLimits
from engine.relay.server import RelayServer
from harness.sim.world import Link, SimRelay

DATASET = "acme"
# No heartbeats and no revocation poll during the script: every frame is a
# reply to a scripted input, nothing depends on timing.
LIMITS = HubLimits(heartbeat_ms=600_000, revocation_poll_s=3600.0)
MAX_FRAME = Limits().max_frame
NODES = {"A": False, "B": False, "C": False, "R": True}  # name -> read-only


class Writer:
    """A node's document: incremental updates of entries ``key|node``."""

    def __init__(self, node: str, client_id: int) -> None:
        self.node = node
        self.doc: Doc[Any] = Doc(client_id=client_id)
        self.map: Map[Any] = self.doc.get("r", type=Map)  # engine.crdt.document.ROOT

    def put(self, key: str, value: Any, owner: str | None = None) -> bytes:
        before = self.doc.get_state()
        self.map[f"{key}|{owner or self.node}"] = value
        update: bytes = self.doc.get_update(before)
        return update


def frame(msg: m.Message) -> bytes:
    return encode_message(msg, max_frame=MAX_FRAME)


@dataclass(frozen=True)
class Send:
    """``client`` sends ``frames`` (given the tokens of the store in use)."""

    client: str
    frames: Callable[[dict[str, str]], list[bytes]]


@dataclass(frozen=True)
class Admin:
    """An administrator acts on the store between frames."""

    act: Callable[[SqliteRelayStore], object]


Step = Send | Admin


def script() -> list[Step]:
    """The scripted sessions (updates built once: both relays get the same bytes)."""
    w = {n: Writer(n, client_id=100 + i) for i, n in enumerate(NODES)}
    a1 = w["A"].put("c1", {"name": "one"})
    b_run = [w["B"].put(f"c{i}", {"name": str(i)}) for i in range(20)]
    a_sale = Writer("A", client_id=200).put("s1", {"date": "2026-09-02"})  # its own document
    b_theirs = w["B"].put("c1", {"name": "not mine"}, owner="A")
    a2 = w["A"].put("c2", {"name": "two"})
    c1 = w["C"].put("c9", {"name": "late"})
    r1 = w["R"].put("r1", {"name": "read-only"})

    def hello(node: str, token: str | None = None) -> Send:
        return Send(
            node,
            lambda tok: [frame(m.Hello((1,), DATASET, node, token or tok[node], Limits()))],
        )

    def send(node: str, *msgs: m.Message) -> Send:
        return Send(node, lambda tok: [frame(msg) for msg in msgs])

    return [
        hello("A"),
        hello("B"),
        hello("C"),
        hello("R"),
        hello("X", token="not-a-token"),  # refused: auth_failed
        send("A", m.Sync1("customers", b"\x00")),
        send("A", m.Update("customers", a1, 1)),  # acked; fanned out to B, C, R
        send("B", m.Updates(tuple(m.Update("customers", u, 10 + i) for i, u in enumerate(b_run)))),
        send("A", m.Update("customers", b"\xff\xfe not an update", 2)),  # refused bad_update
        Admin(lambda store: store.lock_period(DATASET, "2026-09")),
        send("A", m.Update("sales/2026-09", a_sale, 3)),  # refused locked_period
        send("B", m.Update("customers", b_theirs, 40)),  # refused not_author
        send("A", m.Update("customers", a2, 4), m.SyncEnd(1)),  # ack, then synced
        send("A", m.Lease("receipts", 5, 7)),  # granted
        send("C", m.Sync1("customers", b"\x00")),  # the whole document
        Admin(lambda store: store.revoke(DATASET, "C")),
        send("C", m.Update("customers", c1, 1)),  # auth_failed, quoting 'customers'
        send("R", m.Update("customers", r1, 1)),  # read_only (the session refuses it)
    ]


def new_store(path: Path) -> tuple[SqliteRelayStore, dict[str, str]]:
    store = SqliteRelayStore.create(path)
    tokens = {n: store.enroll(DATASET, n, read_only=ro).token for n, ro in NODES.items()}
    return store, tokens


def clients(steps: list[Step]) -> list[str]:
    return list(dict.fromkeys(s.client for s in steps if isinstance(s, Send)))


def run_simulated(path: Path, steps: list[Step]) -> list[dict[str, list[bytes]]]:
    """Per step, the frames each client got from the simulator's relay."""
    relay = SimRelay(path, limits=LIMITS)
    assert relay.store is not None
    for n, ro in NODES.items():
        relay.store.enroll(DATASET, n, read_only=ro)
    tokens = {}  # enroll again to learn the tokens (a new token replaces the old)
    for n, ro in NODES.items():
        tokens[n] = relay.store.enroll(DATASET, n, read_only=ro).token
    links: dict[str, Link] = {}
    out: list[dict[str, list[bytes]]] = []
    try:
        for step in steps:
            got: dict[str, list[bytes]] = {}
            if isinstance(step, Admin):
                step.act(relay.store)
                out.append(got)
                continue
            if step.client not in links:
                links[step.client] = Link(len(links) + 1)
                relay.connect(links[step.client], relay.now_ms)
            for f in step.frames(tokens):
                relay.receive(links[step.client], f)
            for _ in range(2):  # before and after the group commit, as World._step
                for link, frames, _done in relay.outgoing():
                    name = next(n for n, lk in links.items() if lk is link)
                    got.setdefault(name, []).extend(frames)
                relay.commit()
            out.append({k: v for k, v in got.items() if v})
    finally:
        relay.store.close()
    return out


async def run_served(
    path: Path, steps: list[Step], expected: list[dict[str, list[bytes]]]
) -> list[dict[str, list[bytes]]]:
    """Per step, the frames each client got from the real server over
    websockets: after each step, as many as the simulator gave (waiting for
    them), then nothing more may come."""
    store, tokens = new_store(path)
    server = RelayServer(store, port=0, limits=LIMITS)
    await server.start()
    conns: dict[str, ClientConnection] = {}
    out: list[dict[str, list[bytes]]] = []
    try:
        for step, want in zip(steps, expected, strict=True):
            if isinstance(step, Admin):
                await asyncio.to_thread(step.act, store)
                out.append({})
                continue
            if step.client not in conns:
                conns[step.client] = await connect(server.url, max_size=None)
            for f in step.frames(tokens):
                await conns[step.client].send(f)
            got: dict[str, list[bytes]] = {}
            for name, frames in want.items():
                for _ in frames:
                    data = await asyncio.wait_for(conns[name].recv(), 10)
                    assert isinstance(data, bytes)
                    got.setdefault(name, []).append(data)
            for name, ws in conns.items():  # anything more is reported by the comparison
                try:
                    extra = await asyncio.wait_for(ws.recv(), 0.05)
                except (TimeoutError, ConnectionClosed):
                    continue
                got.setdefault(name, []).append(bytes(extra))  # type: ignore[arg-type]
            out.append(got)
    finally:
        for ws in conns.values():
            await ws.close()
        await server.stop()
        store.close()
    return out


def kinds(frames: list[bytes]) -> list[str]:
    return [m.header_of(decode_message(f, max_frame=1 << 30))["t"] for f in frames]


def test_the_simulator_and_the_server_send_the_same_frames(tmp_path: Path) -> None:
    steps = script()
    simulated = run_simulated(tmp_path / "sim.db", steps)
    served = asyncio.run(run_served(tmp_path / "served.db", steps, simulated))
    assert served == simulated
    # The script did reach what it is about (read from the simulator's frames).
    by_client: dict[str, list[bytes]] = {}
    for step in simulated:
        for name, frames in step.items():
            by_client.setdefault(name, []).extend(frames)
    msgs = {n: [decode_message(f, max_frame=1 << 30) for f in fs] for n, fs in by_client.items()}
    assert kinds(by_client["X"]) == ["error"] and msgs["X"][0].code == codes.AUTH_FAILED
    refused = [(x.doc, x.code) for x in msgs["A"] if isinstance(x, m.Refused)]
    assert refused == [("customers", codes.BAD_UPDATE), ("sales/2026-09", codes.LOCKED_PERIOD)]
    assert [(x.doc, x.code) for x in msgs["B"] if isinstance(x, m.Refused)] == [
        ("customers", codes.NOT_AUTHOR)
    ]
    assert any(isinstance(x, m.Synced) for x in msgs["A"])
    assert any(isinstance(x, m.LeaseGrant) for x in msgs["A"])
    (fatal,) = [x for x in msgs["C"] if isinstance(x, m.Error)]
    assert fatal.code == codes.AUTH_FAILED and "'customers'" in fatal.message
    assert [x.code for x in msgs["R"] if isinstance(x, m.Error)] == [codes.READ_ONLY]
    # B's run of 20 went out as one shared frame: the same bytes to A, C and R.
    run_step = simulated[7]
    assert run_step["A"] == run_step["C"] == run_step["R"]
    assert kinds(run_step["C"]) == ["updates"]
