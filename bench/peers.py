"""Branchline against its peers and this machine's limits, in one run (issue 7).

    python -m bench.peers            # full sizes, about fifteen minutes on a busy 2-core machine
    python -m bench.peers --quick    # small sizes, well under a minute once peers are installed

Peers are installed by the benchmark into ``bench/.peers/`` (``bench.peer_env``):
pycrdt-websocket + pycrdt-store (PyPI) and the y-websocket server (npm). A
peer that cannot be installed is skipped, loudly, in the results.

1. Limits: plain ``websockets`` broadcast on loopback (the fan-out workload
   against ``bench.plain_broadcast``), SQLite ``executemany`` rows/s into a
   table shaped like the relay's update log (WAL, synchronous=FULL), and the
   pwrite+fsync latency of the same filesystem.
2. Relay fan-out (``bench.fanout``): N = 3, 10, 50, 200 nodes writing
   single-record updates; each system in turn on the same machine and load.
3. Catch-up: 10k / 100k records made on A while B waits (upload direction,
   B online) and then fetched by a node C that was away (download direction).
4. Memory: RSS of a node holding 100k catalog records + 120k vouchers, and
   relay RSS per idle and per active dataset.
5. Growth: relay update log + snapshot bytes after 1M single-record edits
   (compaction as the relay does it) vs the raw data size.

Every run records the machine load (os.getloadavg and pressure) before and
after each benchmark. Results: ``bench/results/peers.json``
(``peers-quick.json`` with ``--quick``); ``python -m bench.report`` renders
docs/benchmarks.md and the plots from the JSON (a full run does it itself).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
from pycrdt import Doc, Map

from engine.relay.sqlite_store import SqliteRelayStore
from engine.relay.store import UpdateIn

from .fanout import Load, run_load
from .peer_env import Peer, Server, ensure_pycrdt, ensure_y_websocket
from .stats import ROOT, load_facts, machine_facts, run_facts, spread
from .sync import (
    DATASET,
    Relay,
    free_port,
    make_home,
    node_run,
    records_in,
    run_state,
    say,
    stop,
    wait_until,
)
from .workload import COLLECTION, build_source, record, write_schema

RESULTS = ROOT / "bench" / "results"
SEED = 20260707
TMPFS = Path("/dev/shm")
#: A peer's catch-up that has not completed by then is reported as failed.
CATCHUP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Sizes:
    nodes: tuple[int, ...]
    deliveries: int  # target deliveries per fan-out run (sets per-node writes)
    max_writes: int  # cap on the writes of one fan-out run
    window: int
    send_for_s: float
    drain_s: float
    systems: tuple[str, ...]
    catchup: tuple[int, ...]
    memory_catalog: int
    memory_vouchers: int
    relay_datasets: int
    relay_dataset_records: int
    growth_edits: int
    growth_records: int
    executemany_rows: int
    fsync_rounds: int
    repeats: int  # fan-out runs per (system, N) at the smallest N


ALL_SYSTEMS = (
    "plain",
    "branchline",
    "branchline-batched",
    "branchline-tmpfs",
    "y-websocket",
    "pycrdt-websocket",
)
FULL = Sizes(
    nodes=(3, 10, 50, 200),
    deliveries=200_000,
    max_writes=20_000,
    window=64,
    send_for_s=5.0,
    drain_s=2.0,
    systems=ALL_SYSTEMS,
    catchup=(1_000, 10_000, 100_000, 300_000),  # the plot shows the growth
    memory_catalog=100_000,
    memory_vouchers=120_000,
    relay_datasets=100,
    relay_dataset_records=1_000,
    growth_edits=1_000_000,
    growth_records=10_000,
    executemany_rows=200_000,
    fsync_rounds=1_000,
    repeats=3,
)
QUICK = Sizes(
    nodes=(3, 50),
    deliveries=12_000,
    max_writes=3_000,
    window=64,
    send_for_s=1.0,
    drain_s=1.0,
    systems=("plain", "branchline", "y-websocket", "pycrdt-websocket"),
    catchup=(10_000,),
    memory_catalog=5_000,
    memory_vouchers=6_000,
    relay_datasets=10,
    relay_dataset_records=1_000,
    growth_edits=10_000,
    growth_records=1_000,
    executemany_rows=50_000,
    fsync_rounds=300,
    repeats=1,
)
BATCH = 16  # updates per frame of the "branchline-batched" variant

SYSTEM_NOTES = {
    "plain": "plain `websockets` broadcast (the limit): every message to every connection, "
    "sender included; no parsing, storage, auth or ack",
    "branchline": "`branchline relay serve` (SQLite store on disk, WAL, synchronous=FULL); "
    "an update is acked after its group commit; one update per frame, as the peers' clients send",
    "branchline-batched": f"the same relay; nodes send {BATCH} updates per `updates` frame, as "
    "`branchline node run` ships a busy outbox",
    "branchline-tmpfs": "the same relay with its store on tmpfs (/dev/shm): the same code and "
    "acks, but fsync costs nothing — what the durable ack costs in disk waits (not durable)",
    "y-websocket": "`@y/websocket-server` on Node (in-memory documents; acks nothing, stores "
    "nothing unless given LevelDB, no auth); confirmation = the update's echo to its sender",
    "pycrdt-websocket": "pycrdt-websocket `WebsocketServer` with pycrdt-store `SQLiteYStore` per "
    "room (store writes queued after the broadcast, no ack, no auth); confirmation = echo",
}


def per_node(sizes: Sizes, n: int) -> int:
    want = sizes.deliveries // max(1, n * (n - 1))
    return max(10, min(want, sizes.max_writes // n))


def timed(fn: Any, *args: Any) -> dict[str, Any]:
    """Run one benchmark with the machine load before and after it."""
    before = load_facts()
    t0 = time.perf_counter()
    out: dict[str, Any] = fn(*args)
    out["load_before"], out["load_after"] = before, load_facts()
    out["wall_s"] = time.perf_counter() - t0
    return out


def proc_facts(pid: int) -> dict[str, float]:
    """RSS, peak RSS (MB) and CPU seconds of a child process."""
    out: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = (
                    int(value.split()[0]) * 1024 / 1e6
                )
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        out["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        pass
    return out


# -- 1. limits ---------------------------------------------------------------------------


def bench_executemany(tmp: Path, rows: int) -> dict[str, Any]:
    """Rows/s of one ``executemany`` into a table shaped like the relay's log."""
    path = tmp / "executemany.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(
        "CREATE TABLE updates (seq INTEGER PRIMARY KEY, dataset_id INTEGER NOT NULL, "
        "doc TEXT NOT NULL, data BLOB NOT NULL, node TEXT NOT NULL, at INTEGER NOT NULL)"
    )
    payload = build_source(1, seed=SEED)[0]  # one record's update: the size of a row's blob
    data = [(i, 1, "customers", payload, "N1", i) for i in range(rows)]
    runs = []
    for r in range(3):
        conn.execute("DELETE FROM updates")
        base = r * rows
        batch = [(base + i, *rest) for i, *rest in data]
        t0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO updates VALUES (?, ?, ?, ?, ?, ?)", batch)
        conn.execute("COMMIT")
        runs.append(rows / (time.perf_counter() - t0))
    conn.close()
    return {
        "workload": f"{rows:,} rows ({len(payload)} B blob each) in one transaction, "
        "one executemany, WAL, synchronous=FULL; 3 runs",
        "rows": rows,
        "blob_bytes": len(payload),
        "rows_per_s": spread(runs),
    }


def bench_fsync(tmp: Path, rounds: int) -> dict[str, Any]:
    from .workers import FsyncFloor

    floor = FsyncFloor(tmp)
    floor.run(20, record=False)
    floor.run(rounds)
    return {"rounds": rounds, **floor.close()}


# -- 2. fan-out --------------------------------------------------------------------------


def fanout_once(system: str, load: Load, tmp: Path, peers: dict[str, Peer]) -> dict[str, Any]:
    if system.startswith("branchline"):
        where = TMPFS if system == "branchline-tmpfs" else tmp
        run_dir = Path(tempfile.mkdtemp(prefix="relay-", dir=where))
        store_path = run_dir / "relay.db"
        try:
            with SqliteRelayStore.create(store_path) as store:
                tokens = {k: store.enroll(DATASET, f"N{k}").token for k in range(load.nodes)}
            relay = Relay(store_path)
            try:
                res = run_load("branchline", relay.url, load, tokens)
                res["server"] = proc_facts(relay.proc.pid)
            finally:
                relay.stop()
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        return res
    port = free_port()
    env: dict[str, str] = {}
    if system == "plain":
        cmd = [sys.executable, "-m", "bench.plain_broadcast", "--port", str(port)]
    elif system == "pycrdt-websocket":
        db = tmp / f"ystore-{port}.db"
        cmd = [*peers[system].command, "--port", str(port), "--db", str(db)]
    else:
        cmd = peers[system].command
        env = {"HOST": "127.0.0.1", "PORT": str(port)}
    server = Server(cmd, port, tmp / f"{system}-{port}.log", env)
    try:
        res = run_load("y", f"ws://127.0.0.1:{port}/", load)
        res["server"] = proc_facts(server.pid)
    finally:
        server.stop()
    return res


def bench_fanout(tmp: Path, sizes: Sizes, peers: dict[str, Peer]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "workload": (
            "N node connections, each writing single-record updates (a 10-field record as JSON "
            f"under its own map key, ~0.4 kB) with at most {sizes.window} of its own updates "
            "unconfirmed, and receiving every other node's; all connections in 2 client "
            "processes; writers stop sending after "
            f"{sizes.send_for_s:g} s, and the run ends when all is delivered or nothing arrived "
            f"for {sizes.drain_s:g} s. inbound/s = confirmed updates / time to the last "
            "confirmation (Branchline: durable acks; peers: the update's echo to its sender); "
            "delivered/s = deliveries to the other N-1 nodes / time to the last delivery."
        ),
        "systems": {},
    }
    for system in sizes.systems:
        if system in peers and not peers[system].ready:
            out["systems"][system] = {"skipped": peers[system].reason}
            say(f"[fan-out] {system}: SKIPPED — {peers[system].reason}")
            continue
        rows = []
        for n in sizes.nodes:
            batch = BATCH if system == "branchline-batched" else 1
            load = Load(n, per_node(sizes, n), sizes.window, batch, sizes.send_for_s, sizes.drain_s)
            repeats = sizes.repeats if n == sizes.nodes[0] else 1
            runs = []
            for _ in range(repeats):
                gc.collect()
                runs.append(timed(fanout_once, system, load, tmp, peers))
            best = sorted(runs, key=lambda r: r["delivered_per_s"])[len(runs) // 2]
            best["repeats"] = {
                "in_per_s": spread([r["in_per_s"] for r in runs]),
                "delivered_per_s": spread([r["delivered_per_s"] for r in runs]),
            }
            lat = best["latency"]
            say(
                f"[fan-out] {system:18} N={n:3}: in {best['in_per_s']:8,.0f}/s, delivered "
                f"{best['delivered_per_s']:9,.0f}/s ({best['delivered_fraction']:.0%}), "
                f"p50 {lat.get('p50_ms', float('nan')):7.1f} ms, "
                f"p99 {lat.get('p99_ms', float('nan')):7.1f} ms, "
                f"load {best['load_before']['loadavg_1_5_15'][0]:.2f}"
            )
            rows.append(best)
        out["systems"][system] = {"note": SYSTEM_NOTES[system], "runs": rows}
    return out


def profile_relay_fanout(tmp: Path, sizes: Sizes, n: int, path: Path) -> dict[str, Any]:
    """The Branchline fan-out at ``n`` nodes with the relay under pyinstrument."""
    store_path = tmp / "relay-profile.db"
    with SqliteRelayStore.create(store_path) as store:
        tokens = {k: store.enroll(DATASET, f"N{k}").token for k in range(n)}
    relay = Relay(store_path, path)
    load = Load(n, per_node(sizes, n), sizes.window, 1, sizes.send_for_s, sizes.drain_s)
    try:
        res = run_load("branchline", relay.url, load, tokens)
    finally:
        relay.stop()
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return {
        "nodes": n,
        "in_per_s_under_profiler": res["in_per_s"],
        "report": str(path.relative_to(ROOT)),
        "top": _profile_top(text),
    }


def _profile_top(text: str, lines: int = 45) -> list[str]:
    out = []
    for line in text.splitlines():
        if line.strip() and not line.startswith(("  _     ._", "/ _/", "/_//")):
            out.append(line.rstrip())
        if len(out) >= lines:
            break
    return out


# -- 3. catch-up -------------------------------------------------------------------------


def catchup_branchline(tmp: Path, n: int) -> dict[str, Any]:
    """Upload: A holds n records made offline, B runs `node run`; from A's
    sync start until B materialized them (as bench.sync). Download: then a new
    node C (away all along) syncs; from its sync start until it has them."""
    from engine.node import Node
    from engine.transport import node_sync

    tmp.mkdir(parents=True, exist_ok=True)
    schema = write_schema(tmp)
    store_path = tmp / "relay-catchup.db"
    with SqliteRelayStore.create(store_path) as store:
        tokens = {name: store.enroll(DATASET, name).token for name in ("A", "B", "C")}
    relay = Relay(store_path)
    try:
        homes = {x: make_home(tmp, x, relay.url, tokens[x], schema) for x in ("A", "B", "C")}
        update, _ = build_source(n, seed=SEED, node="A")
        with Node.open(homes["A"]) as a:
            a.import_updates({COLLECTION: update})
        run_b = node_run(homes["B"])
        try:
            wait_until(lambda: run_state(homes["B"]) == "online", 30, "B online", 0.05)
            with Node.open(homes["A"]) as a:
                t_up = time.monotonic()
                asyncio.run(node_sync(a, timeout=600))
                a_synced_s = time.monotonic() - t_up
            wait_until(lambda: records_in(homes["B"]) >= n, 600, "B caught up")
            upload_s = time.monotonic() - t_up
        finally:
            stop(run_b)
        with Node.open(homes["C"]) as c:
            t0 = time.monotonic()
            asyncio.run(node_sync(c, timeout=600))
            synced = time.monotonic()
            count = c.count(COLLECTION)
            download_s = time.monotonic() - t0
        if count != n:
            raise RuntimeError(f"C holds {count} records after its sync, expected {n}")
    finally:
        relay.stop()
    return {
        "records": n,
        "update_bytes": len(update),
        "upload_s": upload_s,
        "a_sync_returned_s": a_synced_s,
        "download_s": download_s,
        "download_sync_returned_s": synced - t0,
    }


def _y_records_doc(n: int, client_id: int) -> bytes:
    doc: Doc[Any] = Doc(client_id=client_id)
    m: Map[Any] = doc.get("m", type=Map)
    rng = random.Random(SEED)
    with doc.transaction():
        for i in range(n):
            fields = {k: str(v) for k, v in record(i, rng).items()}
            m[f"r{i:07d}"] = orjson.dumps(fields).decode()
    return doc.get_update()


async def _y_catchup(url: str, update: bytes, n: int) -> dict[str, float]:
    """Upload: B connected and waiting; A connects and answers the server's
    sync step 1 with its whole state (sync step 2); until B's Doc holds n
    records. Download: C connects and sends sync step 1 (empty state vector);
    until C's Doc holds n records. Each receiving client applies what arrives
    to a pycrdt Doc (its 'materialized' form: len() of the map)."""
    from websockets.asyncio.client import connect

    from .fanout import _varuint

    def step(kind: int, payload: bytes) -> bytes:
        return b"\x00" + bytes([kind]) + _varuint(len(payload)) + payload

    def payload_of(msg: bytes) -> tuple[int, int, bytes] | None:
        if len(msg) < 3 or msg[0] != 0:
            return None
        kind, pos, length, shift = msg[1], 2, 0, 0
        while True:
            b = msg[pos]
            length |= (b & 0x7F) << shift
            pos += 1
            shift += 7
            if b < 0x80:
                break
        return msg[0], kind, msg[pos : pos + length]

    async def receiver(ws: Any, doc: Doc[Any], m: Map[Any], t_box: list[float]) -> None:
        async for msg in ws:
            parsed = payload_of(msg)
            if parsed is None:
                continue
            _, kind, payload = parsed
            if kind in (1, 2):  # sync step 2 or update
                doc.apply_update(payload)
                if len(m) >= n:
                    t_box.append(time.monotonic())
                    return

    opts: dict[str, Any] = {"max_size": None, "compression": None, "ping_interval": None}
    b_doc: Doc[Any] = Doc()
    b_map: Map[Any] = b_doc.get("m", type=Map)
    got: list[float] = []
    async with connect(url, **opts) as b:
        b_task = asyncio.create_task(receiver(b, b_doc, b_map, got))
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        async with connect(url, **opts) as a:
            await a.send(step(1, update))  # sync step 2: everything the server lacks
            await asyncio.wait_for(b_task, CATCHUP_TIMEOUT_S)
        upload_s = got[0] - t0
    await asyncio.sleep(1.0)  # the stores write after the broadcast
    c_doc: Doc[Any] = Doc()
    c_map: Map[Any] = c_doc.get("m", type=Map)
    got = []
    t0 = time.monotonic()
    async with connect(url, **opts) as c:
        await c.send(step(0, b"\x00"))  # sync step 1 with an empty state vector
        await asyncio.wait_for(receiver(c, c_doc, c_map, got), CATCHUP_TIMEOUT_S)
    return {"upload_s": upload_s, "download_s": got[0] - t0}


def catchup_peer(system: str, peer: Peer, tmp: Path, n: int) -> dict[str, Any]:
    port = free_port()
    env: dict[str, str] = {}
    if system == "pycrdt-websocket":
        cmd = [*peer.command, "--port", str(port), "--db", str(tmp / f"catchup-{port}.db")]
    else:
        cmd = peer.command
        env = {"HOST": "127.0.0.1", "PORT": str(port)}
    update = _y_records_doc(n, 77)
    server = Server(cmd, port, tmp / f"catchup-{system}-{port}.log", env)
    try:
        res = asyncio.run(_y_catchup(f"ws://127.0.0.1:{port}/catchup", update, n))
        res["server"] = proc_facts(server.pid)
    finally:
        server.stop()
    return {"records": n, "update_bytes": len(update), **res}


def bench_catchup(tmp: Path, sizes: Sizes, peers: dict[str, Peer]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "workload": (
            "Upload: records of the 10-field bench collection made on A while B is connected; "
            "from A's sync start until B has them all materialized (Branchline: B is "
            "`branchline node run`, its `records` table polled every 5 ms, as bench.sync; peers: "
            "B is a y-protocol client applying what arrives to a pycrdt Doc and counting the "
            "map). Download: then C, away all along, connects and syncs; until C has them all "
            "(Branchline: `node_sync` of a fresh node plus `count()`; peers: sync step 1 with "
            "an empty state vector, apply, count). Peers' records are one JSON string per "
            "record in one Y.Map; Branchline's are its multi-value-register entries, "
            "materialized into SQLite rows."
        ),
        "systems": {},
    }
    for n in sizes.catchup:
        say(f"[catch-up] branchline {n:,} records...")
        res = timed(catchup_branchline, tmp / f"catchup-{n}", n)
        say(f"[catch-up] branchline {n:,}: upload {res['upload_s']:.2f} s, download "
            f"{res['download_s']:.2f} s")  # fmt: skip
        out["systems"].setdefault("branchline", []).append(res)
        for system in ("y-websocket", "pycrdt-websocket"):
            peer = peers[system]
            if not peer.ready:
                out["systems"][system] = {"skipped": peer.reason}
                continue
            try:
                res = timed(catchup_peer, system, peer, tmp, n)
            except (RuntimeError, TimeoutError, OSError) as exc:
                why = f"not complete after {CATCHUP_TIMEOUT_S:g} s" if isinstance(
                    exc, TimeoutError) else f"{type(exc).__name__}: {exc}"  # fmt: skip
                res = {"records": n, "error": why}
                say(f"[catch-up] {system} {n:,}: FAILED {res['error']}")
            else:
                say(f"[catch-up] {system} {n:,}: upload {res['upload_s']:.2f} s, download "
                    f"{res['download_s']:.2f} s")  # fmt: skip
            out["systems"].setdefault(system, []).append(res)
    return out


# -- 4. memory ---------------------------------------------------------------------------


def bench_memory(tmp: Path, sizes: Sizes) -> dict[str, Any]:
    args = {
        "dir": str(tmp / "memory"),
        "catalog": sizes.memory_catalog,
        "vouchers": sizes.memory_vouchers,
        "seed": SEED,
    }
    Path(args["dir"]).mkdir(parents=True)
    built = _worker("memory_build", args)
    held = _worker("memory_hold", args)
    relay = relay_memory(tmp, sizes.relay_datasets, sizes.relay_dataset_records)
    return {
        "node": {
            "workload": (
                f"A node (built-in accounting schema) holding {sizes.memory_catalog:,} customers "
                f"and {sizes.memory_vouchers:,} sales invoices of 3 lines (one document per "
                "month), received from another replica as CRDT updates; a new process opens it "
                "and loads every document (what serving reads and writes needs); RSS after "
                "gc.collect(), peak = VmHWM."
            ),
            "build": built,
            **held,
        },
        "relay": relay,
    }


def _worker(task: str, args: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.peer_workers", task, orjson.dumps(args).decode()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"benchmark task {task!r} failed (exit {done.returncode})")
    result: dict[str, Any] = orjson.loads(done.stdout.strip().splitlines()[-1])
    return result


def relay_memory(tmp: Path, datasets: int, records: int) -> dict[str, Any]:
    """RSS of `branchline relay serve`: empty store; K datasets stored, none
    connected (idle); then one node per dataset connected, having written an
    update to the dataset's document (active: the document is loaded)."""
    from .sync import open_client

    # Entries of the node that sends them ("N"): the relay refuses others'.
    update, _ = build_source(records, seed=SEED, node="N")
    empty_path = tmp / "relay-empty.db"
    SqliteRelayStore.create(empty_path).close()
    relay = Relay(empty_path)
    time.sleep(1.0)
    empty = proc_facts(relay.proc.pid)
    relay.stop()

    store_path = tmp / "relay-memory.db"
    tokens: dict[str, str] = {}
    with SqliteRelayStore.create(store_path) as store:
        for d in range(datasets):
            name = f"ds{d:04d}"
            tokens[name] = store.enroll(name, "N").token
            (stored,) = store.append_updates(name, [UpdateIn(COLLECTION, update, "N")])
            assert stored.ok, stored.error
    relay = Relay(store_path)
    try:
        time.sleep(1.0)
        idle = proc_facts(relay.proc.pid)

        async def activate() -> dict[str, float]:
            from engine.protocol import Limits, encode_message
            from engine.protocol.messages import Update

            extra = build_source(1, seed=SEED + 1, node="N")[0]
            frame = encode_message(Update(COLLECTION, extra, 1), max_frame=Limits().max_frame)
            conns = []
            for name, token in tokens.items():
                ws, _ = await _open_dataset(open_client, relay.url, name, token)
                await ws.send(frame)
                while True:  # until the ack: the document is loaded and the update stored
                    msg = await ws.recv()
                    if isinstance(msg, bytes) and b'"ack"' in msg[:64]:
                        break
                conns.append(ws)
            await asyncio.sleep(1.0)
            facts = proc_facts(relay.proc.pid)
            for ws in conns:
                await ws.close()
            return facts

        active = asyncio.run(activate())
    finally:
        relay.stop()
    per_idle = (idle["rss_mb"] - empty["rss_mb"]) / datasets
    per_active = (active["rss_mb"] - idle["rss_mb"]) / datasets
    return {
        "workload": (
            f"`branchline relay serve`: RSS on an empty store; then on a store of {datasets} "
            f"datasets each holding one {records:,}-record document ({len(update) / 1e3:.0f} kB "
            "update), none connected (idle); then with one node per dataset connected that "
            "wrote one update to it and got the ack (active: the document is loaded). "
            "Per dataset = difference / datasets."
        ),
        "datasets": datasets,
        "records_per_dataset": records,
        "update_bytes": len(update),
        "empty": empty,
        "idle": idle,
        "active": active,
        "per_idle_dataset_mb": per_idle,
        "per_active_dataset_mb": per_active,
    }


async def _open_dataset(open_client: Any, url: str, dataset: str, token: str) -> Any:
    from . import sync as sync_mod

    saved = sync_mod.DATASET
    sync_mod.DATASET = dataset  # open_client takes the dataset from the module
    try:
        return await open_client(url, "N", token)
    finally:
        sync_mod.DATASET = saved


# -- 5. growth ---------------------------------------------------------------------------


def bench_growth(tmp: Path, sizes: Sizes) -> dict[str, Any]:
    return _worker(
        "growth",
        {
            "dir": str(tmp / "growth"),
            "edits": sizes.growth_edits,
            "records": sizes.growth_records,
            "seed": SEED,
        },
    )


# -- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m bench.peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--no-install", action="store_true", help="skip peers not yet installed")
    parser.add_argument("--no-docs", action="store_true", help="leave docs/benchmarks.md alone")
    parser.add_argument(
        "--only",
        choices=("limits", "fanout", "catchup", "memory", "growth"),
        action="append",
        help="run only these parts (repeatable); the JSON then holds only them",
    )
    opts = parser.parse_args(argv)
    sizes = QUICK if opts.quick else FULL
    parts = opts.only or ["limits", "fanout", "catchup", "memory", "growth"]
    started = time.perf_counter()
    base = RESULTS / "tmp"
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="peers-", dir=base))
    say("installing / checking peers in bench/.peers ...")
    peers = {
        "pycrdt-websocket": ensure_pycrdt(not opts.no_install),
        "y-websocket": ensure_y_websocket(not opts.no_install),
    }
    for p in peers.values():
        say(f"  {p.name}: " + (f"ready {p.versions}" if p.ready else f"SKIPPED — {p.reason}"))
    doc: dict[str, Any] = {
        **run_facts(argv, "bench.peers"),
        "mode": "quick" if opts.quick else "full",
        "sizes": asdict(sizes),
        "machine": machine_facts(tmp),
        "load_at_start": load_facts(),
        "peers": {k: asdict(v) for k, v in peers.items()},
        "systems": SYSTEM_NOTES,
    }
    b: dict[str, Any] = {}
    try:
        if "limits" in parts:
            say("[limits] executemany, fsync...")
            b["executemany"] = timed(bench_executemany, tmp, sizes.executemany_rows)
            b["fsync"] = timed(bench_fsync, tmp, sizes.fsync_rounds)
            em, fs = b["executemany"], b["fsync"]["file_write_fsync"]
            say(f"[limits] executemany {em['rows_per_s']['median']:,.0f} rows/s; "
                f"fsync p50 {fs['p50_ms']:.3f} ms p99 {fs['p99_ms']:.3f} ms")  # fmt: skip
        if "fanout" in parts:
            b["fanout"] = bench_fanout(tmp, sizes, peers)
        if "catchup" in parts:
            b["catchup"] = bench_catchup(tmp, sizes, peers)
        if "memory" in parts:
            say("[memory] node and relay RSS...")
            b["memory"] = timed(bench_memory, tmp, sizes)
            mem = b["memory"]
            say(f"[memory] node {mem['node']['rss_mb']:.0f} MB (peak "
                f"{mem['node']['peak_rss_mb']:.0f}); relay per idle dataset "
                f"{mem['relay']['per_idle_dataset_mb']:.2f} MB, per active "
                f"{mem['relay']['per_active_dataset_mb']:.2f} MB")  # fmt: skip
        if "growth" in parts:
            say(f"[growth] {sizes.growth_edits:,} edits...")
            b["growth"] = timed(bench_growth, tmp, sizes)
            g = b["growth"]
            say(f"[growth] log+snapshots {g['stored_bytes'] / 1e6:.1f} MB vs raw "
                f"{g['raw_bytes'] / 1e6:.1f} MB")  # fmt: skip
        if "fanout" in parts and not opts.quick:
            from .report_peers import peer_goals

            missed = [g for g in peer_goals({"benchmarks": b}, None) if g.met is False]
            if any(g.benchmark.startswith("Relay") for g in missed):
                say("[profile] a relay goal is missed: profiling the relay at N=50...")
                out = RESULTS / "profiles" / "peers-relay-fanout-50.txt"
                out.parent.mkdir(parents=True, exist_ok=True)
                b["relay_profile"] = profile_relay_fanout(tmp, sizes, 50, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if base.exists() and not any(base.iterdir()):
            base.rmdir()
    doc["load_at_end"] = load_facts()
    doc["benchmarks"] = b
    doc["wall_s"] = time.perf_counter() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("peers-quick.json" if opts.quick else "peers.json")
    if opts.only and out.exists():  # merge: the parts run now replace theirs
        old = orjson.loads(out.read_bytes())
        doc["benchmarks"] = {**old.get("benchmarks", {}), **b}
        doc["part_runs"] = [
            *old.get("part_runs", []),
            {k: doc[k] for k in ("date", "git_commit", "command", "load_at_start", "load_at_end")}
            | {"parts": parts},
        ]
    out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
    say(f"wrote {out.relative_to(ROOT)} ({doc['wall_s']:.0f} s)")
    from . import report, report_peers

    for g in report_peers.peer_goals(doc, report_peers.load_json("core")):
        say(g.line())
    if opts.quick:
        report.regenerate(quick=True)
        say("rendered bench/results/peers-quick.md (docs/benchmarks.md left alone)")
    elif not opts.no_docs:
        report.regenerate()
        say("regenerated docs/benchmarks.md and the plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
