"""Re-enrolling a node: ``node config``, a refused token as a clear state
(``status``, ``node run``), and what an import into a rebuilt home shows
(pending, counts, waiting records) (issue 18)."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest
from test_sync_live import BRANCHLINE, ThreadRelay, cli, free_port, init_home, wait_for

from engine.clock import ManualClock
from engine.errors import UserError
from engine.exchange import export_to_file
from engine.node import Node
from engine.relay.sqlite_store import SqliteRelayStore


def status(home: Path) -> dict[str, object]:
    out = cli("status", "--home", str(home), "--json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_refused_token_is_a_state_and_node_config_takes_the_new_one(tmp_path: Path) -> None:
    store_path, port = tmp_path / "relay.db", free_port()
    with SqliteRelayStore.create(store_path) as store:
        old = store.enroll("acme", "A").token
        new = store.enroll("acme", "A").token  # enrolled again: the old token is dead
    home = tmp_path / "A"
    init_home(home, "A", port, old)
    relay = ThreadRelay(store_path, port)
    relay.start()
    run: subprocess.Popen[str] | None = None
    try:
        refused = cli("sync", "--home", str(home), "--timeout", "10")
        assert refused.returncode == 2 and "node config" in refused.stderr
        state = status(home)
        assert state["token_refused"] and "node config" in cli("status", "--home", str(home)).stdout
        run = subprocess.Popen(
            [*BRANCHLINE, "node", "run", "--home", str(home), "--backoff-max", "0.2"],
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(lambda: status(home)["state"] == "token refused", 30)
        time.sleep(1.5)  # at full rate this would be several attempts
        bad = cli("node", "config", "--home", str(home), "--relay", "http://x")
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1
        ok = cli("node", "config", "--home", str(home), "--token", new, "--json")
        assert ok.returncode == 0 and json.loads(ok.stdout)["token_changed"] is True
        wait_for(lambda: status(home)["online"] is True, 30)
        assert status(home)["token_refused"] is None
        run.terminate()
        _, err = run.communicate(timeout=30)
        assert err.count("refused this node's token") == 1  # logged once, not retried
        assert "new token" in err
    finally:
        if run is not None and run.poll() is None:
            run.kill()
        relay.stop()


def test_configure_api(tmp_path: Path) -> None:
    n = Node.create(tmp_path / "h", dataset="acme", node="A", clock=ManualClock())
    assert n.numbering_known()  # created without a relay: a new node
    with pytest.raises(UserError):
        n.configure()
    with pytest.raises(UserError, match="ws://"):
        n.configure(relay="ftp://x")
    n.configure(relay="ws://127.0.0.1:1/", token="t")
    meta = n.store.meta()
    assert (meta["relay"], meta["token"]) == ("ws://127.0.0.1:1/", "t")
    assert not n.numbering_known()  # never synced: maybe an existing node's home
    n.close()


def test_an_import_counts_and_shows_what_waits(tmp_path: Path) -> None:
    old = Node.create(
        tmp_path / "old", dataset="acme", node="DN", clock=ManualClock(), rng=random.Random(1)
    )
    old.put("customers", {"code": "KH1", "name": "An"})
    old.put("warehouses", {"code": "K1", "name": "Kho"})
    old.put("items", {"code": "VT1", "name": "Bút", "price": "1"})
    old.ack([seq for seq, _, _ in old.outbox()])  # the relay has the catalogs
    sale = {"date": "2026-02-10", "customer": "KH1", "warehouse": "K1", "paid": False,
            "lines": [{"item": "VT1", "qty": "1", "price": "1", "vat_rate": "0"}]}  # fmt: skip
    first = old.post_voucher("sales_invoice", sale)
    second = old.post_voucher("sales_invoice", sale)
    export_to_file(old, tmp_path / "u.blx", created_ms=1, unsynced=True)
    old.close()
    home = tmp_path / "new"
    Node.create(home, dataset="acme", node="DN", new_node=False).close()
    out = cli("import", "--home", str(home), str(tmp_path / "u.blx"), "--json")
    report = json.loads(out.stdout)
    assert (report["records_changed"], report["records_waiting"]) == (2, 2)
    text = cli("import", "--home", str(home), str(tmp_path / "u.blx")).stdout
    assert "nothing new" in text
    state = status(home)
    assert state["pending"]["sales_invoice"] == 2 and state["waiting"] == 2  # type: ignore[index]
    shown = json.loads(cli("waiting", "--home", str(home), "--json").stdout)
    assert sorted(r["key"] for r in shown) == sorted([first.number, second.number])
    assert {m["collection"] for r in shown for m in r["missing"]} >= {"customers"}
    assert first.number in cli("waiting", "--home", str(home)).stdout
