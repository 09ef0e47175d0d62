"""Several relays on one store, live: two ``RelayServer``s (and two real relay
processes) on one SQLite file. What one relay acknowledges reaches the nodes of
the other without a reconnect; a relay killed with SIGKILL loses nothing it
acknowledged, and those updates still reach the nodes of the survivor."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
from pathlib import Path

import pytest

from engine.node import Node
from engine.protocol import UpdateReceived
from engine.relay import SqliteRelayStore
from engine.relay.server import RelayServer
from engine.relay.stores import create_store, open_store
from harness.net import free_port
from tests.test_relay_server import (
    TIMEOUT,
    Client,
    Tokens,
    Writer,
    _start_cli,
    keys_of,
    relay_db,
    run,
    stream_then_kill,
)
from tests.test_sync_live import BRANCHLINE, ThreadRelay, cli, has, init_home, wait_for

__all__ = ["relay_db"]  # the fixture, shared with test_relay_server


def received_keys(client: Client) -> dict[str, object]:
    """Every key of every update ``client`` was sent (fan-out), merged."""
    keys: dict[str, object] = {}
    for event in client.events:
        if isinstance(event, UpdateReceived):
            keys |= keys_of(event.data)
    return keys


async def until_received(client: Client, wanted: dict[str, object]) -> None:
    async def loop() -> None:
        while not wanted.items() <= received_keys(client).items():
            await client.wait(UpdateReceived)

    await asyncio.wait_for(loop(), TIMEOUT)


def test_updates_acked_by_one_relay_reach_the_other_relays_nodes_live(
    relay_db: tuple[Path, Tokens],
) -> None:
    path, tok = relay_db

    async def main() -> None:
        stores = [SqliteRelayStore.open(path) for _ in range(2)]
        relays = [RelayServer(store, port=0) for store in stores]
        for relay in relays:
            await relay.start()
        try:
            a1, _ = await Client.opened(relays[0].url, "acme", "A1", tok.a1)
            a2, _ = await Client.opened(relays[1].url, "acme", "A2", tok.a2)
            b1, _ = await Client.opened(relays[1].url, "beta", "B1", tok.b1)
            w1, w2 = Writer(), Writer()
            for ref in range(40):
                await a1.put("customers", w1.put(f"one{ref}", ref), ref)
            await a1.acked(*range(40))
            await until_received(a2, {f"one{ref}": ref for ref in range(40)})
            await a2.put("vendors", w2.put("two", 2), 1)
            await a2.acked(1)
            await until_received(a1, {"two": 2})
            # A round trip on each proves what did not come: nothing of its
            # own back to a sender, nothing of acme to beta.
            await a1.round_trip("customers")
            assert set(received_keys(a1)) == {"two"}
            await b1.round_trip("customers")
            assert received_keys(b1) == {}
            for client in (a1, a2, b1):
                await client.close()
        finally:
            for relay in relays:
                await relay.stop()
            for store in stores:
                store.close()
        assert relays[1].metrics.updates_followed == 40
        assert relays[0].metrics.updates_followed == 1

    run(main())


@pytest.fixture(params=["sqlite", "postgresql"])
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """A relay store (a SQLite file, or a PostgreSQL schema of its own) with
    nodes A1 and A2 of dataset acme enrolled: (its spec, their tokens)."""
    spec = str(tmp_path / "relay.db")
    if request.param == "postgresql":
        spec = request.getfixturevalue("pg_url")
    with contextlib.closing(create_store(spec)) as store:
        tokens = {n: store.enroll("acme", n).token for n in ("A1", "A2")}
    return spec, tokens


def test_a_relay_killed_mid_stream_loses_nothing_acked_and_the_other_delivers_it(
    store_spec: tuple[str, dict[str, str]],
) -> None:
    spec, tok = store_spec
    ports = [free_port(), free_port()]
    procs = [_start_cli(spec, port) for port in ports]
    urls = [f"ws://127.0.0.1:{port}/" for port in ports]
    acked: set[int] = set()
    try:

        async def main() -> None:
            a2, _ = await Client.opened(urls[1], "acme", "A2", tok["A2"])
            a1, _ = await Client.opened(urls[0], "acme", "A1", tok["A1"])
            await stream_then_kill(a1, procs[0], acked)
            # Every acknowledged update reaches the node on the surviving relay, live.
            await until_received(a2, {f"k{r}": r for r in acked})
            await a2.close()

        run(main())
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(TIMEOUT)
    with contextlib.closing(open_store(spec)) as store:
        keys = keys_of(store.diff("acme", "customers"))
    missing = [r for r in acked if keys.get(f"k{r}") != r]
    assert acked and not missing, f"{len(missing)} acknowledged updates lost"


def put_customers(home: Path, numbers: range) -> None:
    for i in numbers:
        put = cli(
            "put", "--home", str(home), "customers", json.dumps({"code": f"C{i}", "name": "x"})
        )
        assert put.returncode == 0, put.stderr


def test_a_node_moving_to_another_relay_resumes_exactly_and_changes_cross_live(
    tmp_path: Path,
) -> None:
    store_path = tmp_path / "relay.db"
    with SqliteRelayStore.create(store_path) as store:
        tokens = {n: store.enroll("acme", n).token for n in ("A", "B")}
    ports = [free_port(), free_port()]
    relays = [ThreadRelay(store_path, port) for port in ports]
    for relay in relays:
        relay.start()
    home_a, home_b = tmp_path / "A", tmp_path / "B"
    both = ",".join(f"ws://127.0.0.1:{port}/" for port in ports)
    assert cli(
        "node", "init", "--home", str(home_a), "--dataset", "acme", "--node", "A",
        "--relay", both, "--token", tokens["A"],
    ).returncode == 0  # fmt: skip
    init_home(home_b, "B", ports[1], tokens["B"])
    run_b = subprocess.Popen(
        [*BRANCHLINE, "node", "run", "--home", str(home_b), "--backoff-max", "0.5"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        put_customers(home_a, range(3))
        assert cli("sync", "--home", str(home_a)).returncode == 0  # through relay 1
        wait_for(lambda: all(has(home_b, f"C{i}") for i in range(3)), 15)  # live, via relay 2
        relays[0].stop()
        put_customers(home_a, range(3, 5))
        done = cli("sync", "--home", str(home_a))  # relay 1 is down: fails over to relay 2
        assert done.returncode == 0, done.stderr
        wait_for(lambda: all(has(home_b, f"C{i}") for i in range(5)), 15)
    finally:
        run_b.send_signal(signal.SIGTERM)
        run_b.communicate(timeout=15)
        relays[1].stop()
    # No gaps: B holds all five; no duplicates: relay 2 was sent nothing relay 1 had acked.
    second = relays[1].server
    assert second is not None and second.metrics.updates_in["duplicate"] == 0
    assert second.metrics.updates_in["stored"] >= 1  # C3 and C4 (one update per document)
    with Node.open(home_a) as node:
        assert sum(node.pending().values()) == 0
