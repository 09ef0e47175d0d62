"""`branchline node serve` as a real process against a real relay on
loopback: the API writes, the sync loop ships them, the event stream
pushes status, sync now answers, SIGTERM stops it with exit 0, and neither
the access log nor any other line shows a token."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import httpx2
import pytest

from engine.node import Node
from engine.relay.sqlite_store import SqliteRelayStore
from engine.users import add_user
from tests.test_sync_live import BRANCHLINE, ThreadRelay, free_port, init_home, wait_for


def test_serve_syncs_streams_and_never_logs_tokens(tmp_path: Path) -> None:
    store_path = tmp_path / "relay.db"
    store = SqliteRelayStore.create(store_path)
    relay_token = store.enroll("acme", "HN").token
    store.close()
    relay_port, port = free_port(), free_port()
    relay = ThreadRelay(store_path, relay_port)
    relay.start()
    home = tmp_path / "hn"
    init_home(home, "HN", relay_port, relay_token)
    with Node.open(home) as n:
        token = add_user(n, "kt", read_only=False, now_ms=1)
    proc = subprocess.Popen(
        # -v: every log line there is (debug, the access log) is checked for tokens.
        [*BRANCHLINE, "node", "serve", "--home", str(home), "--listen", f"127.0.0.1:{port}", "-v"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    h = {"Authorization": f"Bearer {token}"}
    try:

        def up() -> bool:
            try:
                return httpx2.get(base + "/healthz", timeout=1).status_code == 200
            except httpx2.HTTPError:
                return False

        wait_for(up, 20)
        assert (
            httpx2.get(
                base + "/api/v1/status", headers={"Authorization": "Bearer wrong"}
            ).status_code
            == 401
        )
        r = httpx2.put(
            base + "/api/v1/records/customers", headers=h, json={"code": "KH001", "name": "An Phát"}
        )
        assert r.status_code == 200, r.text

        def synced() -> bool:
            st = httpx2.get(base + "/api/v1/status", headers=h).json()
            return bool(st["online"] and st["pending_total"] == 0 and st["last_sync"])

        wait_for(synced, 20)
        with httpx2.stream("GET", base + "/api/v1/events", headers=h, timeout=10) as events:
            lines = events.iter_lines()
            assert next(lines) == "event: status"
            first = json.loads(next(lines).removeprefix("data: "))
            assert first["node"] == "HN" and first["online"] is True
        now = httpx2.post(base + "/api/v1/sync", headers=h)
        assert now.status_code == 202 and now.json()["started"] is True
        wait_for(synced, 20)
        assert "branchline_node_sync_pass_seconds_count" in httpx2.get(base + "/metrics").text
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        relay.stop()
    assert proc.returncode == 0, err
    assert "GET /api/v1/status" in out + err  # the access log is on with -v (stdout)
    assert token not in out + err and relay_token not in out + err


@pytest.mark.parametrize(
    "args",
    [["--listen", "0.0.0.0:8470"], ["--tls-cert", __file__]],
)
def test_serve_refuses_public_bind_and_half_tls(tmp_path: Path, args: list[str]) -> None:
    home = tmp_path / "h"
    Node.create(home, dataset="acme", node="HN").close()
    out = subprocess.run(
        [*BRANCHLINE, "node", "serve", "--home", str(home), *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == 2 and out.stderr.startswith("error: ")


def test_users_commands(tmp_path: Path) -> None:
    home = tmp_path / "h"
    Node.create(home, dataset="acme", node="HN").close()

    def cli(*a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*BRANCHLINE, "node", "users", *a, "--home", str(home)],
                              capture_output=True, text=True, timeout=30, check=False)  # fmt: skip

    added = cli("add", "kt", "--read-only")
    assert added.returncode == 0 and len(added.stdout.strip()) >= 40
    assert cli("add", "kt").returncode == 2
    listed = json.loads(cli("list", "--json").stdout)
    assert listed[0]["user"] == "kt" and listed[0]["read_only"] is True
    assert added.stdout.strip() not in (home / "branchline.db").read_bytes().decode("latin-1")
    assert cli("remove", "kt").returncode == 0
    assert cli("remove", "kt").returncode == 2
