"""Local writes during a catch-up: latency of ``put`` on a branch server
(``branchline node serve``, its sync loop in the same event loop) while it
receives a large upload from another node through the relay.

    python -m bench.stall                    # 100,000 records; bench/results/stall.json
    python -m bench.stall --records 10000    # smaller

One workstation client sends a ``put`` every ``INTERVAL_S`` on a fixed
schedule (open loop, one connection): latency is taken from the scheduled
send time, so the puts due while the server's event loop is stalled all
count the stall, as a workstation's user would feel it. First
``IDLE_S`` seconds with nothing to receive, then A (``branchline sync`` in
its own process) uploads its offline records; the puts go on until the
server's ``records`` table holds them all. Target (issue 14): put p99 <= 50 ms
during the catch-up. Wall-clock figures: the load average and the server's
CPU time are recorded with them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from engine.node import Node
from engine.relay.sqlite_store import SqliteRelayStore
from engine.users import add_user

from .http_api import Conn, _serve, _summary
from .stats import load_facts, machine_facts, run_facts
from .sync import BRANCHLINE, Relay, free_port, make_home, records_in, run_state, wait_until
from .workload import COLLECTION, DATASET, build_source, write_schema

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
INTERVAL_S = 0.05
IDLE_S = 3.0
TARGET_P99_MS = 50.0
SEED = 7


async def _puts(
    port: int, token: str, stop: asyncio.Event, marks: dict[str, float]
) -> list[tuple[float, float]]:
    """(scheduled send time, latency ms) of every put until ``stop``."""
    conn = await Conn.open(port, token)
    out: list[tuple[float, float]] = []
    due = time.perf_counter()
    i = 0
    try:
        # Until every put due before the stop was answered: the ones due
        # during a stall are sent after it and must count it.
        while not (stop.is_set() and due > marks["caught_up"]):
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            body = json.dumps({"code": f"W{i:06d}", "name": f"quầy {i}"}).encode()
            status = await conn.request("PUT", f"/api/v1/records/{COLLECTION}", body)
            if status != 200:
                raise AssertionError(f"put: HTTP {status}")
            out.append((due, (time.perf_counter() - due) * 1000))
            due += INTERVAL_S
            i += 1
    finally:
        conn.close()
    return out


def _server_cpu(pid: int) -> float:
    """CPU time (user + system) of process ``pid`` so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=RESULTS) as tmpdir:
        tmp = Path(tmpdir)
        schema = write_schema(tmp)
        store_path = tmp / "relay.db"
        with SqliteRelayStore.create(store_path) as store:
            tokens = {name: store.enroll(DATASET, name).token for name in ("A", "B")}
        relay = Relay(store_path)
        try:
            home_a = make_home(tmp, "A", relay.url, tokens["A"], schema)
            home_b = make_home(tmp, "B", relay.url, tokens["B"], schema)
            update, _ = build_source(n, seed=SEED, node="A")
            with Node.open(home_a) as a:
                a.import_updates({COLLECTION: update})
            with Node.open(home_b) as b:
                token = add_user(b, "ws", read_only=False, now_ms=1)
            port = free_port()
            server = _serve(home_b, port)
            try:
                wait_until(lambda: run_state(home_b) == "online", 30, "B online", 0.05)
                return asyncio.run(_run(port, token, server.pid, home_a, home_b, n))
            finally:
                server.terminate()
                server.wait(60)
        finally:
            relay.stop()


async def _run(port: int, token: str, pid: int, home_a: Path, home_b: Path, n: int) -> dict[
    str, Any
]:  # fmt: skip
    stop = asyncio.Event()
    marks: dict[str, float] = {}
    putter = asyncio.create_task(_puts(port, token, stop, marks))
    await asyncio.sleep(IDLE_S)
    cpu0 = _server_cpu(pid)
    marks["sync_start"] = time.perf_counter()
    sync = await asyncio.create_subprocess_exec(
        BRANCHLINE, "sync", "--home", str(home_a), "--timeout", "600",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    while records_in(home_b) < n:  # B's own puts are counted too: they only add
        await asyncio.sleep(0.05)
    marks["caught_up"] = time.perf_counter()
    cpu1 = _server_cpu(pid)
    stop.set()
    samples = await putter
    await sync.wait()
    idle = [ms for t, ms in samples if t < marks["sync_start"]]
    during = [ms for t, ms in samples if marks["sync_start"] <= t <= marks["caught_up"]]
    return {
        "records": n,
        "catch_up_s": marks["caught_up"] - marks["sync_start"],
        "server_cpu_s_during": cpu1 - cpu0,
        "put_idle_ms": _summary(idle),
        "put_during_ms": _summary(during),
        "sync_exit": sync.returncode,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m bench.stall",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--records", type=int, default=100_000)
    opts = parser.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {**run_facts(argv, "bench.stall"), "load_at_start": load_facts()}
    with tempfile.TemporaryDirectory() as d:
        doc["machine"] = machine_facts(Path(d))
    doc["result"] = measure(opts.records)
    doc["load_at_end"] = load_facts()
    doc["target_put_p99_ms"] = TARGET_P99_MS
    out = RESULTS / "stall.json"
    out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
    r = doc["result"]
    print(
        f"{r['records']:,} records caught up in {r['catch_up_s']:.2f} s "
        f"(server CPU {r['server_cpu_s_during']:.2f} s); put idle p50 "
        f"{r['put_idle_ms']['p50']:.1f} ms p99 {r['put_idle_ms']['p99']:.1f} ms; during "
        f"p50 {r['put_during_ms']['p50']:.1f} ms p99 {r['put_during_ms']['p99']:.1f} ms "
        f"max {r['put_during_ms']['max']:.0f} ms ({r['put_during_ms']['samples']} puts); "
        f"load {doc['load_at_start']['loadavg_1_5_15'][0]:.1f} -> "
        f"{doc['load_at_end']['loadavg_1_5_15'][0]:.1f}; wrote {out.relative_to(ROOT)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
