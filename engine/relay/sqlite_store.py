"""``SqliteRelayStore``: the embedded relay store, one SQLite file per relay.

Durability: WAL with ``synchronous=FULL``; every write runs in one
``BEGIN IMMEDIATE`` transaction, so it is on disk when the method returns.
The format version is in ``PRAGMA user_version`` and the file is marked as a
relay store by ``PRAGMA application_id`` (a node store is refused).

Duplicates: every document the relay serves is held in an in-memory pycrdt
``Doc`` (loaded from snapshot + log tail, evicted least recently used under a
memory budget). An incoming update is integrated into it, and it is logged only
when it changed the document (detected by the document's update observer,
which fires for new items and for new deletions alike) or when part of it waits
for updates the relay has not seen yet (its state vector is ahead of the
document's). A waiting update is logged raw, at most once (by SHA-256), and kept
through compactions until the document covers it. So a re-sent update, or one
that only repeats content another node already delivered, costs no row.
Limitation: an update made only of deletions of items the relay has never seen
(which Branchline nodes do not produce: their diffs carry every item their
deletions refer to) is treated as a duplicate.

Compaction replays instead of merging (``pycrdt.merge_updates`` over many
updates is quadratic): the loaded document already is snapshot + tail, so its
``get_update()`` becomes the new snapshot, written in the same transaction that
deletes the folded rows that are ``keep_positions`` behind the dataset's head
(the others stay for ``logged_after``, skipped when a document is loaded).
Interrupting it leaves the old snapshot and log.

Positions: ``datasets.head`` is bumped in the append's write transaction
(``BEGIN IMMEDIATE`` serializes writers, so positions follow commit order);
``wait_changes`` polls ``PRAGMA data_version`` on a connection of its own and
compares heads.

Concurrency: methods are thread-safe (one lock around one connection). Several
processes may open the store: writes are serialized by SQLite, ``lease`` is
exact across processes, and a process that notices another process's commit
(``PRAGMA data_version``) drops its cached documents and reloads them. One
relay process is expected to own the update log; admin commands (enroll,
revoke) may run beside it.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from ..crdt.statevec import decode_state_vector
from ..errors import (
    BranchlineError,
    FormatVersionError,
    NotAuthor,
    RelayStoreExists,
    RelayStoreNotFound,
    StoreError,
    UnknownNode,
    UpdateError,
)
from ..tokens import new_token, token_hash
from .doccache import DocCache, Loaded, diff_of, integrate, still_waiting
from .doccache import RelayLimits as RelayLimits  # where callers have imported it from
from .rules import (
    check_dataset,
    check_doc,
    check_follow,
    check_lease,
    check_node,
    check_period,
    grant_for,
    lapse_reason,
    locked_by,
    prechecked,
    room_refusal,
    unknown_dataset,
    writer_refusal,
)
from .store import (
    EMPTY_STATE_VECTOR,
    EMPTY_UPDATE,
    Appended,
    DatasetInfo,
    DocumentInfo,
    Enrollment,
    Logged,
    NodeGrant,
    NodeInfo,
    RelayStore,
    UpdateIn,
)

# 2: period locks; 3: carrier nodes; 4: dataset positions (older files are
# upgraded when opened)
FORMAT_VERSION = 4
APPLICATION_ID = 0x424C5259  # "BLRY": a Branchline relay store
BUSY_TIMEOUT_MS = 30_000
# wait_changes polls PRAGMA data_version every WATCH_MIN_S after a change,
# backing off to WATCH_MAX_S while nothing moves (an idle relay polling every
# 3 ms cost 3.5% of a CPU; at 25 ms, a few tenths of one).
WATCH_MIN_S = 0.002
WATCH_MAX_S = 0.025

SCHEMA_SQL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

-- head: the position of the dataset's latest stored update (0 before any),
-- folded: the highest position whose log row a compaction deleted.
CREATE TABLE datasets (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    head INTEGER NOT NULL DEFAULT 0,
    folded INTEGER NOT NULL DEFAULT 0
);

-- token_hash = HMAC-SHA256(key=salt, token): the token itself is never stored.
CREATE TABLE nodes (
    dataset_id INTEGER NOT NULL REFERENCES datasets (id),
    name TEXT NOT NULL,
    salt BLOB NOT NULL,
    token_hash BLOB NOT NULL,
    read_only INTEGER NOT NULL,
    enrolled_at INTEGER NOT NULL,
    revoked_at INTEGER,
    carrier INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (dataset_id, name)
) WITHOUT ROWID;

-- Update log: updates not yet folded into their document's snapshot, plus
-- waiting updates (part of them waits for updates not seen yet) that a
-- compaction keeps until the document covers them, plus folded rows kept
-- for ``logged_after`` (RelayLimits.keep_positions). position: 1, 2, ... per
-- dataset in commit order.
CREATE TABLE updates (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset_id INTEGER NOT NULL,
    doc TEXT NOT NULL,
    data BLOB NOT NULL,
    node TEXT NOT NULL,
    at INTEGER NOT NULL,
    waiting INTEGER NOT NULL DEFAULT 0,
    digest BLOB,
    position INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX updates_doc ON updates (dataset_id, doc, seq);
CREATE INDEX updates_position ON updates (dataset_id, position);
CREATE UNIQUE INDEX updates_waiting ON updates (dataset_id, doc, digest) WHERE waiting = 1;

-- A document's full state after every log row with seq <= upto.
CREATE TABLE snapshots (
    dataset_id INTEGER NOT NULL,
    doc TEXT NOT NULL,
    upto INTEGER NOT NULL,
    data BLOB NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (dataset_id, doc)
) WITHOUT ROWID;

-- Per document counters for status (updates and bytes ever stored).
CREATE TABLE documents (
    dataset_id INTEGER NOT NULL,
    doc TEXT NOT NULL,
    updates INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (dataset_id, doc)
) WITHOUT ROWID;

-- blocks series: the next number never handed out, per company-wide series.
CREATE TABLE series (
    dataset_id INTEGER NOT NULL,
    series_key TEXT NOT NULL,
    next INTEGER NOT NULL,
    PRIMARY KEY (dataset_id, series_key)
) WITHOUT ROWID;
-- Locked periods, 'YYYY' or 'YYYY-MM': updates of their documents are refused.
CREATE TABLE locks (
    dataset_id INTEGER NOT NULL,
    period TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (dataset_id, period)
) WITHOUT ROWID;
CREATE TABLE leases (
    id INTEGER PRIMARY KEY,
    dataset_id INTEGER NOT NULL,
    series_key TEXT NOT NULL,
    first INTEGER NOT NULL,
    last INTEGER NOT NULL,
    node TEXT,
    at INTEGER NOT NULL
);
"""


class SqliteRelayStore(RelayStore):
    """The embedded relay store. Open with ``create`` or ``open``."""

    def __init__(self, path: Path, conn: sqlite3.Connection, limits: RelayLimits) -> None:
        self.path = path
        self.limits = limits
        self._conn = conn
        self._lock = threading.RLock()
        self._cache = DocCache(limits)
        self._data_version = int(conn.execute("PRAGMA data_version").fetchone()[0])
        self._closed = False
        # wait_changes: its own connection (PRAGMA data_version moves for
        # commits of every other connection, this store's included) and the
        # heads it reported last, from the moment the store opened.
        self._watch_lock = threading.Lock()
        self._watch: sqlite3.Connection | None = None
        self._watch_version: int | None = None
        self._heads: dict[str, int] = {}  # a new store has no dataset

    # -- opening -----------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, limits: RelayLimits | None = None) -> SqliteRelayStore:
        """Create a new relay store file. Raises RelayStoreExists, StoreError."""
        path = Path(path)
        if path.exists():
            raise RelayStoreExists(f"{path} already exists; open it instead of creating it")
        if not path.parent.is_dir():
            raise RelayStoreNotFound(f"cannot create {path}: directory {path.parent} is missing")
        store = cls(path, _connect(path), limits or RelayLimits())
        with store._write() as conn:
            # executescript() would commit; statement by statement keeps it atomic.
            for statement in SCHEMA_SQL.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO meta (key, value) VALUES ('created_at', ?)", (str(_now()),))
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
        return store

    @classmethod
    def open(cls, path: str | Path, limits: RelayLimits | None = None) -> SqliteRelayStore:
        """Open an existing relay store. Raises RelayStoreNotFound,
        FormatVersionError, StoreError (not a relay store)."""
        path = Path(path)
        if not path.is_file():
            raise RelayStoreNotFound(
                f"no relay store at {path}; create one with 'branchline relay init {path}'"
            )
        conn = _connect(path)
        try:
            app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"{path} is not a Branchline relay store ({exc})") from None
        if app_id != APPLICATION_ID:
            conn.close()
            raise StoreError(f"{path} is not a Branchline relay store")
        if version in (1, 2, 3):
            _upgrade(conn, version)
            version = FORMAT_VERSION
        if version != FORMAT_VERSION:
            conn.close()
            raise FormatVersionError(
                f"{path} has relay store format {version}, this Branchline reads format "
                f"{FORMAT_VERSION}; use the Branchline version that wrote it"
            )
        store = cls(path, conn, limits or RelayLimits())
        store._heads = _heads(conn)
        return store

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._cache.clear()
                self._conn.close()
        with self._watch_lock:
            if self._watch is not None:
                self._watch.close()
                self._watch = None

    def __enter__(self) -> SqliteRelayStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check``: "ok" for a sound file."""
        with self._lock:
            return str(self._conn.execute("PRAGMA integrity_check").fetchone()[0])

    # -- nodes -------------------------------------------------------------

    def enroll(
        self, dataset: str, node: str, *, read_only: bool = False, carrier: bool = False
    ) -> Enrollment:
        check_dataset(dataset)
        check_node(node)
        token, salt = new_token()
        now = _now()
        with self._lock, self._write() as conn:
            row = conn.execute("SELECT id FROM datasets WHERE name = ?", (dataset,)).fetchone()
            created = row is None
            if row is None:
                cur = conn.execute(
                    "INSERT INTO datasets (name, created_at) VALUES (?, ?)", (dataset, now)
                )
                assert cur.lastrowid is not None
                ds_id = cur.lastrowid
            else:
                ds_id = int(row[0])
            cur = conn.execute(
                "UPDATE nodes SET salt = ?, token_hash = ?, read_only = ?, carrier = ?, "
                "enrolled_at = ?, revoked_at = NULL WHERE dataset_id = ? AND name = ?",
                (salt, token_hash(salt, token), int(read_only), int(carrier), now, ds_id, node),
            )
            replaced = cur.rowcount > 0
            if replaced:  # the old token stops working: open connections must notice
                _bump_revocations(conn)
            else:
                conn.execute(
                    "INSERT INTO nodes (dataset_id, name, salt, token_hash, read_only, "
                    "carrier, enrolled_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (ds_id, node, salt, token_hash(salt, token), int(read_only), int(carrier), now),
                )
        return Enrollment(dataset, node, token, read_only, replaced, created, carrier)

    def revoke(self, dataset: str, node: str) -> bool:
        check_dataset(dataset)
        check_node(node)
        with self._lock, self._write() as conn:
            ds_id = self._dataset_id(conn, dataset)
            row = conn.execute(
                "SELECT revoked_at FROM nodes WHERE dataset_id = ? AND name = ?", (ds_id, node)
            ).fetchone()
            if row is None:
                raise UnknownNode(f"dataset '{dataset}' has no enrolled node '{node}'")
            if row[0] is not None:
                return False
            conn.execute(
                "UPDATE nodes SET revoked_at = ? WHERE dataset_id = ? AND name = ?",
                (_now(), ds_id, node),
            )
            _bump_revocations(conn)
            return True

    # Last seen (issue 18): a table of its own, made on first use, so the
    # store format does not change for it.

    def note_seen(self, dataset: str, node: str, at_ms: int) -> None:
        with self._lock, self._write() as conn:
            conn.execute(_SEEN_SQL)
            conn.execute(
                "INSERT INTO node_seen (dataset, node, at) VALUES (?, ?, ?) "
                "ON CONFLICT (dataset, node) DO UPDATE SET at = max(at, excluded.at)",
                (dataset, node, at_ms),
            )

    def last_seen(self) -> dict[tuple[str, str], int]:
        with self._lock:
            if self._closed:
                raise StoreError(f"{self.path}: the relay store is closed")
            try:
                rows = self._conn.execute("SELECT dataset, node, at FROM node_seen").fetchall()
            except sqlite3.OperationalError:
                return {}  # no session since the table was introduced
        return {(str(d), str(n)): int(at) for d, n, at in rows}

    def revocations(self) -> int:
        with self._lock:
            if self._closed:
                raise StoreError(f"{self.path}: the relay store is closed")
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'revocations'").fetchone()
        return int(row[0]) if row else 0

    def lapsed(self, grants: Sequence[NodeGrant]) -> dict[NodeGrant, str]:
        out: dict[NodeGrant, str] = {}
        with self._lock, self._reading() as conn:
            for grant in dict.fromkeys(grants):
                row = conn.execute(
                    "SELECT n.token_hash, n.revoked_at FROM nodes n JOIN datasets d "
                    "ON d.id = n.dataset_id WHERE d.name = ? AND n.name = ?",
                    (grant.dataset, grant.node),
                ).fetchone()
                reason = lapse_reason(grant, (bytes(row[0]), row[1]) if row else None)
                if reason is not None:
                    out[grant] = reason
        return out

    def authenticate(self, dataset: str, node: str, token: str) -> NodeGrant:
        with self._lock:
            row = self._conn.execute(
                "SELECT n.salt, n.token_hash, n.read_only, n.revoked_at, n.carrier FROM nodes n "
                "JOIN datasets d ON d.id = n.dataset_id WHERE d.name = ? AND n.name = ?",
                (dataset, node),
            ).fetchone()
        found = (bytes(row[0]), bytes(row[1]), row[2], row[3], row[4]) if row else None
        return grant_for(dataset, node, token, found)

    # -- updates -----------------------------------------------------------

    def append_updates(self, dataset: str, updates: Sequence[UpdateIn]) -> list[Appended]:
        limits = self.limits
        results = prechecked(updates, limits.max_batch, limits.max_update_bytes)
        touched: set[tuple[int, str]] = set()
        with self._lock:
            try:
                with self._write() as conn:
                    ds_id = self._dataset_id(conn, dataset)
                    self._append(conn, ds_id, dataset, updates, results, touched)
            except BaseException:
                # The documents hold what the rolled-back transaction had
                # integrated: reload them from disk when next needed.
                for key in touched:
                    self._cache.drop(key)
                raise
            self._cache.evict()
        return [r for r in results if r is not None]

    def _append(
        self,
        conn: sqlite3.Connection,
        ds_id: int,
        dataset: str,
        updates: Sequence[UpdateIn],
        results: list[Appended | None],
        touched: set[tuple[int, str]],
    ) -> None:
        writers: dict[str, tuple[BranchlineError | None, bool]] = {}
        counts: dict[str, tuple[int, int]] = {}
        room: dict[str, BranchlineError | None] = {}
        new_docs: set[str] = set()  # documents this batch creates
        now = _now()
        # Plain log rows go in with one executemany at the end, under seqs
        # assigned here (the write lock is held, so nobody else takes them);
        # ``applied`` and the results need the seqs as the updates integrate.
        rows: list[tuple[int, int, str, bytes, str, int, int]] = []
        next_seq = _next_seq(conn)
        # BEGIN IMMEDIATE serializes writers: positions follow commit order.
        (head,) = conn.execute("SELECT head FROM datasets WHERE id = ?", (ds_id,)).fetchone()
        position = int(head)
        # Read in the write transaction: a lock committed by the admin command
        # applies from the next batch on.
        locked = {
            str(r[0])
            for r in conn.execute("SELECT period FROM locks WHERE dataset_id = ?", (ds_id,))
        }
        for i, u in enumerate(updates):
            if results[i] is not None:
                continue
            if u.node not in writers:
                writers[u.node] = self._writer(conn, ds_id, dataset, u.node)
            err, carrier = writers[u.node]
            if err is None and u.doc not in room:
                room[u.doc] = self._room_for(conn, ds_id, dataset, u.doc, new_docs)
            if err is None and locked:
                err = locked_by(dataset, u.doc, locked)
            if err is None:
                err = room[u.doc]
            if err is not None:
                results[i] = Appended(u.doc, "rejected", error=err)
                continue
            key = (ds_id, u.doc)
            touched.add(key)
            loaded = self._load(conn, key)
            data = bytes(u.data)
            try:
                integrated, waiting = integrate(loaded, data, None if carrier else u.node, u.doc)
            except (UpdateError, NotAuthor) as exc:
                # The document holds what it integrated (part of it, or all of
                # a refused update): rebuild it from what this transaction has
                # written so far, the rows held back for one INSERT included
                # (else a later update of the batch looked waiting).
                _insert_rows(conn, rows)
                rows.clear()
                self._cache.drop(key)
                if isinstance(exc, UpdateError):
                    exc = UpdateError(f"document {u.doc!r}: {exc}")
                results[i] = Appended(u.doc, "rejected", error=exc)
                continue
            digest = None
            if waiting:
                digest = hashlib.sha256(data).digest()
                if (
                    not integrated
                    and conn.execute(
                        "SELECT 1 FROM updates WHERE dataset_id = ? AND doc = ? AND digest = ? "
                        "AND waiting = 1",
                        (ds_id, u.doc, digest),
                    ).fetchone()
                ):
                    results[i] = Appended(u.doc, "duplicate")
                    continue
                if (
                    conn.execute(
                        "INSERT OR IGNORE INTO updates (seq, dataset_id, doc, data, node, at, "
                        "waiting, digest, position) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?)",
                        (next_seq, ds_id, u.doc, data, u.node, now, digest, position + 1),
                    ).rowcount
                    == 0
                ):  # the same waiting bytes, partly integrated again
                    results[i] = Appended(u.doc, "duplicate")
                    continue
            elif not integrated:
                results[i] = Appended(u.doc, "duplicate")
                continue
            else:
                rows.append((next_seq, ds_id, u.doc, data, u.node, now, position + 1))
            position += 1
            self._cache.logged(loaded, next_seq, len(data))
            n, b = counts.get(u.doc, (0, 0))
            counts[u.doc] = (n + 1, b + len(data))
            results[i] = Appended(u.doc, "stored", seq=next_seq, position=position)
            next_seq += 1
        _insert_rows(conn, rows)
        if position != head:
            conn.execute("UPDATE datasets SET head = ? WHERE id = ?", (position, ds_id))
        conn.executemany(
            "INSERT INTO documents (dataset_id, doc, updates, bytes) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (dataset_id, doc) DO UPDATE SET updates = updates + excluded.updates, "
            "bytes = bytes + excluded.bytes",
            [(ds_id, doc, n, b) for doc, (n, b) in counts.items()],
        )
        for doc in counts:
            cached = self._cache.docs.get((ds_id, doc))
            if cached is not None and self._cache.compaction_due(cached):
                self._compact(conn, (ds_id, doc), cached)

    def _writer(
        self, conn: sqlite3.Connection, ds_id: int, dataset: str, node: str
    ) -> tuple[BranchlineError | None, bool]:
        """(why ``node`` may not write, or None; whether it is a carrier)."""
        # Checked in the write transaction: a revoke committed by the admin
        # command takes effect on the next batch, whatever the server cached.
        row = conn.execute(
            "SELECT read_only, revoked_at, carrier FROM nodes WHERE dataset_id = ? AND name = ?",
            (ds_id, node),
        ).fetchone()
        return writer_refusal(dataset, node, row)

    def _room_for(
        self, conn: sqlite3.Connection, ds_id: int, dataset: str, doc: str, new_docs: set[str]
    ) -> BranchlineError | None:
        """None when ``doc`` exists or the dataset may have one more document
        (counting those the batch creates, which are added to ``new_docs``)."""
        if conn.execute(
            "SELECT 1 FROM documents WHERE dataset_id = ? AND doc = ?", (ds_id, doc)
        ).fetchone():
            return None
        (count,) = conn.execute(
            "SELECT count(*) FROM documents WHERE dataset_id = ?", (ds_id,)
        ).fetchone()
        refusal = room_refusal(
            dataset, count + len(new_docs), self.limits.max_documents_per_dataset
        )
        if refusal is None:
            new_docs.add(doc)
        return refusal

    def head(self, dataset: str) -> int:
        with self._lock, self._reading() as conn:
            return _head(conn, self._dataset_id(conn, dataset))

    def logged_after(self, dataset: str, position: int, limit: int) -> list[Logged] | None:
        check_follow(position, limit)
        with self._lock, self._reading() as conn:
            ds_id = self._dataset_id(conn, dataset)
            (folded,) = conn.execute(
                "SELECT folded FROM datasets WHERE id = ?", (ds_id,)
            ).fetchone()
            if position < int(folded):
                return None
            rows = conn.execute(
                "SELECT position, doc, data, node FROM updates WHERE dataset_id = ? "
                "AND position > ? ORDER BY position LIMIT ?",
                (ds_id, position, min(limit, self.limits.logged_after_max)),
            ).fetchall()
        return [Logged(int(p), str(d), bytes(b), str(n)) for p, d, b, n in rows]

    def wait_changes(self, timeout_s: float) -> set[str]:
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._watch_lock:
            if self._closed:
                raise StoreError(f"{self.path}: the relay store is closed")
            if self._watch is None:
                self._watch = _connect(self.path)
            period = WATCH_MIN_S
            while True:
                (version,) = self._watch.execute("PRAGMA data_version").fetchone()
                if version != self._watch_version:
                    self._watch_version = int(version)
                    heads = _heads(self._watch)
                    moved = {d for d, h in heads.items() if self._heads.get(d) != h}
                    self._heads = heads
                    if moved:
                        return moved
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:  # close() waits for this lock
                    return set()
                time.sleep(min(period, left))
                period = min(WATCH_MAX_S, period * 1.5)

    def state_vector(self, dataset: str, doc: str) -> bytes:
        check_doc(doc)
        with self._lock, self._reading() as conn:
            key = (self._dataset_id(conn, dataset), doc)
            if key not in self._cache.docs and not _has_doc(conn, key):
                return EMPTY_STATE_VECTOR
            sv: bytes = self._load(conn, key).doc.get_state()
        self._cache.evict()
        return sv

    def diff(self, dataset: str, doc: str, state_vector: bytes | None = None) -> bytes:
        check_doc(doc)
        if state_vector is not None:
            # Checked here: pycrdt's own decoder is not the place to meet
            # hostile bytes.
            decode_state_vector(bytes(state_vector))
        with self._lock, self._reading() as conn:
            key = (self._dataset_id(conn, dataset), doc)
            if key not in self._cache.docs and not _has_doc(conn, key):
                return EMPTY_UPDATE
            loaded = self._load(conn, key)
            out = diff_of(loaded, doc, state_vector)
        self._cache.evict()
        return out

    def documents(self, dataset: str) -> list[str]:
        with self._lock, self._reading() as conn:
            ds_id = self._dataset_id(conn, dataset)
            rows = conn.execute(
                "SELECT doc FROM documents WHERE dataset_id = ? ORDER BY doc", (ds_id,)
            ).fetchall()
        return [str(r[0]) for r in rows]

    def compact(self, dataset: str, doc: str | None = None) -> int:
        names = [doc] if doc is not None else self.documents(dataset)
        removed = 0
        for name in names:
            check_doc(name)
            with self._lock:
                with self._write() as conn:
                    key = (self._dataset_id(conn, dataset), name)
                    if key not in self._cache.docs and not _has_doc(conn, key):
                        continue
                    try:
                        removed += self._compact(conn, key, self._load(conn, key))
                    except BaseException:
                        self._cache.drop(key)
                        raise
                self._cache.evict()
        return removed

    # -- period locks ------------------------------------------------------

    def lock_period(self, dataset: str, period: str) -> bool:
        check_period(period)
        with self._lock, self._write() as conn:
            ds_id = self._dataset_id(conn, dataset)
            cur = conn.execute(
                "INSERT OR IGNORE INTO locks (dataset_id, period, at) VALUES (?, ?, ?)",
                (ds_id, period, _now()),
            )
            return cur.rowcount > 0

    def unlock_period(self, dataset: str, period: str) -> bool:
        check_period(period)
        with self._lock, self._write() as conn:
            ds_id = self._dataset_id(conn, dataset)
            cur = conn.execute(
                "DELETE FROM locks WHERE dataset_id = ? AND period = ?", (ds_id, period)
            )
            return cur.rowcount > 0

    # -- series ------------------------------------------------------------

    def lease(
        self, dataset: str, series_key: str, count: int, *, node: str | None = None
    ) -> tuple[int, int]:
        check_lease(series_key, count, self.limits.max_lease)
        with self._lock, self._write() as conn:
            # BEGIN IMMEDIATE holds the write lock from the read of ``next`` to
            # the commit: no other thread or process can read the same value.
            ds_id = self._dataset_id(conn, dataset)
            row = conn.execute(
                "SELECT next FROM series WHERE dataset_id = ? AND series_key = ?",
                (ds_id, series_key),
            ).fetchone()
            first = int(row[0]) if row else 1
            last = first + count - 1
            conn.execute(
                "INSERT INTO series (dataset_id, series_key, next) VALUES (?, ?, ?) "
                "ON CONFLICT (dataset_id, series_key) DO UPDATE SET next = excluded.next",
                (ds_id, series_key, last + 1),
            )
            conn.execute(
                "INSERT INTO leases (dataset_id, series_key, first, last, node, at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (ds_id, series_key, first, last, node, _now()),
            )
        return first, last

    # -- inspection --------------------------------------------------------

    def status(self) -> list[DatasetInfo]:
        out = []
        with self._lock, self._reading() as conn:
            for ds_id, name, created in conn.execute(
                "SELECT id, name, created_at FROM datasets ORDER BY name"
            ).fetchall():
                nodes = [
                    NodeInfo(str(n), bool(ro), rev is not None, int(at), rev, bool(carrier))
                    for n, ro, at, rev, carrier in conn.execute(
                        "SELECT name, read_only, enrolled_at, revoked_at, carrier FROM nodes "
                        "WHERE dataset_id = ? ORDER BY name",
                        (ds_id,),
                    )
                ]
                docs = [
                    DocumentInfo(str(d), int(n), int(b), int(rows))
                    for d, n, b, rows in conn.execute(
                        "SELECT d.doc, d.updates, d.bytes, (SELECT count(*) FROM updates u "
                        "WHERE u.dataset_id = d.dataset_id AND u.doc = d.doc AND (u.waiting = 1 "
                        "OR u.seq > coalesce((SELECT upto FROM snapshots s WHERE "
                        "s.dataset_id = d.dataset_id AND s.doc = d.doc), 0))) "
                        "FROM documents d WHERE d.dataset_id = ? ORDER BY d.doc",
                        (ds_id,),
                    )
                ]
                series = dict(
                    conn.execute(
                        "SELECT series_key, next FROM series WHERE dataset_id = ? "
                        "ORDER BY series_key",
                        (ds_id,),
                    ).fetchall()
                )
                locks = [
                    str(r[0])
                    for r in conn.execute(
                        "SELECT period FROM locks WHERE dataset_id = ? ORDER BY period", (ds_id,)
                    )
                ]
                out.append(DatasetInfo(str(name), int(created), nodes, docs, series, locks))
        return out

    # -- migration (engine/relay/migrate.py) --------------------------------

    def count_rows(self, table: str) -> int:
        """Rows of one of the tables ``export_rows`` gives."""
        sql = _export_sql(table)
        with self._lock:
            if self._closed:
                raise StoreError(f"{self.path}: the relay store is closed")
            try:
                return int(self._conn.execute(f"SELECT count(*) FROM ({sql})").fetchone()[0])
            except sqlite3.OperationalError:
                return 0  # node_seen: made on first use

    def export_rows(self, table: str) -> Iterator[tuple[Any, ...]]:
        """The rows of ``table`` in the columns of ``migrate.TABLES``;
        snapshots' ``upto`` as a position (the PostgreSQL store keys its log
        by position). Raises StoreError for a table it does not export."""
        sql = _export_sql(table)
        with self._lock:
            if self._closed:
                raise StoreError(f"{self.path}: the relay store is closed")
            try:
                rows = self._conn.execute(sql)
            except sqlite3.OperationalError:
                return  # node_seen: made on first use
            for row in rows:
                yield tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)

    def loaded_documents(self) -> int:
        """Documents held in memory now (for metrics)."""
        with self._lock:
            return len(self._cache.docs)

    # -- internals ---------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding the store's write lock; durable on exit.
        Rolls back and re-raises on any exception."""
        if self._closed:
            raise StoreError(f"{self.path}: the relay store is closed")
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreError(f"{self.path}: cannot start a write ({exc})") from None
        try:
            self._check_elsewhere()
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK")
            raise StoreError(f"{self.path}: commit failed ({exc})") from None

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: a snapshot and the log after it are read
        consistently even if another process compacts meanwhile."""
        if self._closed:
            raise StoreError(f"{self.path}: the relay store is closed")
        conn = self._conn
        conn.execute("BEGIN")
        try:
            self._check_elsewhere()
            yield conn
        finally:
            conn.execute("COMMIT")

    def _check_elsewhere(self) -> None:
        version = int(self._conn.execute("PRAGMA data_version").fetchone()[0])
        if version != self._data_version:
            # Another process committed (an admin command, or a second
            # writer): loaded documents may be stale. Reload them lazily.
            self._data_version = version
            self._cache.clear()

    def _dataset_id(self, conn: sqlite3.Connection, dataset: str) -> int:
        row = conn.execute("SELECT id FROM datasets WHERE name = ?", (dataset,)).fetchone()
        if row is None:
            raise unknown_dataset(dataset)
        return int(row[0])

    def _load(self, conn: sqlite3.Connection, key: tuple[int, str]) -> Loaded:
        loaded = self._cache.get(key)
        if loaded is not None:
            return loaded
        snap = conn.execute(
            "SELECT upto, data FROM snapshots WHERE dataset_id = ? AND doc = ?", key
        ).fetchone()
        upto = int(snap[0]) if snap is not None else 0
        # The tail after the snapshot, and waiting rows a compaction kept;
        # not the folded rows kept for ``logged_after``.
        rows = conn.execute(
            "SELECT seq, data FROM updates WHERE dataset_id = ? AND doc = ? "
            "AND (seq > ? OR waiting = 1) ORDER BY seq",
            (*key, upto),
        )
        return self._cache.build(
            key,
            (upto, bytes(snap[1])) if snap is not None else None,
            ((int(seq), bytes(data)) for seq, data in rows),
        )

    def _compact(self, conn: sqlite3.Connection, key: tuple[int, str], loaded: Loaded) -> int:
        if loaded.tail == 0:
            return 0
        upto = loaded.applied
        data = loaded.doc.get_update()
        conn.execute(
            "INSERT INTO snapshots (dataset_id, doc, upto, data, at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (dataset_id, doc) DO UPDATE SET upto = excluded.upto, "
            "data = excluded.data, at = excluded.at",
            (*key, upto, data, _now()),
        )
        # A snapshot holds no waiting parts: keep a waiting row until the
        # document covers everything it carries; a covered one becomes a
        # folded row.
        sv = loaded.doc.get_state()
        kept = kept_bytes = 0
        for seq, blob in conn.execute(
            "SELECT seq, data FROM updates WHERE dataset_id = ? AND doc = ? AND waiting = 1",
            key,
        ).fetchall():
            if still_waiting(bytes(blob), sv):
                kept += 1
                kept_bytes += len(blob)
            else:
                conn.execute("UPDATE updates SET waiting = 0 WHERE seq = ?", (seq,))
        # Folded rows stay for ``logged_after`` until keep_positions behind
        # the head; ``folded`` records the highest position deleted.
        cond = "dataset_id = ? AND doc = ? AND seq <= ? AND waiting = 0 AND position <= ?"
        args = (*key, upto, _head(conn, key[0]) - self.limits.keep_positions)
        (gone,) = conn.execute(f"SELECT max(position) FROM updates WHERE {cond}", args).fetchone()
        if gone is not None:
            conn.execute(f"DELETE FROM updates WHERE {cond}", args)
            conn.execute("UPDATE datasets SET folded = max(folded, ?) WHERE id = ?", (gone, key[0]))
        return self._cache.compacted(loaded, len(data), kept, kept_bytes)


#: Log rows per INSERT statement (7 parameters each, far below SQLite's 32766).
_ROWS_PER_INSERT = 500


def _insert_rows(
    conn: sqlite3.Connection, rows: Sequence[tuple[int, int, str, bytes, str, int, int]]
) -> None:
    """Insert log rows (seq, dataset_id, doc, data, node, at, position) with a few
    multi-row statements. Not ``executemany``: it releases the GIL around
    every row, and each time the event loop thread takes it, the store thread
    waits up to a switch interval (5 ms) to get it back."""
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        part = rows[start : start + _ROWS_PER_INSERT]
        values = ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * len(part))
        conn.execute(
            f"INSERT INTO updates (seq, dataset_id, doc, data, node, at, position) VALUES {values}",
            [value for row in part for value in row],
        )


def _next_seq(conn: sqlite3.Connection) -> int:
    """The seq AUTOINCREMENT would give the next ``updates`` row: above every
    seq ever used, also of rows deleted since."""
    row = conn.execute(
        "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'updates'), 0), "
        "coalesce((SELECT max(seq) FROM updates), 0))"
    ).fetchone()
    return int(row[0]) + 1


def _bump_revocations(conn: sqlite3.Connection) -> None:
    """Count a revocation (or a replaced token) in meta, in the caller's write
    transaction: a serving relay polls the counter (``revocations``)."""
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('revocations', '1') ON CONFLICT (key) "
        "DO UPDATE SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)"
    )


def _heads(conn: sqlite3.Connection) -> dict[str, int]:
    return {str(n): int(h) for n, h in conn.execute("SELECT name, head FROM datasets")}


def _head(conn: sqlite3.Connection, ds_id: int) -> int:
    (head,) = conn.execute("SELECT head FROM datasets WHERE id = ?", (ds_id,)).fetchone()
    return int(head)


def _has_doc(conn: sqlite3.Connection, key: tuple[int, str]) -> bool:
    return (
        conn.execute("SELECT 1 FROM documents WHERE dataset_id = ? AND doc = ?", key).fetchone()
        is not None
    )


def _upgrade(conn: sqlite3.Connection, version: int) -> None:
    """Format 1, 2 or 3 -> 4 in one write transaction: 2 added the locks
    table, 3 the nodes' carrier flag (existing nodes are not carriers), 4 the
    datasets' positions: the log rows get 1, 2, ... in seq order, after one
    position standing for everything already folded into snapshots (so
    ``logged_after`` from 0 is None there: resync by state vector)."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        if version < 2:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS locks (dataset_id INTEGER NOT NULL, "
                "period TEXT NOT NULL, at INTEGER NOT NULL, PRIMARY KEY (dataset_id, period)) "
                "WITHOUT ROWID"
            )
        if version < 3:
            conn.execute("ALTER TABLE nodes ADD COLUMN carrier INTEGER NOT NULL DEFAULT 0")
        for statement in _POSITIONS_SQL:
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        with suppress(sqlite3.Error):  # nothing to roll back if BEGIN failed
            conn.execute("ROLLBACK")
        conn.close()
        raise StoreError(
            f"cannot upgrade the relay store to format {FORMAT_VERSION}: {exc}"
        ) from None


_EXPORT_SQL = {
    "datasets": "SELECT id, name, created_at, head, folded FROM datasets ORDER BY id",
    "nodes": "SELECT dataset_id, name, salt, token_hash, read_only != 0, enrolled_at, "
    "revoked_at, carrier != 0 FROM nodes",
    "updates": "SELECT dataset_id, position, doc, data, node, at, waiting != 0, digest "
    "FROM updates ORDER BY seq",
    # upto is a seq here: the position of the last row it covers (or just
    # before the first it does not), or the head when the log has no row left.
    "snapshots": "SELECT s.dataset_id, s.doc, coalesce((SELECT max(u.position) FROM updates u "
    "WHERE u.dataset_id = s.dataset_id AND u.doc = s.doc AND u.seq <= s.upto), "
    "(SELECT min(u.position) - 1 FROM updates u WHERE u.dataset_id = s.dataset_id "
    "AND u.doc = s.doc AND u.seq > s.upto), (SELECT head FROM datasets d "
    "WHERE d.id = s.dataset_id)), s.data, s.at FROM snapshots s",
    "documents": "SELECT dataset_id, doc, updates, bytes FROM documents",
    "series": "SELECT dataset_id, series_key, next FROM series",
    "locks": "SELECT dataset_id, period, at FROM locks",
    "leases": "SELECT id, dataset_id, series_key, first, last, node, at FROM leases ORDER BY id",
    "node_seen": "SELECT dataset, node, at FROM node_seen",
}


def _export_sql(table: str) -> str:
    sql = _EXPORT_SQL.get(table)
    if sql is None:
        raise StoreError(f"no table {table!r} to export")
    return sql


_POSITIONS_SQL = (
    "ALTER TABLE datasets ADD COLUMN head INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE datasets ADD COLUMN folded INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE updates ADD COLUMN position INTEGER NOT NULL DEFAULT 0",
    "UPDATE datasets SET folded = 1 WHERE id IN (SELECT dataset_id FROM snapshots)",
    "UPDATE updates SET position = r.p + d.folded FROM (SELECT seq, row_number() OVER "
    "(PARTITION BY dataset_id ORDER BY seq) AS p FROM updates) AS r, datasets AS d "
    "WHERE r.seq = updates.seq AND d.id = updates.dataset_id",
    "UPDATE datasets SET head = max(folded, coalesce((SELECT max(position) FROM updates "
    "WHERE dataset_id = datasets.id), 0))",
    "CREATE INDEX updates_position ON updates (dataset_id, position)",
)


_SEEN_SQL = """CREATE TABLE IF NOT EXISTS node_seen (
    dataset TEXT NOT NULL, node TEXT NOT NULL, at INTEGER NOT NULL, PRIMARY KEY (dataset, node)
)"""


def _now() -> int:
    return time.time_ns() // 1_000_000


def _connect(path: Path) -> sqlite3.Connection:
    try:
        # check_same_thread=False: the store serializes use with its own lock,
        # and the server may call it from a thread pool.
        conn = sqlite3.connect(
            path,
            isolation_level=None,
            timeout=BUSY_TIMEOUT_MS / 1000,
            check_same_thread=False,
        )
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {path}: {exc}") from None
    return conn
