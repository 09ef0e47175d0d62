"""``make demo-pg``: two relays on one PostgreSQL store, a branch on each, and
changes crossing from one relay to the other live.

Everything runs on loopback: the demo creates a PostgreSQL database of its
own (``bl_demo_<random>``, from ``--pg``, default
``postgresql://postgres@127.0.0.1:5432/test``) and drops it at the end.

1. ``branchline relay init postgresql://…`` and ``relay enroll``; two ``relay
   serve`` processes on that one store (waited on through ``/healthz``).
2. Two branch homes: HN connects to relay 1 (and may fail over to relay 2:
   ``--relay`` with both URLs), HCM to relay 2; each kept live by ``node run``.
3. HN books a customer: it reaches HCM through relay 2 without any reconnect
   (relay 2's follower was woken by PostgreSQL's NOTIFY and read the update
   by its position); HCM's answer comes back the same way. Timings printed.
4. Relay 1 is killed (SIGKILL): HN fails over to relay 2 and goes on; what
   relay 1 had acknowledged is all there.
5. Both branches hold the same records; every process is stopped cleanly and
   the database dropped.

``python -m harness.demo_pg [--pg URL]``; exit 0 when every step held.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from engine.node import Node

from .demo import Processes, _healthy, _metrics, _step, _wait_for
from .net import free_port

DATASET = "branchline-trading"
BRANCHES = ("HN", "HCM")


def _database(server: str, name: str) -> str:
    parts = urlsplit(server)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", "", ""))


def _book(home: Path, code: str, name: str) -> float:
    """Book a customer in ``home`` (as any program on the branch would, beside
    its ``node run``); the seconds the write itself took."""
    started = time.monotonic()
    with Node.open(home) as node:
        node.put("customers", {"code": code, "name": name})
    return time.monotonic() - started


def _has(home: Path, code: str) -> bool:
    with Node.open(home) as node:
        return node.get("customers", code) is not None


def play(workdir: Path, store: str, console: Console) -> None:
    """The demo's steps on ``store`` (a new PostgreSQL store's URL). Raises
    AssertionError when a step does not hold."""
    procs = Processes(workdir)
    try:
        _step(console, "1. One PostgreSQL store, two relay processes")
        procs.cli("relay", "init", store)
        tokens = {
            b: json.loads(procs.cli("relay", "enroll", store, DATASET, b, "--json"))["token"]
            for b in BRANCHES
        }
        ports = [free_port(), free_port()]
        relays = [
            procs.start(f"relay{i + 1}", "relay", "serve", store, "--port", str(port))
            for i, port in enumerate(ports)
        ]
        http = [f"http://127.0.0.1:{port}" for port in ports]
        ws = [f"ws://127.0.0.1:{port}/" for port in ports]
        for url in http:
            _wait_for(f"{url}/healthz", partial(_healthy, url))
        console.print(f"  relay 1 {ws[0]}, relay 2 {ws[1]}: healthz ok, one store")

        _step(console, "2. HN on relay 1 (relay 2 as failover), HCM on relay 2")
        relay_of = {"HN": f"{ws[0]},{ws[1]}", "HCM": ws[1]}
        homes = {b: workdir / b for b in BRANCHES}
        for b in BRANCHES:
            procs.cli(
                "node", "init", "--home", str(homes[b]), "--dataset", DATASET, "--node", b,
                "--relay", relay_of[b], "--token", tokens[b],
            )  # fmt: skip
            procs.start(f"node-{b}", "node", "run", "--home", str(homes[b]), "--backoff-max", "1")
        took = _wait_for(
            "both branches online",
            lambda: all(
                json.loads(procs.cli("status", "--home", str(h), "--json"))["online"]
                for h in homes.values()
            ),
        )
        console.print(f"  both branches online after {took:.2f} s")

        _step(console, "3. A change crosses from relay 1 to relay 2, live")
        for author, reader, code in (("HN", "HCM", "KH-HN-1"), ("HCM", "HN", "KH-HCM-1")):
            took = _book(homes[author], code, f"Customer of {author}")
            took += _wait_for(f"{code} at {reader}", partial(_has, homes[reader], code))
            console.print(
                f"  {author} booked customer [bold]{code}[/]: at {reader} {took:.2f} s later "
                "(its node run ships it within about 0.1 s; no reconnect: the other relay's "
                "follower read it from the store)"
            )
        followed = [_metrics(url).get("branchline_relay_updates_followed_total", 0) for url in http]
        console.print(
            f"  updates each relay read back from the other: relay 1 {followed[0]:.0f}, "
            f"relay 2 {followed[1]:.0f}"
        )
        if not all(followed):
            raise AssertionError("a relay fanned out nothing committed by the other")

        _step(console, "4. Relay 1 is killed (SIGKILL): HN fails over to relay 2")
        relays[0].send_signal(signal.SIGKILL)
        relays[0].wait()
        took = _book(homes["HN"], "KH-HN-2", "Booked after the failover")
        took += _wait_for("KH-HN-2 at HCM", partial(_has, homes["HCM"], "KH-HN-2"))
        console.print(
            f"  HN booked KH-HN-2 with relay 1 gone: at HCM {took:.2f} s later "
            "(HN's node run noticed the cut and connected to relay 2)"
        )

        _step(console, "5. Both branches hold the same records")
        lists = {}
        for b, home in homes.items():
            with Node.open(home) as node:
                lists[b] = sorted(r["code"] for r in node.list("customers"))
        console.print(f"  HN: {', '.join(lists['HN'])}\n  HCM: {', '.join(lists['HCM'])}")
        if lists["HN"] != lists["HCM"]:
            raise AssertionError("the branches differ")
    except Exception:
        for label, _proc, _log in procs.started:
            tail = procs.tail(label)
            if tail:
                console.print(Panel(Text(tail), title=f"{label}.log (last lines)"))
        raise
    finally:
        procs.stop_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.demo_pg", description=__doc__)
    parser.add_argument(
        "--pg",
        default=os.environ.get("BRANCHLINE_DEMO_PG", "postgresql://postgres@127.0.0.1:5432/test"),
        help="a PostgreSQL database to create the demo's own database from",
    )
    args = parser.parse_args(argv)
    console = Console(highlight=False)
    os.environ.pop("BRANCHLINE_HOME", None)
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(128 + signal.SIGTERM))
    name = f"bl_demo_{secrets.token_hex(4)}"
    try:
        with psycopg.connect(args.pg, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"'.encode())
    except psycopg.Error as exc:
        console.print(Text(f"✘ cannot create a database at {args.pg}: {exc}", style="bold red"))
        return 1
    console.print(
        Panel(
            Text(f"Dataset '{DATASET}': two relays on PostgreSQL database {name}, two branches."),
            title="Branchline demo: several relays on one PostgreSQL store",
        )
    )
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="branchline-demo-pg-") as tmp:
            play(Path(tmp), _database(args.pg, name), console)
    except AssertionError as exc:
        console.print(Text(f"✘ the demo failed: {exc}", style="bold red"))
        return 1
    finally:
        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
    console.print(
        Text(
            f"✔ changes crossed relays live and survived a relay kill "
            f"({time.perf_counter() - started:.1f} s); database {name} dropped",
            style="bold green",
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
