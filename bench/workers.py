"""Benchmark tasks, each run in its own process by ``bench.core``:
``python -m bench.workers TASK 'JSON-ARGS'`` prints one JSON object.

A fresh process per task keeps one task's memory out of the next task's
RSS figures and gives each a cold start like a real node process.
"""

from __future__ import annotations

import gc
import os
import random
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from engine.node import Node

from .stats import latency_summary, rss_mb
from .workload import COLLECTION, DATASET, build_source, record, source_fidelity, write_schema

Args = dict[str, Any]
PUT_P99_BUDGET_MS = 5.0  # counted as "puts over 5 ms" next to the percentiles


class FsyncFloor:
    """What durability costs on this filesystem without Branchline:
    ``pwrite`` of 128 bytes + ``os.fsync`` on one small file, and a one-row
    SQLite commit in WAL mode with ``synchronous=FULL``. Run in blocks between
    the puts, so both see the same disk (the machine may be shared)."""

    def __init__(self, directory: Path) -> None:
        self.block = os.urandom(128)
        self.file = directory / "fsync-probe.bin"
        self.fd = os.open(self.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.db = directory / "fsync-probe.db"
        self.conn = sqlite3.connect(self.db, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB NOT NULL)")
        self.file_lat: list[float] = []
        self.sql_lat: list[float] = []

    def run(self, rounds: int, record: bool = True) -> None:
        for _ in range(rounds):
            t0 = time.perf_counter()
            os.pwrite(self.fd, self.block, 0)
            os.fsync(self.fd)
            t1 = time.perf_counter()
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("INSERT INTO t (v) VALUES (?)", (self.block,))
            self.conn.execute("COMMIT")
            t2 = time.perf_counter()
            if record:
                self.file_lat.append(t1 - t0)
                self.sql_lat.append(t2 - t1)

    def close(self) -> dict[str, Any]:
        os.close(self.fd)
        self.file.unlink()
        self.conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.db}{suffix}").unlink(missing_ok=True)
        return {
            "file_write_fsync": latency_summary(self.file_lat, PUT_P99_BUDGET_MS),
            "sqlite_wal_full_commit": latency_summary(self.sql_lat, PUT_P99_BUDGET_MS),
        }


def task_put(args: Args) -> dict[str, Any]:
    """Durable ``Node.put`` latency into a node already holding records.

    Inserts, updates and fsync-floor rounds run interleaved in ``blocks``
    blocks. Each put's wall time and the process CPU time it used are kept:
    wall minus CPU is mostly waiting for the disk."""
    directory = Path(args["dir"])
    schema = write_schema(directory)
    floor = FsyncFloor(directory)
    node = Node.create(directory / "put-node", dataset=DATASET, node="writer", schema=schema)
    try:
        prefill, blocks = args["prefill"], args["blocks"]
        payload, _ = build_source(prefill, seed=args["seed"], node="peer")
        node.import_updates({COLLECTION: payload})
        rng = random.Random(args["seed"] + 1)
        nxt = prefill
        floor.run(args["warmup"], record=False)
        for _ in range(args["warmup"]):  # loads the document, warms caches
            node.put(COLLECTION, record(nxt, rng))
            nxt += 1
        lat: dict[str, list[float]] = {"insert": [], "update": []}
        cpu: dict[str, list[float]] = {"insert": [], "update": []}
        for _ in range(blocks):
            floor.run(args["floor_rounds"] // blocks)
            for kind in ("insert", "update"):
                for _ in range(args[f"{kind}s"] // blocks):
                    if kind == "insert":
                        fields = record(nxt, rng)
                        nxt += 1
                    else:  # a record received from the peer, found by code, all else new
                        fields = record(rng.randrange(prefill), rng, revision=1)
                    c0, t0 = time.process_time(), time.perf_counter()
                    node.put(COLLECTION, fields)
                    lat[kind].append(time.perf_counter() - t0)
                    cpu[kind].append(time.process_time() - c0)
        count = node.count(COLLECTION)
        if count != nxt:
            raise AssertionError(f"node holds {count} records, expected {nxt}")
        return {
            "prefill_records": prefill,
            "records_at_end": count,
            "blocks": blocks,
            "insert": latency_summary(lat["insert"], PUT_P99_BUDGET_MS),
            "update": latency_summary(lat["update"], PUT_P99_BUDGET_MS),
            "insert_cpu": latency_summary(cpu["insert"], PUT_P99_BUDGET_MS),
            "update_cpu": latency_summary(cpu["update"], PUT_P99_BUDGET_MS),
            "fsync_floor": floor.close(),
            **rss_mb(),
        }
    finally:
        node.close()


def task_source(args: Args) -> dict[str, Any]:
    """Build the sending replica's update and write it to ``payload``."""
    t0 = time.perf_counter()
    payload, samples = build_source(args["records"], seed=args["seed"])
    seconds = time.perf_counter() - t0
    Path(args["payload"]).write_bytes(payload)
    Path(args["samples"]).write_bytes(orjson.dumps(samples))
    fidelity = source_fidelity(Path(args["dir"]), args["fidelity_records"], args["seed"])
    return {
        "records": args["records"],
        "bytes": len(payload),
        "build_s": seconds,
        "fidelity": fidelity,
    }


def task_apply(args: Args) -> dict[str, Any]:
    """Import the received update into a fresh node until every record is there."""
    n = args["records"]
    payload = Path(args["payload"]).read_bytes()
    samples: dict[str, dict[str, str]] = orjson.loads(Path(args["samples"]).read_bytes())
    node = Node.create(
        Path(args["home"]), dataset=DATASET, node="receiver", schema=Path(args["schema"])
    )
    try:
        gc.collect()
        before = rss_mb()
        t0 = time.perf_counter()
        report = node.import_sliced(COLLECTION, payload)
        t1 = time.perf_counter()
        count = node.count(COLLECTION)
        t2 = time.perf_counter()
        after = rss_mb()
        if count != n:
            raise AssertionError(f"{count} records materialized, expected {n}")
        for code, expected in samples.items():
            got = node.get(COLLECTION, code)
            if got is None or {k: str(got[k]) for k in expected} != expected:
                raise AssertionError(f"record {code} differs after import: {got} != {expected}")
        return {
            "records": count,
            "payload_bytes": len(payload),
            "import_s": t1 - t0,
            "count_s": t2 - t1,
            "total_s": t2 - t0,
            "records_per_s": count / (t2 - t0),
            "report": {"documents": report.documents, "records": report.records},
            "verified_samples": len(samples),
            "rss_before_mb": before["rss_mb"],
            "rss_after_mb": after["rss_mb"],
            "peak_rss_mb": after["peak_rss_mb"],
        }
    finally:
        node.close()


def task_hold(args: Args) -> dict[str, Any]:
    """RSS of a node process holding the records: open, then one put into the
    document (an update of one field of an existing record) so it is loaded."""
    n = args["records"]
    gc.collect()
    base = rss_mb()
    t0 = time.perf_counter()
    node = Node.open(Path(args["home"]))
    try:
        opened = rss_mb()
        t1 = time.perf_counter()
        node.put(COLLECTION, {"code": args["touch_code"], "visits": args["touch_value"]})
        t2 = time.perf_counter()
        count = node.count(COLLECTION)
        if count != n:
            raise AssertionError(f"node holds {count} records, expected {n}")
        gc.collect()
        held = rss_mb()
        out: dict[str, Any] = {
            "records": count,
            "open_s": t1 - t0,
            "first_put_s": t2 - t1,
            "rss_interpreter_mb": base["rss_mb"],
            "rss_after_open_mb": opened["rss_mb"],
            "rss_mb": held["rss_mb"],
            "peak_rss_mb": held["peak_rss_mb"],
        }
        if args["puts_after"]:
            # Durable inserts into this big document, after the RSS figures:
            # enough of them that one folds the log into a snapshot.
            rng = random.Random(args["touch_value"])
            lat = []
            for i in range(args["puts_after"]):
                fields = record(n + i, rng)
                t0 = time.perf_counter()
                node.put(COLLECTION, fields)
                lat.append(time.perf_counter() - t0)
            out["puts_after"] = latency_summary(lat, PUT_P99_BUDGET_MS)
        return out
    finally:
        node.close()


TASKS: dict[str, Callable[[Args], dict[str, Any]]] = {
    "put": task_put,
    "source": task_source,
    "apply": task_apply,
    "hold": task_hold,
}


def dispatch(
    module: str, tasks: dict[str, Callable[[Args], dict[str, Any]]], argv: list[str]
) -> int:
    """Run ``tasks[argv[0]]`` with the JSON arguments ``argv[1]`` and print
    its result as one JSON line (what the parent process reads)."""
    if len(argv) != 2 or argv[0] not in tasks:
        print(f"usage: python -m {module} {{{','.join(tasks)}}} 'JSON-ARGS'", file=sys.stderr)
        return 2
    result = tasks[argv[0]](orjson.loads(argv[1]))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


def main(argv: list[str]) -> int:
    return dispatch("bench.workers", TASKS, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
