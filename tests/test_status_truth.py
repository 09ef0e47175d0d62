"""What status says about reaching the relay (issue 18): the node's last
sync error and when it last reached the relay; the relay's last-seen time of
each node."""

from __future__ import annotations

import json
from pathlib import Path

from engine.relay.sqlite_store import SqliteRelayStore
from tests.test_reenroll import status
from tests.test_sync_live import ThreadRelay, cli, free_port, init_home


def test_last_error_last_reached_and_relay_last_seen(tmp_path: Path) -> None:
    store_path, port = tmp_path / "relay.db", free_port()
    with SqliteRelayStore.create(store_path) as store:
        tokens = {n: store.enroll("acme", n).token for n in ("A", "B")}
    home = tmp_path / "A"
    init_home(home, "A", port, tokens["A"])
    st = status(home)
    assert st["last_error"] is None and st["last_reached"] is None
    down = cli("sync", "--home", str(home), "--timeout", "10")
    assert down.returncode == 1
    st = status(home)
    error = st["last_error"]
    assert isinstance(error, dict) and "cannot reach the relay" in error["message"]
    assert st["last_reached"] is None
    text = cli("status", "--home", str(home)).stdout
    assert "last error" in text and "cannot reach the relay" in text
    assert "relay reached" in text and "never" in text

    relay = ThreadRelay(store_path, port)
    relay.start()
    try:
        done = cli("sync", "--home", str(home), "--timeout", "30")
        assert done.returncode == 0, done.stderr
    finally:
        relay.stop()
    st = status(home)
    assert st["last_error"] is None
    assert isinstance(st["last_reached"], int) and st["last_reached"] >= error["at"]

    shown = cli("relay", "status", str(store_path), "--json")
    assert shown.returncode == 0, shown.stderr
    nodes = {n["name"]: n for n in json.loads(shown.stdout)["datasets"][0]["nodes"]}
    seen = nodes["A"]["last_seen"]
    assert isinstance(seen, int) and st["last_reached"] - 60_000 <= seen
    assert nodes["B"]["last_seen"] is None  # never connected
    table = cli("relay", "status", str(store_path)).stdout
    assert "last seen" in table and "never" in table and "UTC" in table
