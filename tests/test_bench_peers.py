"""The peers benchmark's harness (not its timings): the report renders a
given result, and the quickest load paths run end to end on loopback.

Peers that need installing (pycrdt-websocket, y-websocket) are exercised
only when ``bench/.peers`` already holds them, never installed by a test."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from bench import report_peers
from bench.fanout import KEY, Load, build_updates, frames_for, run_load, y_update_message
from bench.peer_env import Server, ensure_pycrdt, ensure_y_websocket
from bench.sync import free_port


def _latency() -> dict[str, Any]:
    return {"samples": 4, "p50_ms": 2.0, "p90_ms": 3.0, "p99_ms": 4.0, "max_ms": 5.0}


def _run(n: int, delivered: float) -> dict[str, Any]:
    load = {"loadavg_1_5_15": [1.0, 1.0, 1.0]}
    return {
        "nodes": n,
        "sent": 100,
        "in_per_s": delivered / 2,
        "delivered_per_s": delivered,
        "delivered_fraction": 1.0,
        "latency": _latency(),
        "server": {"cpu_s": 1.0, "peak_rss_mb": 50.0},
        "load_before": load,
        "load_after": load,
        "errors": [],
        "repeats": {
            "delivered_per_s": {"runs": [delivered], "median": delivered, "spread_pct": 0.0}
        },
    }


def sample_doc() -> dict[str, Any]:
    load = {"loadavg_1_5_15": [1.5, 1.2, 1.0]}
    systems = {
        "plain": 10_000.0,
        "branchline": 4_000.0,
        "y-websocket": 3_000.0,
        "pycrdt-websocket": 500.0,
    }
    return {
        "date": "2026-11-23T20:00:00+00:00",
        "command": "python -m bench.peers",
        "mode": "full",
        "wall_s": 100.0,
        "git_commit": "0123456789abcdef",
        "engine_uncommitted_changes": False,
        "machine": {
            "cpu_model": "Test CPU",
            "cpus_usable": 2,
            "memory_mib": 2048,
            "python": "3.11",
            "pycrdt": "0.14.13",
            "sqlite": "3.40",
            "tmp_filesystem": {"type": "ext4"},
        },
        "sizes": {"nodes": [3, 10]},
        "load_at_start": load,
        "load_at_end": load,
        "peers": {
            "pycrdt-websocket": {"name": "pycrdt-websocket", "ready": True, "versions": {"x": "1"}},
            "y-websocket": {"name": "y-websocket", "ready": False, "reason": "no node"},
        },
        "benchmarks": {
            "fanout": {
                "workload": "the fan-out workload",
                "systems": {
                    s: {"note": f"{s} note", "runs": [_run(3, v), _run(10, v / 2)]}
                    for s, v in systems.items()
                },
            },
            "executemany": {"workload": "w", "rows_per_s": {"median": 100_000.0, "spread_pct": 3}},
            "fsync": {
                "rounds": 10,
                "file_write_fsync": _latency(),
                "sqlite_wal_full_commit": _latency(),
            },
            "catchup": {
                "workload": "catch-up workload",
                "systems": {
                    "branchline": [
                        {
                            "records": 100_000,
                            "update_bytes": 4e7,
                            "upload_s": 6.0,
                            "download_s": 4.0,
                            "load_before": load,
                            "load_after": load,
                        },
                    ],
                    "y-websocket": {"skipped": "no node"},
                },
            },
        },
    }


def test_report_renders_goals_tables_and_verdicts() -> None:
    doc = sample_doc()
    text = report_peers.render(doc, None, "bench/results/peers.json", {"fanout": "img/f.png"})
    assert text.startswith(report_peers.BEGIN) and text.rstrip().endswith(report_peers.END)
    # 4,000 / 500 = 8x pycrdt-websocket: under the 10x goal, said so with the ratio
    assert "| Relay fan-out, N=3 | delivered/s vs pycrdt-websocket | 8.00× | ≥ 10.0× |" in text
    assert "**missed** (0.80× the target)" in text
    # 40 % of the plain broadcast: the 30 % goal is met
    assert "share of the plain-broadcast limit | 40 % | ≥ 30 % | **met** |" in text
    assert "| Catch-up 100,000 records | upload: on the online node | 6.00 s | ≤ 2.00 s |" in text
    assert "y-websocket**: SKIPPED — no node" in text
    assert "![delivered/s vs nodes](img/f.png)" in text
    assert "4,000" in text and "100,000 rows/s" in text
    goals = report_peers.peer_goals(doc, None)
    vs_y = [g for g in goals if "y-websocket" in g.figure]
    assert vs_y and all(g.met is True for g in vs_y)  # 4,000 vs 3,000: ahead


def test_report_plots_pngs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is a bench extra: pip install -e .[bench]")
    plots = report_peers.plot(sample_doc(), tmp_path, "img")
    assert set(plots) == {"fanout", "latency", "catchup"}
    for rel in plots.values():
        png = tmp_path / Path(rel).name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_updates_carry_their_key_for_the_receivers() -> None:
    updates = build_updates(7, 3)
    msg = y_update_message(updates[2])
    assert [(int(m[1]), int(m[2])) for m in KEY.finditer(msg)] == [(7, 2)]
    frames = frames_for("branchline", 7, 40, batch=16)
    assert [count for _, count in frames] == [16, 16, 8]
    assert len(KEY.findall(frames[0][0])) == 16


def test_plain_broadcast_fanout_smoke(tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "bench.plain_broadcast", "--port", str(port)]
    server = Server(cmd, port, tmp_path / "plain.log")
    try:
        res = run_load("y", f"ws://127.0.0.1:{port}/", Load(3, 20, 8, 1, 10.0, 2.0))
    finally:
        server.stop()
    assert res["sent"] == res["confirmed"] == 60
    assert res["delivered"] == res["delivered_expected"] == 120
    assert res["latency"]["samples"] == 120


@pytest.mark.parametrize("peer", ["pycrdt-websocket", "y-websocket"])
def test_peer_fanout_smoke_when_installed(peer: str, tmp_path: Path) -> None:
    found = (
        ensure_pycrdt(install=False)
        if peer == "pycrdt-websocket"
        else ensure_y_websocket(install=False)
    )
    if not found.ready:
        pytest.skip(f"{peer} is not installed in bench/.peers ({found.reason}); "
                    "`make bench-quick` installs it")  # fmt: skip
    port = free_port()
    if peer == "pycrdt-websocket":
        cmd, env = [*found.command, "--port", str(port), "--db", str(tmp_path / "y.db")], {}
    else:
        cmd, env = found.command, {"HOST": "127.0.0.1", "PORT": str(port)}
    server = Server(cmd, port, tmp_path / "peer.log", env)
    try:
        res = run_load("y", f"ws://127.0.0.1:{port}/", Load(3, 10, 4, 1, 20.0, 3.0))
    finally:
        server.stop()
    assert res["delivered"] == res["delivered_expected"] == 60
