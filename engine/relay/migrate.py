"""``branchline relay migrate``: copy a SQLite relay store into a new
PostgreSQL one, table by table (nodes keep their token hashes, so every
node's token goes on working), then compare the row counts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import RelayStoreExists, StoreError
from .pg_store import PgRelayStore
from .sqlite_store import SqliteRelayStore

#: The tables copied, in an order that satisfies the foreign keys, and
#: their columns as both stores hold them for the copy.
TABLES: dict[str, tuple[str, ...]] = {
    "datasets": ("id", "name", "created_at", "head", "folded"),
    "nodes": (
        "dataset_id",
        "name",
        "salt",
        "token_hash",
        "read_only",
        "enrolled_at",
        "revoked_at",
        "carrier",
    ),
    "updates": ("dataset_id", "position", "doc", "data", "node", "at", "waiting", "digest"),
    "snapshots": ("dataset_id", "doc", "upto", "data", "at"),
    "documents": ("dataset_id", "doc", "updates", "bytes"),
    "series": ("dataset_id", "series_key", "next"),
    "locks": ("dataset_id", "period", "at"),
    "leases": ("id", "dataset_id", "series_key", "first", "last", "node", "at"),
    "node_seen": ("dataset", "node", "at"),
}


@dataclass(frozen=True)
class Migrated:
    """Rows copied per table (equal in both stores) and the revocations counter."""

    source: str
    target: str
    rows: dict[str, int]
    revocations: int


def migrate(source: str | Path, target: str) -> Migrated:
    """Copy the SQLite relay store ``source`` into the PostgreSQL store
    ``target`` (created, or existing and holding no dataset), in one
    transaction, and check that every table has as many rows on both sides.
    Raises RelayStoreNotFound, RelayStoreExists (a target holding datasets),
    StoreError (a count differs: nothing is kept)."""
    src = SqliteRelayStore.open(source)
    try:
        try:
            dst = PgRelayStore.create(target)
        except RelayStoreExists:
            dst = PgRelayStore.open(target)
            if dst.status():
                dst.close()
                raise RelayStoreExists(
                    f"{dst.path} already holds datasets: migrate into an empty store"
                ) from None
        try:
            revocations = src.revocations()
            want = {table: src.count_rows(table) for table in TABLES}
            got = dst.import_rows(
                {table: (cols, src.export_rows(table)) for table, cols in TABLES.items()},
                revocations,
            )
            if got != want:
                raise StoreError(
                    f"the copy into {dst.path} does not match {source} "
                    f"(rows {got} against {want}); nothing was kept"
                )
            return Migrated(str(source), dst.path, got, revocations)
        finally:
            dst.close()
    finally:
        src.close()
