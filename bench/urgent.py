"""Time to the first urgent record: a branch comes back online with 100,000
ordinary changes queued (a supplier list imported offline) and one unpaid
sales invoice (``urgent_when = { paid = false }``) for a customer, item and
warehouse made offline too. Timed from A's sync start until B (``branchline
node run``) shows the invoice, and until it shows all the suppliers.

    python -m bench.urgent                     # 100,000 suppliers; bench/results/urgent.json
    python -m bench.urgent --records 10000
    python -m bench.urgent --line-mbps 0       # A on loopback, no line limit

A reaches the relay over a slow line (``--line-mbps``, 8 Mbit/s each way by
default, a branch office's uplink; harness.faults ``FaultProxy.limit``): on
loopback every document goes at once and the order barely shows.

Two runs on copies of one prepared home: ``urgent first`` as the engine
syncs, and ``document order`` with ``Node.urgent_docs`` made to return
nothing (in this process, for every Node), which is the order before urgent
records were taken first. Goal (issue 15): first urgent record on B <= 1 s. The
urgent documents query's own cost at this queue size is measured too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from engine.node import Node
from engine.relay.sqlite_store import SqliteRelayStore
from engine.transport import node_sync
from harness.faults.proxy import ProxyHost

from .stats import load_facts, machine_facts, run_facts
from .sync import BRANCHLINE, Relay, node_run, records_in, run_state, say, stop, wait_until

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DATASET = "acme"
GOAL_S = 1.0
CHUNK = 5_000
URGENT_DOCS = Node.urgent_docs


def _no_urgent_docs(node: Node) -> set[str]:
    """The order before urgent records went first: no document is urgent."""
    return set()


def prepare(home: Path, n: int) -> dict[str, float]:
    """A's offline work: ``n`` suppliers, then a warehouse, an item, a
    customer and the customer's unpaid invoice."""
    started = time.perf_counter()
    with Node.create(home, dataset=DATASET, node="A") as a:
        for first in range(0, n, CHUNK):
            a.batch(
                (lambda node, i=i: node.put("suppliers", {"code": f"S{i:06}", "name": f"S {i}"}))
                for i in range(first, min(n, first + CHUNK))
            )
        a.put("warehouses", {"code": "K1", "name": "Main store"})
        a.put("items", {"code": "I1", "name": "Tea", "unit": "kg", "price": "10"})
        a.put("customers", {"code": "WALKIN", "name": "Walk-in customer"})
        a.post_voucher(
            "sales_invoice",
            {"date": time.strftime("%Y-%m-%d"), "customer": "WALKIN", "warehouse": "K1",
             "lines": [{"item": "I1", "qty": "1", "price": "10", "vat_rate": "10"}]},
        )  # fmt: skip
        t = time.perf_counter()
        docs = a.urgent_docs()
        query_s = time.perf_counter() - t
        assert docs, "the invoice should be urgent"
        assert a.urgent_pending()["sales_invoice"] == 1
    return {"build_s": time.perf_counter() - started, "urgent_query_s": query_s}


def one_run(
    tmp: Path, prepared: Path, n: int, urgent_first: bool, line_mbps: float
) -> dict[str, float]:
    tmp.mkdir(parents=True)
    store_path = tmp / "relay.db"
    with SqliteRelayStore.create(store_path) as store:
        tokens = {name: store.enroll(DATASET, name).token for name in ("A", "B")}
    relay = Relay(store_path)
    lines = ProxyHost()
    line = lines.add(relay.port)
    if line_mbps:
        lines.call(lambda: line.limit(line_mbps * 1e6 / 8))
    home_a, home_b = tmp / "A", tmp / "B"
    shutil.copytree(prepared, home_a)
    subprocess.run(
        [BRANCHLINE, "node", "config", "--home", str(home_a),
         "--relay", f"ws://127.0.0.1:{line.port}/", "--token", tokens["A"]],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        [BRANCHLINE, "node", "init", "--home", str(home_b), "--dataset", DATASET, "--node", "B",
         "--relay", relay.url, "--token", tokens["B"]], check=True, capture_output=True,
    )  # fmt: skip
    run_b = node_run(home_b)
    seen: dict[str, float] = {}
    done = threading.Event()

    def watch(t0: float) -> None:
        while not done.is_set():
            now = time.monotonic()
            if "urgent" not in seen and records_in(home_b, "sales_invoice") >= 1:
                seen["urgent"] = now - t0
            if "all" not in seen and records_in(home_b, "suppliers") >= n:
                seen["all"] = now - t0
            if len(seen) == 2:
                return
            time.sleep(0.005)

    try:
        wait_until(lambda: run_state(home_b) == "online", 20, "B online", 0.05)
        with Node.open(home_a) as a:
            # The class, not this instance: node_sync's thread opens a Node of its own.
            if not urgent_first:
                Node.urgent_docs = _no_urgent_docs  # type: ignore[method-assign]
            t0 = time.monotonic()
            watcher = threading.Thread(target=watch, args=(t0,), daemon=True)
            watcher.start()
            asyncio.run(node_sync(a, timeout=600))
            upload = time.monotonic() - t0
        watcher.join(600)
    finally:
        Node.urgent_docs = URGENT_DOCS  # type: ignore[method-assign]
        done.set()
        stop(run_b)
        sent = lines.call(lambda: line.counters.bytes_up)
        lines.close()
        relay.stop()
    if len(seen) != 2:
        raise SystemExit(f"B did not show everything: {seen}")
    return {
        "first_urgent_s": seen["urgent"],
        "all_s": seen["all"],
        "upload_s": upload,
        "bytes_up": sent,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.urgent", description=__doc__)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--line-mbps", type=float, default=8.0, help="A's line to the relay; 0: no limit"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "urgent.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="branchline-bench-urgent-") as d:
        tmp = Path(d)
        load_before = load_facts()
        say(f"preparing A: {args.records:,} suppliers and one unpaid invoice, offline")
        prep = prepare(tmp / "prepared", args.records)
        runs: dict[str, list[dict[str, float]]] = {"urgent first": [], "document order": []}
        for r in range(args.runs):
            for mode in runs:
                got = one_run(tmp / f"{mode.replace(' ', '-')}-{r}", tmp / "prepared",
                              args.records, mode == "urgent first", args.line_mbps)  # fmt: skip
                runs[mode].append(got)
                say(f"{mode}: first urgent on B {got['first_urgent_s']:.2f} s, "
                    f"all {got['all_s']:.2f} s")  # fmt: skip
        medians = {
            mode: {k: sorted(x[k] for x in rs)[len(rs) // 2] for k in rs[0]}
            for mode, rs in runs.items()
        }
        doc: dict[str, Any] = {
            "benchmark": "bench.urgent",
            "workload": (
                f"{args.records:,} supplier puts, then a warehouse, an item and a customer "
                "made offline on A, then one unpaid sales invoice of them; B runs `branchline "
                "node run`; timed from A's sync start until B's records table shows the "
                "invoice / all suppliers (polled every "
                f"5 ms). A reaches the relay over a line of {args.line_mbps} Mbit/s each way "
                "(harness.faults FaultProxy.limit); B over loopback. Median of the runs."
            ),
            "records": args.records,
            "line_mbps": args.line_mbps,
            "goal_first_urgent_s": GOAL_S,
            "prepare": prep,
            "runs": runs,
            "median": medians,
            "met": medians["urgent first"]["first_urgent_s"] <= GOAL_S,
            "machine": machine_facts(tmp),
            "load_before": load_before,
            "load_after": load_facts(),
            "run": run_facts(argv or [], "bench.urgent"),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    say(f"written {args.out}")
    for mode, m in medians.items():
        say(f"median {mode}: first urgent {m['first_urgent_s']:.2f} s, all {m['all_s']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
