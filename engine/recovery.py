"""Recovering a node home whose store file is damaged (``branchline node
recover``, docs/operations.md "A damaged store").

The damaged file is never deleted or written: it is renamed aside under a
dated name (with its ``-wal``/``-shm``), a fresh store is created for the
same node identity, and an export of the node, if given, is imported with its
series state. The fresh store is marked as not knowing its voucher numbers'
high-water mark, so it issues provisional numbers until its first completed
sync: it never reissues a number its earlier life printed.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from . import plugins
from .errors import RecoverRefused
from .exchange import import_from_file, read_export
from .node import ImportReport, Node
from .schema import Schema, parse_schema
from .store import NodeStore
from .store.health import problem, readable_meta

DAMAGED_SUFFIX = ".damaged-"
MAX_ASIDE = 1000  # dated names tried within one second


@dataclass(frozen=True)
class Recovered:
    """What ``recover`` did: the damage found, where the damaged file now
    lies, the identity of the fresh store and what the import changed."""

    damage: str
    moved_to: Path
    dataset: str
    node: str
    relay: str | None
    identity_from: str  # "store", "export" or "options"
    imported: ImportReport | None
    export_node: str | None


def recover(
    home: str | Path,
    *,
    export: str | Path | None = None,
    dataset: str | None = None,
    node: str | None = None,
    relay: str | None = None,
    token: str | None = None,
    now: dt.datetime | None = None,
) -> Recovered:
    """Set the damaged store of ``home`` aside and build a fresh one in its
    place, importing ``export`` if given.

    Identity (dataset, node, relay, token, schema, adapters) comes from the
    options, else from the damaged file's meta as far as it is readable, else
    from the export's header. Raises RecoverRefused (home without a store, a
    healthy store, identity unknown or contradicting the export; nothing
    changed), ExchangeFileError for a damaged export (nothing changed), and
    what ``Node.create`` and the import raise (the damaged file then stays
    aside under its new name).
    """
    home = Path(home)
    path = NodeStore.file_in(home)
    if not path.is_file():
        raise RecoverRefused(
            f"no node store in {home}: nothing to recover; create one with "
            f"'branchline node init --home {home} ...'"
        )
    damage = problem(path)
    if damage is None:
        raise RecoverRefused(f"the node store {path} is healthy: nothing to recover")
    header = read_export(export)[0] if export is not None else None
    old = readable_meta(path)
    if dataset and node:
        identity_from = "options"
    elif old.get("dataset") and old.get("node"):
        identity_from = "store"
    else:
        identity_from = "export"
    dataset = dataset or old.get("dataset") or (header.dataset if header else None)
    node = node or old.get("node") or (header.node if header else None)
    if not dataset or not node:
        raise RecoverRefused(
            f"cannot tell which node {home} was (its store is unreadable and no export "
            "was given): give --dataset and --node"
        )
    if header is not None and header.dataset != dataset:
        raise RecoverRefused(
            f"{export} is an export of dataset '{header.dataset}', not '{dataset}'; nothing changed"
        )
    relay = relay or old.get("relay")
    token = token or old.get("token")
    if (relay is None) != (token is None):
        raise RecoverRefused("the relay URL and token are not both known: give --relay and --token")
    schema: Schema | str = "accounting"
    if "schema_source" in old:
        schema = parse_schema(old["schema_source"], origin=f"{path} (stored schema)")
    moved_to = _set_aside(path, now or dt.datetime.now(dt.UTC))
    fresh = Node.create(
        home,
        dataset=dataset,
        node=node,
        schema=schema,
        relay=relay,
        token=token,
        adapters=plugins.enabled(old) or None,
        new_node=False,
    )
    with fresh:
        report = import_from_file(fresh, export).report if export is not None else None
    return Recovered(
        damage=damage,
        moved_to=moved_to,
        dataset=dataset,
        node=node,
        relay=relay,
        identity_from=identity_from,
        imported=report,
        export_node=header.node if header else None,
    )


def _set_aside(path: Path, now: dt.datetime) -> Path:
    """Rename ``path`` (and its -wal, -shm) to a dated name not yet taken;
    durable (the directory is fsynced). Returns the new name."""
    stamp = now.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    for n in range(MAX_ASIDE):
        dest = path.with_name(f"{path.name}{DAMAGED_SUFFIX}{stamp}" + (f".{n}" if n else ""))
        if not dest.exists():
            break
    else:
        raise RecoverRefused(f"too many damaged copies named {path.name}{DAMAGED_SUFFIX}{stamp}")
    for ext in ("-wal", "-shm"):
        side = path.with_name(path.name + ext)
        if side.exists():
            os.rename(side, dest.with_name(dest.name + ext))
    os.rename(path, dest)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return dest
