"""Write-back capture (issue 15): how many rows an app writing SQL gets
replicated per second, against the same rows written to a plain table.

    python -m bench.capture                 # 2,000 rows x 3 runs; bench/results/capture.json
    python -m bench.capture --rows 500      # smaller

Each run makes a fresh node home (SQLite, the store's own durability:
WAL, synchronous=FULL) with two identical app tables, one of them captured
into ``customers``. For each way of writing (one row per app transaction, as
a till does; 100 rows per transaction, as a batch import does):

- **plain**: the app inserts into the table nothing captures;
- **captured**: the app inserts into the captured table (the trigger queues
  each row in the app's transaction), then the node writes the queue into
  records (``Node.drain_captured`` batches, as ``node run`` does). The time
  counted is both: until every row is a durable, replicated record.

- **captured, node running**: as captured, with the node draining in a
  process of its own meanwhile (the capture pump of ``node run``, polling
  every 50 ms): the time until the last row is a record.

Also reported: the app-side time alone (what the trigger costs the app) and
``Node.put`` of the same rows through the API, one write per call.
Goal: captured >= 0.5x plain. Figures are medians of the runs.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from engine.node import Node
from engine.store import NodeStore

from .stats import load_facts, machine_facts, run_facts

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
GOAL = 0.5
COLUMNS = "code TEXT UNIQUE, name TEXT, tax_code TEXT, address TEXT"


def _rows(n: int, tag: str) -> list[tuple[str, str, str, str]]:
    return [(f"{tag}{i:06}", f"Customer {i}", f"TX{i:08}", f"{i} Main Street") for i in range(n)]


def _insert(conn: sqlite3.Connection, table: str, rows: list[Any], per_txn: int) -> float:
    sql = f"INSERT INTO {table} (code, name, tax_code, address) VALUES (?, ?, ?, ?)"
    started = time.perf_counter()
    for i in range(0, len(rows), per_txn):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, rows[i : i + per_txn])
        conn.execute("COMMIT")
    return time.perf_counter() - started


#: The node's side while the app writes: what ``node run``'s capture pump does.
PUMP = """
import sys, time
from engine.node import Node
from engine.transport.pump import POLL_S
with Node.open(sys.argv[1]) as n:
    print("ready", flush=True)
    while True:
        if not n.drain_captured().changes:
            time.sleep(POLL_S)
"""


def live_run(root: Path, n: int, per_txn: int) -> float:
    """Seconds from the app's first insert until all ``n`` rows are records,
    with a node process draining meanwhile."""
    home = root / f"live-{per_txn}-{time.monotonic_ns()}"
    Node.create(home, dataset="bench", node="A").close()
    app = sqlite3.connect(NodeStore.file_in(home), isolation_level=None, timeout=30)
    app.execute(f"CREATE TABLE till_customers ({COLUMNS})")
    with Node.open(home) as node:
        node.enable_capture("till_customers", "customers")
    pump = subprocess.Popen(
        [sys.executable, "-c", PUMP, str(home)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert pump.stdout is not None and pump.stdout.readline() == "ready\n"
        started = time.perf_counter()
        _insert(app, "till_customers", _rows(n, "L"), per_txn)
        while True:
            done = app.execute(
                "SELECT COUNT(*) FROM records WHERE collection = 'customers' AND deleted = 0"
            ).fetchone()[0]
            if done >= n:
                return time.perf_counter() - started
            time.sleep(0.005)
    finally:
        pump.kill()
        pump.wait(10)
        app.close()


def one_run(root: Path, n: int, per_txn: int) -> dict[str, float]:
    home = root / f"home-{per_txn}-{time.monotonic_ns()}"
    node = Node.create(home, dataset="bench", node="A")
    app = sqlite3.connect(NodeStore.file_in(home), isolation_level=None, timeout=30)
    try:
        app.execute(f"CREATE TABLE plain_customers ({COLUMNS})")
        app.execute(f"CREATE TABLE till_customers ({COLUMNS})")
        node.enable_capture("till_customers", "customers")
        plain_s = _insert(app, "plain_customers", _rows(n, "P"), per_txn)
        app_s = _insert(app, "till_customers", _rows(n, "C"), per_txn)
        started = time.perf_counter()
        while node.drain_captured().changes:
            pass
        drain_s = time.perf_counter() - started
        assert node.count("customers") == n, node.capture_status()
        put_s = 0.0
        if per_txn == 1:
            started = time.perf_counter()
            for code, name, tax, address in _rows(n, "Q"):
                node.put(
                    "customers", {"code": code, "name": name, "tax_code": tax, "address": address}
                )
            put_s = time.perf_counter() - started
    finally:
        app.close()
        node.close()
    live_s = live_run(root, n, per_txn)
    return {
        "plain_s": plain_s,
        "app_s": app_s,
        "drain_s": drain_s,
        "live_s": live_s,
        "put_s": put_s,
    }


def measure(n: int, runs: int) -> list[dict[str, Any]]:
    out = []
    with tempfile.TemporaryDirectory(prefix="bench-capture-") as d:
        for per_txn in (1, 100):
            samples = [one_run(Path(d), n, per_txn) for _ in range(runs)]

            def med(key: str, samples: list[dict[str, float]] = samples) -> float:
                return statistics.median(s[key] for s in samples)

            plain = n / med("plain_s")
            captured = n / statistics.median(s["app_s"] + s["drain_s"] for s in samples)
            row: dict[str, Any] = {
                "rows_per_app_transaction": per_txn,
                "rows": n,
                "runs": runs,
                "plain_rows_per_s": plain,
                "captured_rows_per_s": captured,
                "ratio": captured / plain,
                "captured_live_rows_per_s": n / med("live_s"),
                "ratio_live": n / med("live_s") / plain,
                "app_side_rows_per_s": n / med("app_s"),
                "drain_rows_per_s": n / med("drain_s"),
                "samples": samples,
            }
            if per_txn == 1:
                row["node_put_per_s"] = n / med("put_s")
            out.append(row)
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| rows per app transaction | plain inserts/s | captured rows/s (app, then drain) | "
        "ratio | captured rows/s (node running) | ratio | app side alone/s | drain rows/s "
        "| Node.put/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        put = f"{r['node_put_per_s']:,.0f}" if "node_put_per_s" in r else "-"
        lines.append(
            f"| {r['rows_per_app_transaction']} | {r['plain_rows_per_s']:,.0f} | "
            f"{r['captured_rows_per_s']:,.0f} | {r['ratio']:.2f}x | "
            f"{r['captured_live_rows_per_s']:,.0f} | {r['ratio_live']:.2f}x | "
            f"{r['app_side_rows_per_s']:,.0f} | {r['drain_rows_per_s']:,.0f} | {put} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m bench.capture",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    opts = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {**run_facts(argv, "bench.capture"), "load_at_start": load_facts()}
    with tempfile.TemporaryDirectory() as d:
        doc["machine"] = machine_facts(Path(d))
    doc["result"] = measure(opts.rows, opts.runs)
    doc["load_at_end"] = load_facts()
    doc["goal_ratio"] = GOAL
    out = RESULTS / "capture.json"
    out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
    print(markdown(doc["result"]))
    print(
        f"load {doc['load_at_start']['loadavg_1_5_15'][0]:.1f} -> "
        f"{doc['load_at_end']['loadavg_1_5_15'][0]:.1f}; wrote {out.relative_to(ROOT)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
