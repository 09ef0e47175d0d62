"""``branchline relay ...``: admin commands of the relay store.

Same contract as the rest of the CLI (``engine/cli.py``): a ``BranchlineError``
becomes one ``error: ...`` line on stderr with its exit code, ``--json``
prints one JSON document. Tokens are printed only by ``enroll``, once; no
other command ever shows one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import signal
import ssl
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.table import Table

from ..errors import UserError
from .sqlite_store import SqliteRelayStore

store_argument = click.argument("store", type=click.Path(dir_okay=False, path_type=Path))
json_option = click.option(
    "--json", "as_json", is_flag=True, help="print one JSON document on stdout"
)


def _emit(value: Any) -> None:
    click.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


@contextmanager
def _opened(path: Path) -> Iterator[SqliteRelayStore]:
    store = SqliteRelayStore.open(path)
    try:
        yield store
    finally:
        store.close()


@click.group("relay")
def relay_group() -> None:
    """Relay store administration and the relay server ('relay serve')."""


@relay_group.command("init")
@store_argument
@json_option
def init_cmd(store: Path, as_json: bool) -> None:
    """Create an empty relay store file STORE."""
    SqliteRelayStore.create(store).close()
    if as_json:
        _emit({"store": str(store), "created": True})
    else:
        click.echo(f"created relay store {store}")


@relay_group.command("enroll")
@store_argument
@click.argument("dataset")
@click.argument("node")
@click.option("--read-only", is_flag=True, help="the node may read but not write")
@click.option(
    "--carrier",
    is_flag=True,
    help="the node may publish other nodes' entries (e.g. a head office that imports "
    "branches' export files); other nodes may publish only their own",
)
@json_option
def enroll_cmd(
    store: Path, dataset: str, node: str, read_only: bool, carrier: bool, as_json: bool
) -> None:
    """Issue a token for NODE of DATASET (the dataset is created on first
    enroll). Re-enrolling a node replaces its token and its flags."""
    if read_only and carrier:
        raise click.UsageError("a node cannot be both --read-only and --carrier")
    with _opened(store) as relay:
        done = relay.enroll(dataset, node, read_only=read_only, carrier=carrier)
    if as_json:
        _emit(
            {
                "token": done.token,
                "dataset": done.dataset,
                "node": done.node,
                "read_only": done.read_only,
                "carrier": done.carrier,
                "replaced": done.replaced,
                "dataset_created": done.dataset_created,
            }
        )
        return
    if done.dataset_created:
        click.echo(f"created dataset '{dataset}'")
    if done.replaced:
        click.echo(
            f"node '{node}' was enrolled before: its previous token no longer works "
            "(a revoked node is active again)"
        )
    mode = "read-only" if read_only else "read-write, carrier" if carrier else "read-write"
    click.echo(f"enrolled node '{node}' of dataset '{dataset}' ({mode}); token:")
    click.echo(done.token)
    click.echo("This token will not be shown again; the relay keeps only a hash of it.")


@relay_group.command("revoke")
@store_argument
@click.argument("dataset")
@click.argument("node")
@json_option
def revoke_cmd(store: Path, dataset: str, node: str, as_json: bool) -> None:
    """Revoke NODE of DATASET: its token stops working and its writes are refused."""
    with _opened(store) as relay:
        newly = relay.revoke(dataset, node)
    if as_json:
        _emit({"dataset": dataset, "node": node, "revoked": True, "already": not newly})
    elif newly:
        click.echo(f"revoked node '{node}' of dataset '{dataset}'")
    else:
        click.echo(f"node '{node}' of dataset '{dataset}' was already revoked")


@relay_group.command("lock")
@store_argument
@click.argument("dataset")
@click.argument("period")
@json_option
def lock_cmd(store: Path, dataset: str, period: str, as_json: bool) -> None:
    """Lock PERIOD (YYYY or YYYY-MM) of DATASET: the relay refuses every
    change to its documents (a year covers its months; a month does not cover
    the yearly document). Downloads go on. Applies to a serving relay at once."""
    with _opened(store) as relay:
        newly = relay.lock_period(dataset, period)
    _said(dataset, period, newly, "locked", as_json)


@relay_group.command("unlock")
@store_argument
@click.argument("dataset")
@click.argument("period")
@json_option
def unlock_cmd(store: Path, dataset: str, period: str, as_json: bool) -> None:
    """Lift the lock on PERIOD (YYYY or YYYY-MM) of DATASET; nodes send their
    held changes again when they next sync (after 'branchline retry')."""
    with _opened(store) as relay:
        newly = relay.unlock_period(dataset, period)
    _said(dataset, period, newly, "unlocked", as_json)


def _said(dataset: str, period: str, changed: bool, done: str, as_json: bool) -> None:
    if as_json:
        _emit({"dataset": dataset, "period": period, done: True, "already": not changed})
    elif changed:
        click.echo(f"{done} period {period} of dataset '{dataset}'")
    else:
        was = "already locked" if done == "locked" else "not locked"
        click.echo(f"period {period} of dataset '{dataset}' was {was}")


@relay_group.command("status")
@store_argument
@json_option
def status_cmd(store: Path, as_json: bool) -> None:
    """Datasets, their nodes (read-only, carrier, revoked), locked periods, documents
    and update counts."""
    with _opened(store) as relay:
        info = relay.status()
        seen = relay.last_seen()
    if as_json:
        _emit(
            {
                "store": str(store),
                "datasets": [
                    {
                        "name": ds.name,
                        "created_at": ds.created_at,
                        "nodes": [
                            {
                                "name": n.name,
                                "read_only": n.read_only,
                                "carrier": n.carrier,
                                "revoked": n.revoked,
                                "enrolled_at": n.enrolled_at,
                                "revoked_at": n.revoked_at,
                                "last_seen": seen.get((ds.name, n.name)),
                            }
                            for n in ds.nodes
                        ],
                        "documents": [
                            {
                                "name": d.name,
                                "updates": d.updates,
                                "bytes": d.bytes,
                                "log_rows": d.log_rows,
                            }
                            for d in ds.documents
                        ],
                        "updates": sum(d.updates for d in ds.documents),
                        "series": ds.series,
                        "locks": ds.locks,
                    }
                    for ds in info
                ],
            }
        )
        return
    console = Console(highlight=False)
    if not info:
        console.print(f"{store}: no datasets yet (enroll a node to create one)")
        return
    for ds in info:
        updates = sum(d.updates for d in ds.documents)
        console.print(
            f"dataset {ds.name}: {len(ds.nodes)} node(s), {len(ds.documents)} document(s), "
            f"{updates} update(s)"
        )
        nodes = Table("node", "access", "state", "last seen", box=None)
        for n in ds.nodes:
            at = seen.get((ds.name, n.name))
            nodes.add_row(
                n.name,
                "read-only"
                if n.read_only
                else "read-write, carrier"
                if n.carrier
                else "read-write",
                "revoked" if n.revoked else "active",
                _seen_text(at) if at is not None else "never",
            )
        console.print(nodes)
        if ds.locks:
            console.print(f"locked periods: {', '.join(ds.locks)}")
        if ds.documents:
            docs = Table("document", "updates", "bytes", "log rows", box=None)
            for d in ds.documents:
                docs.add_row(d.name, str(d.updates), str(d.bytes), str(d.log_rows))
            console.print(docs)


def _seen_text(at_ms: int) -> str:
    """``2026-12-03 12:05 UTC`` of a wall-ms time."""
    return dt.datetime.fromtimestamp(at_ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


# ``list`` is the same view: operators reach for either name.
relay_group.add_command(status_cmd, "list")


@relay_group.command("serve")
@store_argument
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option(
    "--port",
    default=8765,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="port to listen on (0: any free port)",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="PEM certificate chain: serve wss:// (needs --tls-key)",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="PEM private key of --tls-cert",
)
@json_option
def serve_cmd(
    store: Path,
    host: str,
    port: int,
    tls_cert: Path | None,
    tls_key: Path | None,
    as_json: bool,
) -> None:
    """Serve the relay store STORE over websockets (with /healthz and /metrics
    on the same port) until SIGINT or SIGTERM, then shut down cleanly:
    updates received before the signal are committed and acknowledged.
    With --json, the start and stop lines are JSON objects."""
    if (tls_cert is None) != (tls_key is None):
        raise UserError("--tls-cert and --tls-key go together: give both or neither")
    context = None
    if tls_cert is not None and tls_key is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(tls_cert, tls_key)
        except (ssl.SSLError, OSError) as exc:
            raise UserError(
                f"cannot load the TLS certificate {tls_cert} / key {tls_key}: {exc}"
            ) from None
    # Connection state changes are logged at INFO (never a token); basicConfig
    # does nothing when the embedding program configured logging already.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    with _opened(store) as relay:
        asyncio.run(_serve(relay, host, port, context, as_json))


async def _serve(
    store: SqliteRelayStore, host: str, port: int, context: ssl.SSLContext | None, as_json: bool
) -> None:
    from .server import RelayServer

    server = RelayServer(store, host=host, port=port, ssl_context=context)
    try:
        await server.start()
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    # Handlers first: a supervisor may signal as soon as it reads the line.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if as_json:
        click.echo(orjson.dumps({"serving": str(store.path), "url": server.url}).decode())
    else:
        click.echo(f"relay serving {store.path} on {server.url}", nl=True)
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop()
    click.echo(orjson.dumps({"stopped": str(store.path)}).decode() if as_json else "relay stopped")
