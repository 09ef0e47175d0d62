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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.table import Table

from ..errors import StoreUnavailable, UserError
from .store import RelayStore
from .stores import create_store, describe, open_store

log = logging.getLogger("branchline.relay")


class StoreCommand(click.Command):
    """A command whose STORE (first argument) may also be given as
    ``--store PATH|URL`` anywhere on the line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        args = list(args)
        for i, arg in enumerate(args):
            if arg == "--":
                break
            if arg == "--store" and i + 1 < len(args):
                value = args[i + 1]
                del args[i : i + 2]
                args.insert(0, value)
                break
            if arg.startswith("--store="):
                del args[i]
                args.insert(0, arg.split("=", 1)[1])
                break
        return super().parse_args(ctx, args)


def store_argument(fn: Any) -> Any:
    """STORE: a SQLite relay store file or a ``postgresql://host/db[?schema=S]``
    URL, as the first argument or as ``--store``."""
    fn = click.option(
        "--store",
        "store_flag",
        metavar="PATH|URL",
        expose_value=False,
        help="the relay store, instead of STORE: a SQLite file or postgresql://host/db[?schema=S]",
    )(fn)
    return click.argument("store", metavar="STORE")(fn)


json_option = click.option(
    "--json", "as_json", is_flag=True, help="print one JSON document on stdout"
)


def _emit(value: Any) -> None:
    click.echo(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


@contextmanager
def _opened(spec: str) -> Iterator[RelayStore]:
    store = open_store(spec)
    try:
        yield store
    finally:
        store.close()


@click.group("relay")
def relay_group() -> None:
    """Relay store administration and the relay server ('relay serve')."""


@relay_group.command("init", cls=StoreCommand)
@store_argument
@json_option
def init_cmd(store: str, as_json: bool) -> None:
    """Create an empty relay store STORE (a SQLite file, or a schema in an
    existing PostgreSQL database)."""
    create_store(store).close()
    if as_json:
        _emit({"store": describe(store), "created": True})
    else:
        click.echo(f"created relay store {describe(store)}")


@relay_group.command("enroll", cls=StoreCommand)
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
    store: str, dataset: str, node: str, read_only: bool, carrier: bool, as_json: bool
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


@relay_group.command("revoke", cls=StoreCommand)
@store_argument
@click.argument("dataset")
@click.argument("node")
@json_option
def revoke_cmd(store: str, dataset: str, node: str, as_json: bool) -> None:
    """Revoke NODE of DATASET: its token stops working and its writes are refused."""
    with _opened(store) as relay:
        newly = relay.revoke(dataset, node)
    if as_json:
        _emit({"dataset": dataset, "node": node, "revoked": True, "already": not newly})
    elif newly:
        click.echo(f"revoked node '{node}' of dataset '{dataset}'")
    else:
        click.echo(f"node '{node}' of dataset '{dataset}' was already revoked")


@relay_group.command("lock", cls=StoreCommand)
@store_argument
@click.argument("dataset")
@click.argument("period")
@json_option
def lock_cmd(store: str, dataset: str, period: str, as_json: bool) -> None:
    """Lock PERIOD (YYYY or YYYY-MM) of DATASET: the relay refuses every
    change to its documents (a year covers its months; a month does not cover
    the yearly document). Downloads go on. Applies to a serving relay at once."""
    with _opened(store) as relay:
        newly = relay.lock_period(dataset, period)
    _said(dataset, period, newly, "locked", as_json)


@relay_group.command("unlock", cls=StoreCommand)
@store_argument
@click.argument("dataset")
@click.argument("period")
@json_option
def unlock_cmd(store: str, dataset: str, period: str, as_json: bool) -> None:
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


@relay_group.command("status", cls=StoreCommand)
@store_argument
@json_option
def status_cmd(store: str, as_json: bool) -> None:
    """Datasets, their nodes (read-only, carrier, revoked), locked periods, documents
    and update counts."""
    with _opened(store) as relay:
        info = relay.status()
        seen = relay.last_seen()
    if as_json:
        _emit(
            {
                "store": describe(store),
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
        console.print(f"{describe(store)}: no datasets yet (enroll a node to create one)")
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


@relay_group.command("migrate")
@click.option(
    "--from",
    "source",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="the SQLite relay store file to copy",
)
@click.option(
    "--to", "target", required=True, metavar="URL", help="postgresql://host/db[?schema=S]"
)
@json_option
def migrate_cmd(source: Path, target: str, as_json: bool) -> None:
    """Copy the SQLite relay store --from into a new PostgreSQL store --to
    (datasets, nodes with their token hashes, logs, snapshots, series,
    leases, locks, last seen), then compare row counts. Stop the relay first."""
    from .migrate import migrate
    from .pg_store import is_pg_url

    if not is_pg_url(target):
        raise UserError(f"--to takes a postgresql:// URL, not {target!r}")
    done = migrate(source, target)
    if as_json:
        _emit({"from": done.source, "to": done.target, "rows": done.rows})
        return
    rows = ", ".join(f"{n} {t}" for t, n in done.rows.items())
    click.echo(f"copied {done.source} into {done.target}: {rows}; counts match")


# ``list`` is the same view: operators reach for either name.
relay_group.add_command(status_cmd, "list")


@relay_group.command("serve", cls=StoreCommand)
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
@click.option(
    "--wait-store",
    default=60.0,
    show_default=True,
    type=click.FloatRange(0),
    help="seconds to wait for an unreachable PostgreSQL store at start (a server restarting)",
)
@json_option
def serve_cmd(
    store: str,
    host: str,
    port: int,
    tls_cert: Path | None,
    tls_key: Path | None,
    wait_store: float,
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
    opened = open_store_waiting(store, wait_store, time.monotonic, time.sleep)
    try:
        asyncio.run(_serve(opened, describe(store), host, port, context, as_json))
    finally:
        opened.close()


def open_store_waiting(
    spec: str, wait_s: float, clock: Callable[[], float], sleep: Callable[[float], None]
) -> RelayStore:
    """``open_store(spec)``, tried again (every 0.5 s) for up to ``wait_s``
    seconds while its server is unreachable (StoreUnavailable), saying so
    once. Raises what ``open_store`` raises; StoreUnavailable after
    ``wait_s``."""
    deadline = clock() + wait_s
    told = False
    while True:
        try:
            return open_store(spec)
        except StoreUnavailable as exc:
            if clock() >= deadline:
                raise StoreUnavailable(f"{exc} (waited {wait_s:g} s, --wait-store)") from None
            if not told:
                log.warning("%s; waiting up to %g s for it (--wait-store)", exc, wait_s)
                told = True
            sleep(min(0.5, max(0.0, deadline - clock())))


async def _serve(
    store: RelayStore,
    name: str,
    host: str,
    port: int,
    context: ssl.SSLContext | None,
    as_json: bool,
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
        click.echo(orjson.dumps({"serving": name, "url": server.url}).decode())
    else:
        click.echo(f"relay serving {name} on {server.url}", nl=True)
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop()
    click.echo(orjson.dumps({"stopped": name}).decode() if as_json else "relay stopped")
