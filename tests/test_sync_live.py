"""Node sync over real websockets on loopback: the relay server (RelayServer
in a thread, or `branchline relay serve`) and `branchline node run`
subprocesses; `branchline sync` exit codes; `status --json` shape.

Timing assertions are generous bounds; the real figures are printed (-s)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.node import Node
from engine.relay.server import RelayServer, ServerLimits
from engine.relay.sqlite_store import RelayLimits, SqliteRelayStore
from harness.net import free_port

BRANCHLINE = [str(Path(sys.executable).parent / "branchline")]


class ThreadRelay:
    """The real ``RelayServer`` on its own event loop in a background thread,
    so the test can start and stop it while node processes run."""

    def __init__(
        self,
        store_path: Path,
        port: int,
        *,
        limits: ServerLimits | None = None,
        store_limits: RelayLimits | None = None,
    ) -> None:
        self.store_path = store_path
        self.port = port
        self.limits = limits
        self.store_limits = store_limits
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: RelayServer | None = None

    def start(self) -> None:
        self.store = SqliteRelayStore.open(self.store_path, limits=self.store_limits)
        self.server = RelayServer(self.store, host="127.0.0.1", port=self.port, limits=self.limits)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)

    def stop(self) -> None:
        assert self.server is not None
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.store.close()


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BRANCHLINE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def init_home(home: Path, node: str, port: int, token: str) -> None:
    out = cli(
        "node", "init", "--home", str(home), "--dataset", "acme", "--node", node,
        "--relay", f"ws://127.0.0.1:{port}/", "--token", token,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr


def has(home: Path, code: str) -> bool:
    with Node.open(home) as n:
        return n.get("customers", code) is not None


def wait_for(predicate: object, timeout: float) -> float:
    """Seconds until predicate() is true; fails after timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"not true after {timeout} s")


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Path, int, dict[str, str]]]:
    store_path = tmp_path / "relay.db"
    store = SqliteRelayStore.create(store_path)
    tokens = {n: store.enroll("acme", n).token for n in ("A", "B")}
    store.close()
    yield store_path, free_port(), tokens


def test_offline_work_then_relay_then_live_changes(
    tmp_path: Path, setup: tuple[Path, int, dict[str, str]]
) -> None:
    store_path, port, tokens = setup
    homes = {n: tmp_path / n for n in ("A", "B")}
    for n, home in homes.items():
        init_home(home, n, port, tokens[n])
        out = cli(
            "put", "--home", str(home), "customers", json.dumps({"code": f"C-{n}", "name": n})
        )
        assert out.returncode == 0, out.stderr
    runs = {
        n: subprocess.Popen(
            [*BRANCHLINE, "node", "run", "--home", str(home), "--backoff-max", "0.5"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for n, home in homes.items()
    }
    relay = ThreadRelay(store_path, port)
    try:
        time.sleep(1.0)  # the nodes try, fail and back off
        status = json.loads(cli("status", "--home", str(homes["A"]), "--json").stdout)
        assert status["online"] is False and status["pending"]["customers"] == 1
        relay.start()
        restored = time.monotonic()
        wait_for(lambda: has(homes["B"], "C-A") and has(homes["A"], "C-B"), 10)
        converged = time.monotonic() - restored
        # A change made by another process on A's home, while linked.
        wait_for(
            lambda: json.loads(cli("status", "--home", str(homes["B"]), "--json").stdout)["online"],
            10,
        )
        put_at = time.monotonic()
        out = cli("put", "--home", str(homes["A"]), "customers", '{"code": "C-live", "name": "x"}')
        assert out.returncode == 0
        wait_for(lambda: has(homes["B"], "C-live"), 10)
        live = time.monotonic() - put_at
        print(f"\nlink restored -> offline changes converged: {converged:.3f} s")
        print(f"change by a CLI process on A -> visible on B: {live:.3f} s (includes CLI start)")
        assert converged < 5 and live < 5
        status = json.loads(cli("status", "--home", str(homes["A"]), "--json").stdout)
        assert set(status) >= {
            "dataset", "node", "online", "last_sync", "pending", "conflicts", "failures",
        }  # fmt: skip
        assert status["dataset"] == "acme" and status["node"] == "A"
        assert status["online"] is True and isinstance(status["last_sync"], int)
        assert status["failures"] == {"upload": 0, "download": 0}
        wait_for(
            lambda: (
                json.loads(cli("status", "--home", str(homes["A"]), "--json").stdout)["pending"][
                    "customers"
                ]
                == 0
            ),
            5,
        )
        # Offline mode: the running node drops the link.
        assert cli("node", "offline", "--home", str(homes["A"])).returncode == 0
        wait_for(
            lambda: (
                json.loads(cli("status", "--home", str(homes["A"]), "--json").stdout)["state"]
                == "offline mode"
            ),
            5,
        )
        human = cli("status", "--home", str(homes["A"]))
        assert human.returncode == 0 and "offline mode" in human.stdout
    finally:
        for proc in runs.values():
            proc.send_signal(signal.SIGTERM)
        logs = {n: proc.communicate(timeout=15)[1] for n, proc in runs.items()}
        if relay.thread.is_alive():
            relay.stop()
    for n, proc in runs.items():
        assert proc.returncode == 0, logs[n]
        assert tokens[n] not in logs[n]  # never log the token
        assert "online" in logs[n] and "offline: cannot reach the relay" in logs[n]
        assert logs[n].count("offline: ") == 1  # once, not once per attempt


def test_sync_exit_codes(tmp_path: Path, setup: tuple[Path, int, dict[str, str]]) -> None:
    store_path, port, tokens = setup
    home = tmp_path / "A"
    init_home(home, "A", port, tokens["A"])
    cli("put", "--home", str(home), "customers", '{"code": "C1", "name": "x"}')
    down = cli("sync", "--home", str(home), "--timeout", "10")
    assert down.returncode == 1
    assert down.stderr.startswith("error: cannot reach the relay") and down.stderr.count("\n") == 1
    relay = ThreadRelay(store_path, port)
    relay.start()
    try:
        bad = tmp_path / "bad"
        init_home(bad, "A", port, "wrong-token")
        refused = cli("sync", "--home", str(bad), "--timeout", "10")
        assert refused.returncode == 2, refused.stderr
        assert "token" in refused.stderr and refused.stderr.count("\n") == 1
        ok = cli("sync", "--home", str(home), "--timeout", "20", "--json")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["synced"] is True
        status = json.loads(cli("status", "--home", str(home), "--json").stdout)
        assert status["pending"]["customers"] == 0 and status["last_sync"]
        assert status["online"] is False  # no `node run` is running
    finally:
        relay.stop()


if os.environ.get("BRANCHLINE_SKIP_LIVE"):  # pragma: no cover - opt-out on slow CI
    pytestmark = pytest.mark.skip("BRANCHLINE_SKIP_LIVE set")


def test_sync_through_the_real_relay_process(
    tmp_path: Path, setup: tuple[Path, int, dict[str, str]]
) -> None:
    """`branchline relay serve` (RelayServer) with `branchline sync` on two homes."""
    store_path, port, tokens = setup
    homes = {n: tmp_path / n for n in ("A", "B")}
    for n, home in homes.items():
        init_home(home, n, port, tokens[n])
        cli("put", "--home", str(home), "customers", json.dumps({"code": f"C-{n}", "name": n}))
    relay = subprocess.Popen(
        [*BRANCHLINE, "relay", "serve", str(store_path), "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: listening(port), 10)
        for n in ("A", "B", "A"):
            out = cli("sync", "--home", str(homes[n]), "--timeout", "20")
            assert out.returncode == 0, out.stderr
        assert has(homes["A"], "C-B") and has(homes["B"], "C-A")
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.communicate(timeout=15)
