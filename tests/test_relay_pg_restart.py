"""PostgreSQL restarted while two relay processes run on it: the relays
stay up, refuse (never acknowledge) what they cannot commit, reconnect when
the server is back and go on; the nodes keep working offline meanwhile and
everything written on either side reaches the other, live, through the
other relay. The server is a private one (``private_pg``), so stopping it
touches nothing else."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from pathlib import Path

from pg import PrivateServer

from engine.node import Node
from engine.relay.pg_store import PgRelayStore
from harness.net import free_port
from tests.test_relay_server import _start_cli
from tests.test_sync_live import BRANCHLINE, cli, has, init_home, wait_for


def put(home: Path, code: str) -> None:
    done = cli("put", "--home", str(home), "customers", f'{{"code": "{code}", "name": "x"}}')
    assert done.returncode == 0, done.stderr


def pending(home: Path) -> int:
    with Node.open(home) as node:
        return sum(node.pending().values())


def test_relays_wait_out_a_postgresql_restart_and_go_on(
    private_pg: PrivateServer, tmp_path: Path
) -> None:
    with PgRelayStore.create(private_pg.url) as store:
        tokens = {n: store.enroll("acme", n).token for n in ("A", "B")}
    ports = [free_port(), free_port()]
    relays = [_start_cli(private_pg.url, port) for port in ports]
    homes = {"A": tmp_path / "A", "B": tmp_path / "B"}
    for (name, home), port in zip(homes.items(), ports, strict=True):
        init_home(home, name, port, tokens[name])
    runs = [
        subprocess.Popen(
            [*BRANCHLINE, "node", "run", "--home", str(home), "--backoff-max", "0.5"],
            stderr=subprocess.DEVNULL,
        )
        for home in homes.values()
    ]
    try:
        put(homes["A"], "before")
        wait_for(lambda: has(homes["B"], "before"), 30)  # A -> relay 1 -> PG -> relay 2 -> B

        private_pg.stop()
        # Offline work goes on at both branches; nothing can be acknowledged.
        put(homes["A"], "during-a")
        put(homes["B"], "during-b")
        time.sleep(3)  # the nodes try, the relays fail the calls and stay up
        assert all(relay.poll() is None for relay in relays), "a relay exited"
        assert pending(homes["A"]) >= 1 and pending(homes["B"]) >= 1

        private_pg.start()
        wait_for(lambda: has(homes["B"], "during-a") and has(homes["A"], "during-b"), 60)
        put(homes["B"], "after")
        wait_for(lambda: has(homes["A"], "after"), 30)
        wait_for(lambda: pending(homes["A"]) == 0 and pending(homes["B"]) == 0, 30)
    finally:
        for run in runs:
            run.send_signal(signal.SIGTERM)
        for run in runs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.wait(15)
            run.kill()
        for relay in relays:
            relay.kill()
        logs = [relay.communicate(timeout=15)[1] for relay in relays]
    print(logs[0])
    # The outage is told in a few lines, not a traceback per refused call.
    assert not any("Traceback" in log for log in logs), logs
    with contextlib.closing(PgRelayStore.open(private_pg.url)) as store:
        assert store.head("acme") >= 4
