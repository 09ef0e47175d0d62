"""Tasks of ``bench.peers`` that run in a process of their own (fresh RSS):
``python -m bench.peer_workers TASK 'JSON-ARGS'`` prints one JSON object.

- ``memory_build``: a node (built-in accounting schema) receiving
  ``catalog`` customers and ``vouchers`` sales invoices of 3 lines from
  another replica (CRDT updates made with the engine's write primitives, one
  Yjs transaction per record as ``Node.put`` makes; one document per month).
- ``memory_hold``: a new process opens that node and loads every document.
- ``growth``: ``edits`` single-record updates (``records`` records created,
  then one field of a random record rewritten per edit) appended to a relay
  store in batches of 1,000, as the relay's committer does; then the bytes of
  the update log and the snapshots, against the raw size of the data.
"""

from __future__ import annotations

import datetime as dt
import gc
import random
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from pycrdt import Doc, Map

from engine.clock import HybridClock, SystemClock
from engine.crdt import RecordDoc
from engine.crdt.document import ROOT, SEP
from engine.ids import new_id, node_salt
from engine.merge import CREATED, new_state
from engine.node import Node
from engine.relay.sqlite_store import SqliteRelayStore
from engine.relay.store import UpdateIn

from .stats import rss_mb
from .workers import Args, dispatch
from .workload import collection, encoded, record


def task_memory_build(args: Args) -> dict[str, Any]:
    home = Path(args["dir"]) / "node"
    rng = random.Random(args["seed"])
    node = Node.create(home, dataset="bench", node="holder")
    try:
        t0 = time.perf_counter()
        for code in ("111", "131", "156", "331", "511", "3331", "632"):
            node.put("accounts", {"code": code, "name": f"TK {code}"})
        items = [
            node.put("items", {"code": f"SP{i:04d}", "name": f"Hàng {i}", "price": "12500.50"})
            for i in range(200)
        ]
        stores = [node.put("warehouses", {"code": f"KHO{i}", "name": f"Kho {i}"}) for i in range(5)]
        hlc = HybridClock(SystemClock())
        salt = node_salt("source")
        customers = node.collection("customers")
        cdoc = RecordDoc("customers", rng.getrandbits(52) + 1)
        cids = []
        for i in range(args["catalog"]):
            fields = record(i, rng)
            values = encoded(
                customers,
                {
                    "code": f"KH{i:07d}",
                    "name": fields["name"],
                    "tax_code": fields["tax_code"],
                    "address": fields["address"],
                },
            )
            values[CREATED] = True
            rid = new_id(hlc.tick(), salt, rng)
            cdoc.write(rid, "source", new_state(None, values, hlc.tick(), {}))
            cids.append(rid)
        vdocs: dict[str, RecordDoc] = {}
        for i in range(args["vouchers"]):
            day = dt.date(2026, 1, 1) + dt.timedelta(days=i % 365)
            values = {
                "number": f"HDsource-{i + 1:06d}",
                "date": day.isoformat(),
                "customer": rng.choice(cids),
                "warehouse": rng.choice(stores),
                "paid": rng.random() < 0.5,
                "lines": [
                    {
                        "item": rng.choice(items),
                        "qty": str(rng.randint(1, 50)),
                        "price": f"{rng.randint(1000, 5_000_000)}.{rng.randint(0, 99):02d}",
                        "vat_rate": rng.choice(("0.1", "0.08", "0")),
                    }
                    for _ in range(3)
                ],
                CREATED: True,
            }
            name = f"sales_invoice/{values['date'][:7]}"
            doc = vdocs.get(name)
            if doc is None:
                doc = vdocs[name] = RecordDoc(name, rng.getrandbits(52) + 1)
            rid = new_id(hlc.tick(), salt, rng)
            doc.write(rid, "source", new_state(None, values, hlc.tick(), {}))
        updates = {"customers": cdoc.diff(), **{k: d.diff() for k, d in vdocs.items()}}
        build_s = time.perf_counter() - t0
        del cdoc, vdocs
        gc.collect()
        t0 = time.perf_counter()
        node.import_updates(updates)
        import_s = time.perf_counter() - t0
        counts = {
            "customers": node.count("customers"),
            "sales_invoice": node.count("sales_invoice"),
        }
        if counts != {"customers": args["catalog"], "sales_invoice": args["vouchers"]}:
            raise AssertionError(f"node holds {counts}")
        return {
            "build_s": build_s,
            "import_s": import_s,
            "counts": counts,
            "documents": len(updates),
            "update_bytes": sum(len(u) for u in updates.values()),
            "store_mb": (home / "branchline.db").stat().st_size / 1e6,
        }
    finally:
        node.close()


def task_memory_hold(args: Args) -> dict[str, Any]:
    gc.collect()
    base = rss_mb()
    t0 = time.perf_counter()
    node = Node.open(Path(args["dir"]) / "node")
    try:
        names = node.documents()
        for name in names:
            node._doc(name)  # load it, as the first read or write of the document does
        load_s = time.perf_counter() - t0
        counts = {
            "customers": node.count("customers"),
            "sales_invoice": node.count("sales_invoice"),
        }
        gc.collect()
        held = rss_mb()
        return {
            "documents_loaded": len(names),
            "counts": counts,
            "open_and_load_s": load_s,
            "rss_interpreter_mb": base["rss_mb"],
            "rss_mb": held["rss_mb"],
            "peak_rss_mb": held["peak_rss_mb"],
        }
    finally:
        node.close()


def task_growth(args: Args) -> dict[str, Any]:
    directory = Path(args["dir"])
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "relay.db"
    rng = random.Random(args["seed"])
    coll = collection()
    hlc = HybridClock(SystemClock())
    salt = node_salt("N1")
    # The entries RecordDoc.write makes (key "{record}|{node}" -> the node's
    # state as JSON), written on a bare Doc: RecordDoc's observers (its record
    # index) would cost more than the relay's work being measured.
    doc: Doc[Any] = Doc(client_id=rng.getrandbits(52) + 1)
    ymap: Map[Any] = doc.get(ROOT, type=Map)
    made: list[bytes] = []
    doc.observe(lambda event: made.append(event.update))
    n, edits = args["records"], args["edits"]
    states: dict[str, Any] = {}
    current: dict[str, dict[str, Any]] = {}
    rids: list[str] = []
    names = [f for f in coll.fields if f != "code"]
    sent_bytes = 0
    raw_edit_bytes = 0
    append_s = 0.0
    batch: list[UpdateIn] = []
    with SqliteRelayStore.create(path) as store:
        store.enroll("bench", "N1")

        def flush() -> None:
            nonlocal append_s
            t0 = time.perf_counter()
            store.append_updates("bench", batch)
            append_s += time.perf_counter() - t0
            batch.clear()

        t_all = time.perf_counter()
        for e in range(edits):
            if e < n:  # the first n edits create the records
                fields = record(e, rng)
                values = encoded(coll, fields)
                values[CREATED] = True
                rid = new_id(hlc.tick(), salt, rng)
                rids.append(rid)
                current[rid] = {k: str(v) for k, v in fields.items()}
                change = values
            else:
                rid = rng.choice(rids)
                fields = record(e, rng, revision=e)
                name = rng.choice(names)
                change = encoded(coll, {name: fields[name]})
                current[rid][name] = str(fields[name])
            state = new_state(states.get(rid), change, hlc.tick(), {})
            states[rid] = state
            with doc.transaction():
                ymap[f"{rid}{SEP}N1"] = orjson.dumps(state).decode()
            update = made.pop()
            sent_bytes += len(update)
            raw_edit_bytes += len(orjson.dumps(change))
            batch.append(UpdateIn("parties", update, "N1"))
            if len(batch) == 1000:
                flush()
        if batch:
            flush()
        total_s = time.perf_counter() - t_all
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        log_rows, log_bytes = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM updates"
        ).fetchone()
        snaps, snap_bytes = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM snapshots"
        ).fetchone()
    finally:
        conn.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("VACUUM")
    conn.close()
    raw = sum(len(orjson.dumps(v)) for v in current.values())
    state_bytes = len(doc.get_update())
    return {
        "workload": (
            f"{edits:,} single-record edits to one document of the 10-field bench collection: "
            f"the first {n:,} create the records, each later one rewrites one random field of a "
            "random record (its writer's whole entry, as Node.put does); the updates are "
            "appended to a relay SQLite store in batches of 1,000 (the relay's group commits; "
            "it folds its log into a snapshot by itself). Raw data = the records' current "
            "fields as JSON."
        ),
        "edits": edits,
        "records": n,
        "updates_bytes_sent": sent_bytes,
        "raw_edit_bytes": raw_edit_bytes,
        "log_rows": log_rows,
        "log_bytes": log_bytes,
        "snapshots": snaps,
        "snapshot_bytes": snap_bytes,
        "stored_bytes": log_bytes + snap_bytes,
        "file_bytes_after_vacuum": path.stat().st_size,
        "raw_bytes": raw,
        "crdt_state_bytes": state_bytes,
        "append_s": append_s,
        "total_s": total_s,
        "edits_per_s_appended": edits / append_s if append_s else 0.0,
    }


TASKS: dict[str, Callable[[Args], dict[str, Any]]] = {
    "memory_build": task_memory_build,
    "memory_hold": task_memory_hold,
    "growth": task_growth,
}


def main(argv: list[str]) -> int:
    return dispatch("bench.peer_workers", TASKS, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
