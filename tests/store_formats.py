"""A node store turned back into an older format, as that Branchline wrote
it, to test the upgrade path: one list of what each format added."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from engine.store.node_store import FORMAT_VERSION, STORE_FILE

# format -> SQL removing what it added over the format before
UNDO = {
    8: "DROP TABLE snapshot_parts;",
    7: "DROP TABLE pending_set; DROP TABLE pending_docs; DROP TRIGGER outbox_local_in; "
    "DROP TRIGGER outbox_row_back; DROP TRIGGER outbox_local_out; DROP TRIGGER outbox_local_gone; "
    "DROP TRIGGER outbox_imported_acked; DROP TRIGGER outbox_imported_gone; "
    "DROP TRIGGER outbox_imported_in; DROP TRIGGER outbox_imported_out;",
    6: "DROP TABLE shared_keys; DROP TABLE dangling_refs;",
    5: "ALTER TABLE sync_failures DROP COLUMN code;",
    4: "DROP VIEW pending_records; DROP TABLE outbox_records;",
    3: "DROP TABLE clients;",
    2: "DROP TABLE resolutions; DROP TABLE waiting; DROP INDEX records_alias; "
    "ALTER TABLE records DROP COLUMN alias_of;",
}


def downgrade(home: Path, version: int) -> None:
    """Make the (closed) store in ``home`` a store of format ``version``."""
    script = " ".join(UNDO[v] for v in range(FORMAT_VERSION, version, -1))
    conn = sqlite3.connect(Path(home) / STORE_FILE)
    try:
        conn.executescript(f"{script} PRAGMA user_version = {version};")
    finally:
        conn.close()
