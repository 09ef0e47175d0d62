"""Write-back capture with real processes: ``node run`` writes what an app
queues while it runs and, when it was stopped, as soon as it starts; the CLI
commands; a drain killed at random points loses and doubles nothing."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from test_sync_live import BRANCHLINE, ThreadRelay, cli, init_home, wait_for

from engine.node import Node
from engine.relay.sqlite_store import SqliteRelayStore
from engine.store import NodeStore
from harness.net import free_port

TABLE_SQL = (
    "CREATE TABLE till_customers (id INTEGER PRIMARY KEY, code TEXT UNIQUE, name TEXT, "
    "tax_code TEXT, points INTEGER DEFAULT 0)"
)


def app(home: Path) -> sqlite3.Connection:
    return sqlite3.connect(NodeStore.file_in(home), isolation_level=None, timeout=30)


def table(home: Path) -> list[tuple[str, str]]:
    with app(home) as conn:
        return conn.execute("SELECT code, name FROM till_customers ORDER BY code").fetchall()


def test_node_run_writes_queued_changes_both_ways(tmp_path: Path) -> None:
    store_path, port = tmp_path / "relay.db", free_port()
    store = SqliteRelayStore.create(store_path)
    tokens = {n: store.enroll("acme", n).token for n in ("A", "B")}
    store.close()
    homes = {n: tmp_path / n for n in ("A", "B")}
    for n, home in homes.items():
        init_home(home, n, port, tokens[n])
        with app(home) as conn:
            conn.execute(TABLE_SQL)
        out = cli("capture", "enable", "--home", str(home), "till_customers", "--collection",
                  "customers")  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "capturing till_customers into customers" in out.stdout
    # Written while no node process runs: the queue waits.
    with app(homes["A"]) as conn:
        conn.execute("INSERT INTO till_customers (code, name) VALUES ('C1', 'offline write')")
    status = json.loads(cli("status", "--home", str(homes["A"]), "--json").stdout)
    assert status["capture"] == {"tables": 1, "queued": 1, "quarantined": 0}
    relay = ThreadRelay(store_path, port)
    relay.start()
    runs = [
        subprocess.Popen(
            [*BRANCHLINE, "node", "run", "--home", str(h), "--backoff-max", "0.5"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for h in homes.values()
    ]
    try:
        wait_for(lambda: table(homes["B"]) == [("C1", "offline write")], 15)
        # Written while they run: on the other side within moments.
        with app(homes["B"]) as conn:
            conn.execute("UPDATE till_customers SET name = 'edited at B' WHERE code = 'C1'")
            conn.execute("INSERT INTO till_customers (code, name) VALUES ('C2', 'from B')")
        started = time.monotonic()
        wait_for(lambda: table(homes["A"]) == [("C1", "edited at B"), ("C2", "from B")], 15)
        print(f"\napp write on B -> row in A's table: {time.monotonic() - started:.3f} s")
        with app(homes["A"]) as conn:
            conn.execute("DELETE FROM till_customers WHERE code = 'C2'")
        wait_for(lambda: table(homes["B"]) == [("C1", "edited at B")], 15)
        for home in homes.values():
            with Node.open(home) as n:
                wait_for(lambda n=n: n.capture_status()["queued"] == 0, 5)
    finally:
        for proc in runs:
            proc.send_signal(signal.SIGTERM)
        logs = [proc.communicate(timeout=15)[1] for proc in runs]
        relay.stop()
    assert all(proc.returncode == 0 for proc in runs), logs


def test_cli_capture_commands(tmp_path: Path) -> None:
    home = tmp_path / "A"
    out = cli("node", "init", "--home", str(home), "--dataset", "acme", "--node", "A")
    assert out.returncode == 0, out.stderr
    with app(home) as conn:
        conn.execute(TABLE_SQL)
        conn.execute("INSERT INTO till_customers (code, name) VALUES ('C1', 'An')")
        conn.execute("INSERT INTO till_customers (code, name) VALUES ('C2', NULL)")
    out = cli("capture", "enable", "--home", str(home), "till_customers", "--collection",
              "customers", "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    enabled = json.loads(out.stdout)
    assert (enabled["queued"], enabled["written"], enabled["quarantined"]) == (2, 1, 1)
    listed = json.loads(cli("capture", "list", "--home", str(home), "--json").stdout)
    assert listed[0]["table"] == "till_customers" and listed[0]["quarantined"] == 1
    failures = json.loads(cli("failures", "--home", str(home), "--json").stdout)
    [held] = [f for f in failures if f["direction"] == "capture"]
    assert held["key"] == "C2" and "customers.name" in held["reason"]
    human = cli("failures", "--home", str(home))
    assert "quarantined change" in human.stdout and "capture retry" in human.stdout
    bad = cli("capture", "retry", "--home", str(home), "999")
    assert bad.returncode == 2 and bad.stderr.startswith("error: no quarantined change")
    # The app fixes its row: that change is written and the failure is moot.
    with app(home) as conn:
        conn.execute("UPDATE till_customers SET name = 'Binh' WHERE code = 'C2'")
        conn.execute("INSERT INTO till_customers (code, name) VALUES ('C3', 'Chi')")
    out = cli("capture", "drain", "--home", str(home), "--json")
    assert json.loads(out.stdout) == {"written": 2, "quarantined": 0}
    assert json.loads(cli("failures", "--home", str(home), "--json").stdout) == []
    out = cli("capture", "retry", "--home", str(home), "--all")
    assert out.returncode == 0 and "0 changes queued again" in out.stdout, out.stderr
    human = cli("status", "--home", str(home))
    assert "captured tables" in human.stdout
    out = cli("capture", "disable", "--home", str(home), "till_customers")
    assert out.returncode == 0 and "no longer captured" in out.stdout
    again = cli("capture", "disable", "--home", str(home), "till_customers")
    assert again.returncode == 2 and again.stderr.count("\n") == 1
    with Node.open(home) as n:
        assert sorted(r["code"] for r in n.list("customers")) == ["C1", "C2", "C3"]


DRAINER = """
import sys
from engine.node import Node
with Node.open(sys.argv[1]) as n:
    print("open", flush=True)
    while n.drain_captured(int(sys.argv[2])).changes:
        pass
"""


def test_drain_killed_anywhere_loses_and_doubles_nothing(tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    print(f"\nseed {seed}")
    rng = random.Random(seed)
    home = tmp_path / "A"
    assert (
        cli("node", "init", "--home", str(home), "--dataset", "acme", "--node", "A").returncode == 0
    )
    with app(home) as conn:
        conn.execute(TABLE_SQL)
    with Node.open(home) as n:
        n.enable_capture("till_customers", "customers")
    with app(home) as conn:
        conn.execute("BEGIN")
        for i in range(3000):
            conn.execute(
                "INSERT INTO till_customers (code, name) VALUES (?, ?)", (f"C{i:05}", f"n{i}")
            )
        conn.execute("UPDATE till_customers SET name = name || '!' WHERE id % 3 = 0")
        conn.execute("DELETE FROM till_customers WHERE id % 7 = 0")
        conn.execute("COMMIT")
    kills = 0
    for _ in range(30):
        proc = subprocess.Popen(
            [sys.executable, "-c", DRAINER, str(home), str(rng.choice([1, 7, 50]))],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline() == "open\n"
        time.sleep(rng.uniform(0.0, 0.15))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait(10)
        with Node.open(home) as n:
            if n.capture_status()["queued"] == 0:
                break
    with Node.open(home) as n:
        while n.drain_captured().changes:
            pass
        assert n.capture_status() == {"tables": 1, "queued": 0, "quarantined": 0}
        records = sorted((r["code"], r["name"]) for r in n.list("customers"))
    assert kills > 0, "no drain was killed: the test proved nothing"
    assert records == table(home)
    assert len(records) == 3000 - 3000 // 7
