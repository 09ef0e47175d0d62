"""The node store's file: its tables, format versions and migrations, the
connection, and the write transaction (``WriteTxn``) every writer uses. What
the tables hold is read and written by one module per concept (``doclog``,
``outbox``, ``records``, ``failures``, ``meta``).

Durability: WAL with ``synchronous=FULL``, so a commit is on disk when
``transaction()`` returns. Several processes may open one store; writers are
serialized by ``BEGIN IMMEDIATE`` and see each other's commits through
``PRAGMA data_version``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import FormatVersionError, HomeExists, HomeNotFound, StoreError
from . import meta as meta_table
from .conflict_index import INDEX_SQL, STALE_META
from .health import check_store, problem, recovery_hint
from .private import create_file, make_home
from .turns import turns_of
from .txn import WriteTxn

STORE_FILE = "branchline.db"
FORMAT_VERSION = 8
BUSY_TIMEOUT_MS = 30_000
CACHE_KIB = 16_384

SCHEMA_SQL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

-- Update log: every CRDT update this node holds that is not yet folded into a
-- snapshot. pending = 1 marks local updates the relay has not acknowledged
-- (the outbox), and they survive compaction until acknowledged.
CREATE TABLE updates (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    doc TEXT NOT NULL,
    data BLOB NOT NULL,
    origin TEXT NOT NULL CHECK (origin IN ('local', 'remote')),
    pending INTEGER NOT NULL DEFAULT 0,
    record TEXT,  -- the record a local update wrote (one per local update)
    at INTEGER NOT NULL
);
CREATE INDEX updates_doc ON updates (doc, seq);
CREATE INDEX updates_outbox ON updates (seq) WHERE pending = 1;

-- Snapshot of a document: its full state after replaying every update with
-- seq <= upto.
CREATE TABLE snapshots (
    doc TEXT PRIMARY KEY,
    upto INTEGER NOT NULL,
    data BLOB NOT NULL,
    at INTEGER NOT NULL
);

-- Records as resolved from CRDT state (values JSON in stored form), kept in the
-- same transaction as the update that changed them.
CREATE TABLE records (
    collection TEXT NOT NULL,
    id TEXT NOT NULL,
    doc TEXT NOT NULL,
    key TEXT,
    deleted INTEGER NOT NULL,
    created_hlc INTEGER NOT NULL,
    created_node TEXT NOT NULL,
    updated_hlc INTEGER NOT NULL,
    data TEXT NOT NULL,
    alias_of TEXT,  -- merged into this record of the same collection (resolve --merge-into)
    PRIMARY KEY (collection, id)
) WITHOUT ROWID;
-- Lookups by unique key name this index (INDEXED BY): without ANALYZE
-- statistics SQLite prefers scanning the primary key.
CREATE INDEX records_key ON records (collection, key, created_hlc, created_node);

-- Conflicts inside one record (concurrent_edit, edit_delete), derived.
CREATE TABLE record_conflicts (
    id TEXT PRIMARY KEY,
    collection TEXT NOT NULL,
    record_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    field TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX record_conflicts_record ON record_conflicts (collection, record_id);

CREATE TABLE series_counters (series TEXT PRIMARY KEY, next INTEGER NOT NULL);
CREATE TABLE series_blocks (
    series TEXT NOT NULL,
    start INTEGER NOT NULL,
    stop INTEGER NOT NULL,  -- last number of the block, inclusive
    next INTEGER NOT NULL,
    PRIMARY KEY (series, start)
);
CREATE TABLE series_journal (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    series TEXT NOT NULL,
    number TEXT NOT NULL,
    event TEXT NOT NULL CHECK (event IN ('issued', 'provisional', 'finalized', 'void', 'lease')),
    collection TEXT,
    record_id TEXT,
    detail TEXT,
    at INTEGER NOT NULL
);
CREATE TABLE provisional (
    record_id TEXT PRIMARY KEY,
    collection TEXT NOT NULL,
    series TEXT NOT NULL,
    provisional TEXT NOT NULL,
    final TEXT,
    at INTEGER NOT NULL,
    finalized_at INTEGER
);

-- Sync failures (engine.sync): what could not be uploaded or imported, with
-- the reason: one row per (direction, document, reason), counting attempts.
CREATE TABLE sync_failures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    direction TEXT NOT NULL CHECK (direction IN ('upload', 'download')),
    doc TEXT NOT NULL,
    record TEXT,
    reason TEXT NOT NULL,
    first_at INTEGER NOT NULL,
    last_at INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1,
    code TEXT NOT NULL DEFAULT 'local',  -- format 5: the reason's code, as a column
    UNIQUE (direction, doc, reason)
);
"""

# Added in format 2 (conflict resolution).
RESOLUTION_SQL = """
-- Records merged into another (few): references to them read as the survivor.
CREATE INDEX records_alias ON records (collection, id) WHERE alias_of IS NOT NULL;

-- Resolutions journalled on records (engine.resolution), derived from
-- replicated state like the conflicts: every node lists the same.
CREATE TABLE resolutions (
    id TEXT PRIMARY KEY,
    collection TEXT NOT NULL,
    record_id TEXT NOT NULL,
    at INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX resolutions_record ON resolutions (collection, record_id);

-- Received records held back until a record they refer to arrives (or a
-- full sync ends without it): one row per missing target.
CREATE TABLE waiting (
    collection TEXT NOT NULL,
    id TEXT NOT NULL,
    doc TEXT NOT NULL,
    target_collection TEXT NOT NULL,
    target_id TEXT NOT NULL,
    PRIMARY KEY (collection, id, target_collection, target_id)
) WITHOUT ROWID;
CREATE INDEX waiting_target ON waiting (target_collection, target_id);
"""
SCHEMA_SQL += RESOLUTION_SQL

# Added in format 3 (own-only sync diffs, docs/sync.md).
CLIENTS_SQL = """
-- The Yjs client ids this store's Node instances wrote local updates with:
-- a sync answer to a relay that checks authorship carries only their items.
CREATE TABLE clients (client INTEGER PRIMARY KEY, first_at INTEGER NOT NULL);
"""
SCHEMA_SQL += CLIENTS_SQL

# Added in format 4 (imported outbox rows counted per record).
OUTBOX_RECORDS_SQL = """
-- The records an outbox row imported with import --unsynced carries (a
-- local row names its one record in updates.record).
CREATE TABLE outbox_records (
    seq INTEGER NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (seq, record)
) WITHOUT ROWID;

-- Every (outbox row, record it carries) of the outbox.
CREATE VIEW pending_records AS
    SELECT seq, doc, record FROM updates WHERE pending = 1 AND record IS NOT NULL
    UNION ALL
    SELECT u.seq, u.doc, o.record FROM outbox_records o JOIN updates u ON u.seq = o.seq
    WHERE u.pending = 1;
"""
SCHEMA_SQL += OUTBOX_RECORDS_SQL

# Added in format 5: sync failures carry their code in a column (before, only
# in the reason text, ``code: message``; a reason without one counts as local).
FAILURE_CODE_SQL = """
ALTER TABLE sync_failures ADD COLUMN code TEXT NOT NULL DEFAULT 'local';
UPDATE sync_failures SET code = substr(reason, 1, instr(reason, ': ') - 1)
WHERE instr(reason, ': ') > 1
    AND substr(reason, 1, instr(reason, ': ') - 1) NOT GLOB '*[^a-z0-9_]*'
    AND substr(reason, 1, instr(reason, ': ') - 1) GLOB '*[a-z]*';
"""

# Added in format 6: the conflict index (engine.store.conflict_index).
SCHEMA_SQL += INDEX_SQL

# Added in format 7: what waits to go up, counted as it changes (by
# triggers, in the transaction of the change), so a status asks one row per
# document instead of scanning the outbox: a branch offline for a day has
# tens of thousands of pending records and answers its screen every 50 ms.
PENDING_COUNTS_SQL = """
-- (document, record) carried by at least one outbox row, and how many.
CREATE TABLE pending_set (
    doc TEXT NOT NULL,
    record TEXT NOT NULL,
    rows INTEGER NOT NULL,
    PRIMARY KEY (doc, record)
) WITHOUT ROWID;
-- Per document with any, its records in pending_set.
CREATE TABLE pending_docs (doc TEXT PRIMARY KEY, records INTEGER NOT NULL) WITHOUT ROWID;

CREATE TRIGGER pending_set_in AFTER INSERT ON pending_set BEGIN
    INSERT INTO pending_docs VALUES (NEW.doc, 1)
        ON CONFLICT (doc) DO UPDATE SET records = records + 1;
END;
CREATE TRIGGER pending_set_out AFTER DELETE ON pending_set BEGIN
    UPDATE pending_docs SET records = records - 1 WHERE doc = OLD.doc;
    DELETE FROM pending_docs WHERE doc = OLD.doc AND records <= 0;
END;

CREATE TRIGGER outbox_local_in AFTER INSERT ON updates
WHEN NEW.pending = 1 AND NEW.record IS NOT NULL BEGIN
    INSERT INTO pending_set VALUES (NEW.doc, NEW.record, 1)
        ON CONFLICT (doc, record) DO UPDATE SET rows = rows + 1;
END;
CREATE TRIGGER outbox_row_back AFTER UPDATE OF pending ON updates
WHEN OLD.pending = 0 AND NEW.pending = 1 BEGIN
    INSERT INTO pending_set
        SELECT NEW.doc, r, 1 FROM (
            SELECT NEW.record AS r WHERE NEW.record IS NOT NULL
            UNION ALL SELECT record FROM outbox_records WHERE seq = NEW.seq
        ) WHERE true
        ON CONFLICT (doc, record) DO UPDATE SET rows = rows + 1;
END;
CREATE TRIGGER outbox_local_out AFTER UPDATE OF pending ON updates
WHEN OLD.pending = 1 AND NEW.pending = 0 AND OLD.record IS NOT NULL BEGIN
    UPDATE pending_set SET rows = rows - 1 WHERE doc = OLD.doc AND record = OLD.record;
    DELETE FROM pending_set WHERE doc = OLD.doc AND record = OLD.record AND rows <= 0;
END;
CREATE TRIGGER outbox_local_gone AFTER DELETE ON updates
WHEN OLD.pending = 1 AND OLD.record IS NOT NULL BEGIN
    UPDATE pending_set SET rows = rows - 1 WHERE doc = OLD.doc AND record = OLD.record;
    DELETE FROM pending_set WHERE doc = OLD.doc AND record = OLD.record AND rows <= 0;
END;
-- An imported row's records (its record is NULL) leave with the row, and with
-- their outbox_records rows while it is still pending.
CREATE TRIGGER outbox_imported_acked AFTER UPDATE OF pending ON updates
WHEN OLD.pending = 1 AND NEW.pending = 0 AND OLD.record IS NULL BEGIN
    UPDATE pending_set SET rows = rows - 1 WHERE doc = OLD.doc
        AND record IN (SELECT record FROM outbox_records WHERE seq = OLD.seq);
    DELETE FROM pending_set WHERE doc = OLD.doc AND rows <= 0
        AND record IN (SELECT record FROM outbox_records WHERE seq = OLD.seq);
END;
CREATE TRIGGER outbox_imported_gone AFTER DELETE ON updates
WHEN OLD.pending = 1 AND OLD.record IS NULL BEGIN
    UPDATE pending_set SET rows = rows - 1 WHERE doc = OLD.doc
        AND record IN (SELECT record FROM outbox_records WHERE seq = OLD.seq);
    DELETE FROM pending_set WHERE doc = OLD.doc AND rows <= 0
        AND record IN (SELECT record FROM outbox_records WHERE seq = OLD.seq);
END;

CREATE TRIGGER outbox_imported_in AFTER INSERT ON outbox_records BEGIN
    INSERT INTO pending_set
        SELECT doc, NEW.record, 1 FROM updates WHERE seq = NEW.seq AND pending = 1
        ON CONFLICT (doc, record) DO UPDATE SET rows = rows + 1;
END;
CREATE TRIGGER outbox_imported_out AFTER DELETE ON outbox_records BEGIN
    UPDATE pending_set SET rows = rows - 1 WHERE record = OLD.record
        AND doc = (SELECT doc FROM updates WHERE seq = OLD.seq AND pending = 1);
    DELETE FROM pending_set WHERE record = OLD.record AND rows <= 0
        AND doc = (SELECT doc FROM updates WHERE seq = OLD.seq AND pending = 1);
END;
"""
SCHEMA_SQL += PENDING_COUNTS_SQL
# Added in format 8: a large snapshot is stored in parts (each a Yjs update;
# applied in order they are the snapshot), so loading a document reads and
# applies one part at a time instead of holding tens of MB beside it. Part 0
# stays in ``snapshots.data``: a snapshot of format 7 is a snapshot of one part.
SNAPSHOT_PARTS_SQL = """
CREATE TABLE snapshot_parts (
    doc TEXT NOT NULL,
    part INTEGER NOT NULL,  -- 1, 2, ...: after snapshots.data
    data BLOB NOT NULL,
    PRIMARY KEY (doc, part)
);
"""
SCHEMA_SQL += SNAPSHOT_PARTS_SQL
PENDING_BACKFILL_SQL = """
INSERT INTO pending_set
    SELECT doc, record, COUNT(*) FROM pending_records GROUP BY doc, record;
"""

# Format n -> n + 1. Each step only adds, so older rows stay exactly right.
MIGRATIONS = {
    1: "ALTER TABLE records ADD COLUMN alias_of TEXT;\n" + RESOLUTION_SQL,
    2: CLIENTS_SQL,
    3: OUTBOX_RECORDS_SQL,
    4: FAILURE_CODE_SQL,
    # Derived from records by code, not SQL: rebuilt when the node first opens.
    5: INDEX_SQL + f"\nINSERT INTO meta (key, value) VALUES ('{STALE_META}', '1');",
    6: PENDING_COUNTS_SQL + PENDING_BACKFILL_SQL,
    7: SNAPSHOT_PARTS_SQL,
}


class NodeStore:
    """An open node store. Not thread-safe: one per thread."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self.path = path
        self.conn = conn
        self._data_version = -1
        self._depth = 0  # transactions open: inner ones are savepoints
        self._turns = turns_of(path)  # this process's other stores of the file
        #: Called with "before_commit" (the statements done, COMMIT not yet
        #: run) and "after_commit" (durable) for every write transaction, and
        #: with "mid_materialize" inside each materialization (records
        #: written, the rest of the batch not): the simulator's crash points
        #: (harness.sim). None in normal use.
        self.commit_points: Callable[[str], None] | None = None

    @staticmethod
    def file_in(home: Path) -> Path:
        return Path(home) / STORE_FILE

    @classmethod
    def create(cls, home: Path, meta: dict[str, str]) -> NodeStore:
        """Create the store in ``home`` (made if missing). Raises HomeExists."""
        home = Path(home)
        path = cls.file_in(home)
        if path.exists():
            damage = problem(path, full=False)
            if damage is not None:
                raise HomeExists(
                    f"{home} already holds a node store file that {damage}; {recovery_hint(home)}"
                )
            raise HomeExists(f"{home} already holds a node store ({path.name}); open it instead")
        make_home(home)
        create_file(path)  # 0600 before SQLite writes the token into it
        store = cls(path, _connect(path))
        with store.transaction() as txn:
            # executescript() would commit; statement by statement keeps it atomic.
            for statement in _statements(SCHEMA_SQL):
                txn.execute(statement)
            meta_table.insert_many(txn, meta)
            txn.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
        return store

    @classmethod
    def open(cls, home: Path) -> NodeStore:
        """Open an existing store. Raises HomeNotFound, StoreDamaged (nothing
        written to a damaged file) or FormatVersionError."""
        path = cls.file_in(Path(home))
        if not path.is_file():
            raise HomeNotFound(
                f"no node store in {home}; create one with 'branchline node init --home {home} ...'"
            )
        check_store(path)
        conn = _connect(path)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in MIGRATIONS and version != FORMAT_VERSION:
            conn.close()
            raise FormatVersionError(
                f"{path} has store format {version}, this Branchline reads formats "
                f"{min(MIGRATIONS)}-{FORMAT_VERSION}; use the Branchline version that wrote it"
            )
        store = cls(path, conn)
        if version != FORMAT_VERSION:
            store._migrate()
        return store

    def _migrate(self) -> None:
        """Upgrade an older format in one transaction (another process may
        have done it first: the version is read again under the write lock)."""
        with self.transaction() as txn:
            version = txn.execute("PRAGMA user_version").fetchone()[0]
            while version != FORMAT_VERSION:
                for statement in _statements(MIGRATIONS[version]):
                    txn.execute(statement)
                version += 1
            txn.execute(f"PRAGMA user_version = {FORMAT_VERSION}")

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[WriteTxn]:
        """A write transaction holding the store's write lock; durable on exit.
        Inside another one it is a savepoint of it: undone alone on an
        exception, durable when the outermost one commits (group commit).

        Threads of this process writing the same file take turns in arrival
        order (``turns``). Rolls back (to the savepoint) and re-raises on any
        exception. Raises StoreError when the lock cannot be had within
        ``BUSY_TIMEOUT_MS`` or the commit fails.
        """
        if self._depth:
            yield from self._savepoint()
            return
        with self._turn():
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreError(f"{self.path}: cannot start a write ({exc})") from None
            self._depth = 1
            try:
                yield WriteTxn(self.conn, self.commit_points)
                if self.commit_points is not None:
                    self.commit_points("before_commit")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            finally:
                self._depth = 0
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self.conn.execute("ROLLBACK")
                raise StoreError(f"{self.path}: commit failed ({exc})") from None
        if self.commit_points is not None:
            self.commit_points("after_commit")

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """This thread's turn among the process's writers of the file.
        Raises StoreError when it does not come within ``BUSY_TIMEOUT_MS``."""
        if not self._turns.take(BUSY_TIMEOUT_MS / 1000):
            raise StoreError(
                f"{self.path}: cannot start a write (another thread of this process "
                f"held the store for {BUSY_TIMEOUT_MS // 1000} s)"
            )
        try:
            yield
        finally:
            self._turns.give()

    def _savepoint(self) -> Iterator[WriteTxn]:
        name = f"nested_{self._depth}"
        self.conn.execute(f"SAVEPOINT {name}")
        self._depth += 1
        try:
            yield WriteTxn(self.conn, self.commit_points)
        except BaseException:
            self.conn.execute(f"ROLLBACK TO {name}")
            self.conn.execute(f"RELEASE {name}")
            raise
        finally:
            self._depth -= 1
        self.conn.execute(f"RELEASE {name}")

    def data_version(self) -> int:
        """SQLite's change counter of this connection: it moves whenever
        another connection commits (this one's own commits leave it)."""
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    def changed_elsewhere(self) -> bool:
        """True when another connection committed since the last call."""
        version = self.data_version()
        changed = version != self._data_version
        self._data_version = version
        return changed

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """One read snapshot of the store (or the write transaction under
        way): another process compacting between two queries would otherwise
        delete log rows this process has not applied yet."""
        conn = self.conn
        if conn.in_transaction:
            yield conn
            return
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def meta(self) -> dict[str, str]:
        return meta_table.read_all(self.conn)

    def get_meta(self, key: str) -> str | None:
        return meta_table.get(self.conn, key)

    def set_meta(self, key: str, value: str) -> None:
        """Inside ``transaction()``: set one meta key."""
        meta_table.put(WriteTxn(self.conn), key, value)

    def delete_meta(self, key: str) -> bool:
        """Inside ``transaction()``: remove one meta key; True when it was there."""
        return meta_table.delete(WriteTxn(self.conn), key)

    def integrity_check(self) -> str:
        return str(self.conn.execute("PRAGMA integrity_check").fetchone()[0])


def own_tables() -> frozenset[str]:
    """Names of the tables and views of the store's format (never an app's)."""
    scratch = sqlite3.connect(":memory:")
    try:
        scratch.executescript(SCHEMA_SQL)
        return frozenset(
            str(r[0])
            for r in scratch.execute("SELECT name FROM sqlite_master WHERE sql IS NOT NULL")
        )
    finally:
        scratch.close()


def _connect(path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        # Bulk imports touch many pages of the records table; the default 2 MB
        # cache makes them slower, a much larger one costs memory per process.
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {path}: {exc}") from None
    return conn


def _statements(script: str) -> list[str]:
    """The statements of a schema script, whole (a trigger's body holds
    semicolons; comments are dropped first, as they may hold some too; the
    script has no string literals containing --)."""
    out: list[str] = []
    current = ""
    for line in script.splitlines():
        current += line.split("--", 1)[0] + "\n"
        if sqlite3.complete_statement(current):
            out.append(current.strip().rstrip(";"))
            current = ""
    if current.strip():
        out.append(current.strip())
    return out
