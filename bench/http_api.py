"""Branch server API latency: ``put`` and ``status`` with 10 concurrent
workstation clients on loopback against a real ``branchline node serve``.

    python -m bench.http_api            # bench/results/http_api.json
    python -m bench.http_api --quick    # fewer requests; http_api-quick.json

Each client is an HTTP/1.1 keep-alive connection (httpx2) with its own
token; the put phase writes a distinct customer per request (each one a
durable SQLite commit on the server's API thread), then the status phase
reads the status. Targets: put p99 <= 10 ms, status p99 <= 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2

from engine.node import Node
from engine.users import add_user

CLIENTS = 10
BRANCHLINE = str(Path(sys.executable).parent / "branchline")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


async def _phase(base: str, tokens: list[str], per_client: int, kind: str) -> list[float]:
    times: list[float] = []

    async def client(i: int, token: str) -> None:
        h = {"Authorization": f"Bearer {token}"}
        async with httpx2.AsyncClient(base_url=base, headers=h, timeout=30) as c:
            for j in range(per_client):
                t = time.perf_counter()
                if kind == "put":
                    r = await c.put(
                        "/api/v1/records/customers",
                        json={"code": f"C{i}-{j}", "name": f"khách {j}"},
                    )
                else:
                    r = await c.get("/api/v1/status")
                times.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200, r.text

    await asyncio.gather(*(client(i, tok) for i, tok in enumerate(tokens)))
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    per_client = 50 if args.quick else 300
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "hn"
        with Node.create(home, dataset="acme", node="HN") as n:
            tokens = [add_user(n, f"ws{i}", read_only=False, now_ms=1) for i in range(CLIENTS)]
        port = _free_port()
        proc = subprocess.Popen(
            [BRANCHLINE, "node", "serve", "--home", str(home), "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(200):
                try:
                    if httpx2.get(base + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx2.HTTPError:
                    time.sleep(0.1)
            asyncio.run(_phase(base, tokens, 5, "put"))  # warm-up
            puts = asyncio.run(_phase(base, tokens, per_client, "put"))
            statuses = asyncio.run(_phase(base, tokens, per_client, "status"))
        finally:
            proc.terminate()
            proc.wait(30)
    result: dict[str, Any] = {
        "clients": CLIENTS,
        "requests_per_client": per_client,
        "load_average": os.getloadavg(),
        "put_ms": {"p50": _pct(puts, 0.5), "p99": _pct(puts, 0.99), "max": max(puts)},
        "status_ms": {
            "p50": _pct(statuses, 0.5),
            "p99": _pct(statuses, 0.99),
            "max": max(statuses),
        },
        "targets_ms": {"put_p99": 10, "status_p99": 5},
    }
    out = Path("bench/results") / ("http_api-quick.json" if args.quick else "http_api.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
