"""``branchline relay migrate`` and ``--store postgresql://``: a SQLite relay
store copied into PostgreSQL keeps every node's token, log, snapshot,
series, lock and last-seen time, and a relay on the copy goes on where the
SQLite one stopped."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from engine.cli import cli
from engine.node import Node
from engine.relay import RelayLimits, SqliteRelayStore, UpdateIn
from engine.relay.pg_store import PgRelayStore
from engine.relay.testing import customers, map_updates, pull, push


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_migrate_keeps_tokens_logs_and_numbers(tmp_path: Path, pg_url: str) -> None:
    source = tmp_path / "relay.db"
    limits = RelayLimits(compact_after=5, compact_ratio=0, keep_positions=3)
    with SqliteRelayStore.create(source, limits) as store:
        token = store.enroll("acme", "A").token
        store.enroll("acme", "RO", read_only=True)
        store.enroll("acme", "GONE")
        store.revoke("acme", "GONE")
        a = Node.create(tmp_path / "a", dataset="acme", node="A")
        for i in range(12):  # compacted on the way: snapshot, kept and unfolded rows
            a.put("customers", {"code": f"K{i}", "name": f"n{i}"})
            push(store, a, "A")
            a.ack([s for s, _, _ in a.outbox()])
        late = map_updates(3, client_id=88)
        store.enroll("acme", "HO", carrier=True)
        store.append_updates("acme", [UpdateIn("items", late[2], "HO")])  # waits for 0 and 1
        store.lock_period("acme", "2025")
        assert store.lease("acme", "sales", 10) == (1, 10)
        store.note_seen("acme", "A", 1234)
        head, status = store.head("acme"), store.status()
        state = store.state_vector("acme", "customers")
    code, out, err = run("relay", "migrate", "--from", str(source), "--to", pg_url, "--json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert rows["nodes"] == 4 and rows["leases"] == 1 and rows["snapshots"] == 1
    with PgRelayStore.open(pg_url) as pg:
        assert pg.authenticate("acme", "A", token).node == "A"  # the node's token works
        assert pg.head("acme") == head
        assert pg.state_vector("acme", "customers") == state
        assert pg.status() == status
        assert pg.last_seen() == {("acme", "A"): 1234}
        assert pg.lease("acme", "sales", 5) == (11, 15)  # the series goes on
        b = Node.create(tmp_path / "b", dataset="acme", node="B")
        pull(pg, b)
        assert customers(b) == customers(a)
        # The waiting update is still waiting; its missing parts complete it.
        results = pg.append_updates("acme", [UpdateIn("items", u, "HO") for u in late[:2]])
        assert [r.position for r in results] == [head + 1, head + 2]
        pg.enroll("acme", "NEW")  # serial ids go on after the copied ones
        assert len(pg.status()[0].nodes) == 5
    # Into a store that holds datasets: refused, one line.
    code, out, err = run("relay", "migrate", "--from", str(source), "--to", pg_url)
    assert code == 2 and err.startswith("error: ") and "already holds datasets" in err
    code, out, err = run("relay", "migrate", "--from", str(source), "--to", str(tmp_path / "x"))
    assert code == 2 and "postgresql://" in err


def test_store_option_names_a_file_or_a_url(tmp_path: Path, pg_url: str) -> None:
    for spec in (str(tmp_path / "relay.db"), pg_url):
        assert run("relay", "init", "--store", spec)[0] == 0
        code, out, err = run("relay", "enroll", "--store", spec, "acme", "HN", "--json")
        assert code == 0, err
        assert run("relay", "lock", "acme", "2026", f"--store={spec}")[0] == 0
        code, out, err = run("relay", "status", spec, "--json")
        assert code == 0, err
        (ds,) = json.loads(out)["datasets"]
        assert ds["locks"] == ["2026"] and [n["name"] for n in ds["nodes"]] == ["HN"]
    code, out, err = run("relay", "status", "--store", pg_url + "?schema=other")
    assert code == 2 and len(err.splitlines()) == 1 and "relay init" in err
