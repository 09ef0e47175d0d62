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
deletes the folded rows. Interrupting it leaves the old snapshot and log.

Concurrency: methods are thread-safe (one lock around one connection). Several
processes may open the store: writes are serialized by SQLite, ``lease`` is
exact across processes, and a process that notices another process's commit
(``PRAGMA data_version``) drops its cached documents and reloads them. One
relay process is expected to own the update log; admin commands (enroll,
revoke) may run beside it.
"""

from __future__ import annotations

import hashlib
import random
import re
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycrdt import Doc, Map, TransactionEvent, get_update

from ..crdt.document import ROOT
from ..crdt.statevec import decode_state_vector
from ..errors import (
    AuthError,
    BranchlineError,
    FormatVersionError,
    NodeRevoked,
    NotAuthor,
    PeriodLocked,
    ReadOnlyNode,
    RelayLimitError,
    RelayStoreExists,
    RelayStoreNotFound,
    StoreError,
    UnknownDataset,
    UnknownNode,
    UpdateError,
    UpdateTooLarge,
    UserError,
)
from ..names import DATASET_RE, DOC_RE, NODE_RE
from ..tokens import new_token, token_hash, token_matches
from . import authorship
from .store import (
    EMPTY_STATE_VECTOR,
    EMPTY_UPDATE,
    Appended,
    DatasetInfo,
    DocumentInfo,
    Enrollment,
    NodeGrant,
    NodeInfo,
    RelayStore,
    UpdateIn,
)

# 2: period locks; 3: carrier nodes (older files are upgraded when opened)
FORMAT_VERSION = 3
APPLICATION_ID = 0x424C5259  # "BLRY": a Branchline relay store
BUSY_TIMEOUT_MS = 30_000
SERIES_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@/-]{0,127}\Z")

SCHEMA_SQL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);

CREATE TABLE datasets (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
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
-- compaction keeps until the document covers them.
CREATE TABLE updates (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset_id INTEGER NOT NULL,
    doc TEXT NOT NULL,
    data BLOB NOT NULL,
    node TEXT NOT NULL,
    at INTEGER NOT NULL,
    waiting INTEGER NOT NULL DEFAULT 0,
    digest BLOB
);
CREATE INDEX updates_doc ON updates (dataset_id, doc, seq);
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


@dataclass(frozen=True)
class RelayLimits:
    """Bounds on everything that grows with input."""

    max_update_bytes: int = 128 << 20  # a 100k-record catalog is ~42 MB as one update
    max_batch: int = 10_000  # updates per append_updates call
    memory_budget_bytes: int = 256 << 20  # documents in memory (estimated)
    max_loaded_docs: int = 4096
    max_documents_per_dataset: int = 100_000
    max_lease: int = 1_000_000  # numbers per lease
    # A document's log is folded into its snapshot once it has ``compact_after``
    # rows and its bytes reach ``compact_ratio`` of the snapshot's, or once it
    # has ``compact_max`` rows whatever their bytes. Rewriting a big snapshot
    # every 1000 small updates cost more than storing them; with the ratio the
    # bytes rewritten stay proportional to the bytes logged, and
    # ``compact_max`` bounds how many rows a reload replays.
    compact_after: int = 1000
    compact_ratio: float = 0.25
    compact_max: int = 50_000


@dataclass
class _Loaded:
    doc: Doc[Any]
    applied: int  # highest log seq integrated
    tail: int  # log rows of the document (after the snapshot, or waiting)
    size: int  # bytes of the snapshot and rows it was built from: a memory estimate
    changes: int = 0  # transactions that changed the document, counted by its observer
    snapshot_bytes: int = 0  # bytes of its snapshot row
    tail_bytes: int = 0  # bytes of its log rows
    # Entries changed by the transaction being integrated (key -> yrs action),
    # read only while ``watching``: the authorship check of a non-carrier.
    watching: bool = False
    entries_changed: dict[str, str] = field(default_factory=dict)
    # The root Map and the subscription of ``on_entries`` to it: both must stay
    # referenced, or the observer goes.
    entries: Map[Any] | None = None
    subscription: Any = None
    failed: str = ""  # why reading the entries' event failed (yrs panics)

    def on_change(self, _event: TransactionEvent) -> None:
        # yrs calls the observer once per transaction that changed the
        # document (new items or new deletions), and not for a duplicate.
        self.changes += 1

    def on_entries(self, event: Any) -> None:
        # Subscribed to the Map's integrated (Rust) type, not through
        # ``Map.observe``: pycrdt's wrapper converts every field of every
        # event, a third of the relay's integration time; only ``keys`` is
        # needed, and only for a non-carrier.
        if not self.watching:
            return
        try:
            keys: dict[str, dict[str, Any]] = event.keys
            for key, change in keys.items():
                self.entries_changed[key] = str(change["action"])
        except BaseException as exc:
            # yrs 0.28 panics on some valid update sequences while building
            # the keys (pyo3 raises a BaseException); see RecordDoc.apply.
            if type(exc).__name__ != "PanicException":
                raise
            self.failed = str(exc).splitlines()[0] if str(exc) else "panic"


class SqliteRelayStore(RelayStore):
    """The embedded relay store. Open with ``create`` or ``open``."""

    def __init__(self, path: Path, conn: sqlite3.Connection, limits: RelayLimits) -> None:
        self.path = path
        self.limits = limits
        self._conn = conn
        self._lock = threading.RLock()
        self._docs: OrderedDict[tuple[int, str], _Loaded] = OrderedDict()
        self._memory = 0
        self._rng = random.Random(secrets.randbits(64))
        self._data_version = int(conn.execute("PRAGMA data_version").fetchone()[0])
        self._closed = False

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
        if version in (1, 2):
            _upgrade(conn, version)
            version = FORMAT_VERSION
        if version != FORMAT_VERSION:
            conn.close()
            raise FormatVersionError(
                f"{path} has relay store format {version}, this Branchline reads format "
                f"{FORMAT_VERSION}; use the Branchline version that wrote it"
            )
        return cls(path, conn, limits or RelayLimits())

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._docs.clear()
                self._conn.close()

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
        _check_dataset(dataset)
        _check_node(node)
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
        _check_dataset(dataset)
        _check_node(node)
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
                who = f"node {grant.node!r} of dataset {grant.dataset!r}"
                if row is None:
                    out[grant] = f"{who} is no longer enrolled"
                elif row[1] is not None:
                    out[grant] = f"{who} has been revoked; enroll it again to issue a new token"
                elif _token_id(bytes(row[0])) != grant.token_id:
                    out[grant] = f"{who} was enrolled again: its previous token no longer works"
        return out

    def authenticate(self, dataset: str, node: str, token: str) -> NodeGrant:
        with self._lock:
            row = self._conn.execute(
                "SELECT n.salt, n.token_hash, n.read_only, n.revoked_at, n.carrier FROM nodes n "
                "JOIN datasets d ON d.id = n.dataset_id WHERE d.name = ? AND n.name = ?",
                (dataset, node),
            ).fetchone()
        # token_matches hashes even for an unknown node, so that timing does
        # not tell an unknown node from a wrong token.
        salt, stored = (bytes(row[0]), bytes(row[1])) if row else (None, None)
        if row is None or not token_matches(salt, stored, token):
            raise AuthError(
                f"authentication failed for node {node!r} of dataset {dataset!r}: "
                "unknown node or dataset, or wrong token"
            )
        if row[3] is not None:
            # Safe to say: the caller proved it holds the node's token.
            raise NodeRevoked(
                f"node {node!r} of dataset {dataset!r} has been revoked; "
                "enroll it again to issue a new token"
            )
        return NodeGrant(dataset, node, bool(row[2]), _token_id(bytes(row[1])), bool(row[4]))

    # -- updates -----------------------------------------------------------

    def append_updates(self, dataset: str, updates: Sequence[UpdateIn]) -> list[Appended]:
        if len(updates) > self.limits.max_batch:
            raise RelayLimitError(
                f"{len(updates)} updates in one batch; the relay takes at most "
                f"{self.limits.max_batch}"
            )
        results: list[Appended | None] = [None] * len(updates)
        for i, u in enumerate(updates):
            err = self._precheck(u)
            if err is not None:
                results[i] = Appended(u.doc, "rejected", error=err)
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
                    self._drop(key)
                raise
            self._evict()
        return [r for r in results if r is not None]

    def _precheck(self, u: UpdateIn) -> BranchlineError | None:
        if not isinstance(u.data, bytes | bytearray | memoryview):
            return UpdateError(f"document {u.doc!r}: update is not bytes")
        if len(u.data) > self.limits.max_update_bytes:
            return UpdateTooLarge(
                f"document {u.doc!r}: update of {len(u.data)} bytes is larger than the "
                f"relay accepts ({self.limits.max_update_bytes})"
            )
        if not isinstance(u.doc, str) or not DOC_RE.match(u.doc):
            return UpdateError(f"invalid document name {u.doc!r}")
        return None

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
        rows: list[tuple[int, int, str, bytes, str, int]] = []
        next_seq = _next_seq(conn)
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
                err = _locked(dataset, u.doc, locked)
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
                integrated, waiting = _integrate(loaded, data, None if carrier else u.node, u.doc)
            except (UpdateError, NotAuthor) as exc:
                # The document holds what it integrated (part of it, or all of
                # a refused update): rebuild it from what this transaction has
                # written so far.
                self._drop(key)
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
                        "waiting, digest) VALUES (?, ?, ?, ?, ?, ?, 1, ?)",
                        (next_seq, ds_id, u.doc, data, u.node, now, digest),
                    ).rowcount
                    == 0
                ):  # the same waiting bytes, partly integrated again
                    results[i] = Appended(u.doc, "duplicate")
                    continue
            elif not integrated:
                results[i] = Appended(u.doc, "duplicate")
                continue
            else:
                rows.append((next_seq, ds_id, u.doc, data, u.node, now))
            loaded.applied = next_seq
            loaded.tail += 1
            loaded.tail_bytes += len(data)
            self._grow(loaded, len(data))
            n, b = counts.get(u.doc, (0, 0))
            counts[u.doc] = (n + 1, b + len(data))
            results[i] = Appended(u.doc, "stored", seq=next_seq)
            next_seq += 1
        _insert_rows(conn, rows)
        conn.executemany(
            "INSERT INTO documents (dataset_id, doc, updates, bytes) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (dataset_id, doc) DO UPDATE SET updates = updates + excluded.updates, "
            "bytes = bytes + excluded.bytes",
            [(ds_id, doc, n, b) for doc, (n, b) in counts.items()],
        )
        for doc in counts:
            cached = self._docs.get((ds_id, doc))
            if cached is not None and self._compaction_due(cached):
                self._compact(conn, (ds_id, doc), cached)

    def _compaction_due(self, loaded: _Loaded) -> bool:
        """The log of ``loaded`` should be folded now (see RelayLimits)."""
        limits = self.limits
        return loaded.tail >= limits.compact_max or (
            loaded.tail >= limits.compact_after
            and loaded.tail_bytes >= limits.compact_ratio * loaded.snapshot_bytes
        )

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
        if row is None:
            return AuthError(f"node {node!r} is not enrolled in dataset {dataset!r}"), False
        if row[1] is not None:
            return NodeRevoked(f"node {node!r} of dataset {dataset!r} has been revoked"), False
        if row[0]:
            return ReadOnlyNode(f"node {node!r} of dataset {dataset!r} is read-only"), False
        return None, bool(row[2])

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
        if count + len(new_docs) >= self.limits.max_documents_per_dataset:
            return RelayLimitError(
                f"dataset {dataset!r} already has {count + len(new_docs)} documents, "
                "the relay's limit"
            )
        new_docs.add(doc)
        return None

    def state_vector(self, dataset: str, doc: str) -> bytes:
        _check_doc(doc)
        with self._lock, self._reading() as conn:
            key = (self._dataset_id(conn, dataset), doc)
            if key not in self._docs and not _has_doc(conn, key):
                return EMPTY_STATE_VECTOR
            sv: bytes = self._load(conn, key).doc.get_state()
        self._evict()
        return sv

    def diff(self, dataset: str, doc: str, state_vector: bytes | None = None) -> bytes:
        _check_doc(doc)
        if state_vector is not None:
            # Checked here: pycrdt's own decoder is not the place to meet
            # hostile bytes.
            decode_state_vector(bytes(state_vector))
        with self._lock, self._reading() as conn:
            key = (self._dataset_id(conn, dataset), doc)
            if key not in self._docs and not _has_doc(conn, key):
                return EMPTY_UPDATE
            loaded = self._load(conn, key)
            try:
                out: bytes = (
                    loaded.doc.get_update()
                    if state_vector is None
                    else loaded.doc.get_update(bytes(state_vector))
                )
            except Exception as exc:  # pycrdt raises bare exceptions for bad input
                raise UpdateError(f"document {doc!r}: invalid state vector ({exc})") from None
        self._evict()
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
            _check_doc(name)
            with self._lock:
                with self._write() as conn:
                    key = (self._dataset_id(conn, dataset), name)
                    if key not in self._docs and not _has_doc(conn, key):
                        continue
                    try:
                        removed += self._compact(conn, key, self._load(conn, key))
                    except BaseException:
                        self._drop(key)
                        raise
                self._evict()
        return removed

    # -- period locks ------------------------------------------------------

    def lock_period(self, dataset: str, period: str) -> bool:
        _check_period(period)
        with self._lock, self._write() as conn:
            ds_id = self._dataset_id(conn, dataset)
            cur = conn.execute(
                "INSERT OR IGNORE INTO locks (dataset_id, period, at) VALUES (?, ?, ?)",
                (ds_id, period, _now()),
            )
            return cur.rowcount > 0

    def unlock_period(self, dataset: str, period: str) -> bool:
        _check_period(period)
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
        if not isinstance(series_key, str) or not SERIES_KEY_RE.match(series_key):
            raise UserError(f"invalid series key {series_key!r}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise UserError(f"a lease needs a count of at least 1, not {count!r}")
        if count > self.limits.max_lease:
            raise RelayLimitError(
                f"a lease of {count} numbers is more than the relay hands out at once "
                f"({self.limits.max_lease})"
            )
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
                        "WHERE u.dataset_id = d.dataset_id AND u.doc = d.doc) "
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

    def loaded_documents(self) -> int:
        """Documents held in memory now (for metrics)."""
        with self._lock:
            return len(self._docs)

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
            self._docs.clear()
            self._memory = 0

    def _dataset_id(self, conn: sqlite3.Connection, dataset: str) -> int:
        row = conn.execute("SELECT id FROM datasets WHERE name = ?", (dataset,)).fetchone()
        if row is None:
            raise UnknownDataset(
                f"the relay has no dataset {dataset!r}; enroll a node to create it"
            )
        return int(row[0])

    def _load(self, conn: sqlite3.Connection, key: tuple[int, str]) -> _Loaded:
        loaded = self._docs.get(key)
        if loaded is not None:
            self._docs.move_to_end(key)
            return loaded
        doc: Doc[Any] = Doc(client_id=self._rng.getrandbits(52) + 1)
        applied = tail = size = 0
        snap = conn.execute(
            "SELECT upto, data FROM snapshots WHERE dataset_id = ? AND doc = ?", key
        ).fetchone()
        snapshot_bytes = 0
        if snap is not None:
            doc.apply_update(bytes(snap[1]))
            applied, size = int(snap[0]), len(snap[1])
            snapshot_bytes = size
        # Every remaining row: the tail after the snapshot, and waiting rows
        # a compaction kept (applying one twice is harmless).
        for seq, data in conn.execute(
            "SELECT seq, data FROM updates WHERE dataset_id = ? AND doc = ? ORDER BY seq", key
        ):
            doc.apply_update(bytes(data))
            applied = max(applied, int(seq))
            tail += 1
            size += len(data)
        loaded = _Loaded(doc, applied, tail, 0)
        loaded.snapshot_bytes, loaded.tail_bytes = snapshot_bytes, size - snapshot_bytes
        doc.observe(loaded.on_change)
        loaded.entries = doc.get(ROOT, type=Map)
        loaded.subscription = loaded.entries.integrated.observe(loaded.on_entries)
        self._docs[key] = loaded
        self._grow(loaded, size)
        return loaded

    def _grow(self, loaded: _Loaded, nbytes: int) -> None:
        loaded.size += nbytes
        self._memory += nbytes

    def _drop(self, key: tuple[int, str]) -> None:
        loaded = self._docs.pop(key, None)
        if loaded is not None:
            self._memory -= loaded.size

    def _evict(self) -> None:
        """Drop least recently used documents until under the budget; the most
        recently used one stays even when it alone is over it."""
        with self._lock:
            while len(self._docs) > 1 and (
                self._memory > self.limits.memory_budget_bytes
                or len(self._docs) > self.limits.max_loaded_docs
            ):
                _, loaded = self._docs.popitem(last=False)
                self._memory -= loaded.size

    def _compact(self, conn: sqlite3.Connection, key: tuple[int, str], loaded: _Loaded) -> int:
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
        removed = conn.execute(
            "DELETE FROM updates WHERE dataset_id = ? AND doc = ? AND seq <= ? AND waiting = 0",
            (*key, upto),
        ).rowcount
        # A snapshot holds no waiting parts: keep a waiting row until the
        # document covers everything it carries.
        sv = loaded.doc.get_state()
        kept = kept_bytes = 0
        for seq, blob in conn.execute(
            "SELECT seq, data FROM updates WHERE dataset_id = ? AND doc = ? AND waiting = 1",
            key,
        ).fetchall():
            if get_update(bytes(blob), sv)[:1] != b"\x00":  # items still beyond the state
                kept += 1
                kept_bytes += len(blob)
            else:
                conn.execute("DELETE FROM updates WHERE seq = ?", (seq,))
                removed += 1
        self._memory -= loaded.size
        loaded.size = 0
        self._grow(loaded, len(data))
        loaded.tail = kept
        loaded.snapshot_bytes, loaded.tail_bytes = len(data), kept_bytes
        return int(removed)


def _integrate(
    loaded: _Loaded, update: bytes, author: str | None = None, name: str = ""
) -> tuple[bool, bool]:
    """Apply ``update``; returns (changed the document, part of it waits for
    updates not seen yet). With ``author`` (a node that is not a carrier),
    check that it may publish the update (``authorship.check``). Raises
    UpdateError for bytes that are not an update, NotAuthor; after either,
    the document may hold part of the update: drop it."""
    before = loaded.changes
    doc = loaded.doc
    loaded.watching = author is not None
    loaded.entries_changed = {}
    loaded.failed = ""
    try:
        # Apply and read the state vector in ONE transaction: yrs integrates
        # (and retries waiting parts) inside apply_update, so the state is
        # the same as after the commit, and the observer still fires once at
        # the commit. Two pycrdt transactions per update were a fifth of the
        # relay's integration time. pycrdt's ``Doc._doc`` / ``Transaction._txn``
        # are what its own ``apply_update`` and ``get_state`` use (pycrdt is
        # pinned in pyproject.toml).
        with doc.transaction() as txn:
            raw = txn._txn
            assert raw is not None  # set by entering the transaction, as pycrdt asserts
            doc._doc.apply_update(raw, update)
            state = doc._doc.get_state(raw)
        # What lies beyond the document's state holds items (a non-zero
        # client count) only when part of the update waits for earlier ones.
        # (``pycrdt.get_state(update)`` cannot tell: it omits every client
        # whose items do not start at clock 0.)
        beyond = get_update(update, state)
    except Exception as exc:  # pycrdt raises bare exceptions for bad input
        raise UpdateError(f"not a valid update ({exc})") from None
    finally:
        loaded.watching = False
    if loaded.failed:
        raise UpdateError(f"the CRDT library failed on this update ({loaded.failed})")
    if author is not None:
        refusal = authorship.check(author, name, loaded.entries_changed, state, beyond)
        if refusal is not None:
            raise refusal
    return loaded.changes != before, beyond[:1] != b"\x00"


#: Log rows per INSERT statement (6 parameters each, far below SQLite's 32766).
_ROWS_PER_INSERT = 500


def _insert_rows(
    conn: sqlite3.Connection, rows: Sequence[tuple[int, int, str, bytes, str, int]]
) -> None:
    """Insert log rows (seq, dataset_id, doc, data, node, at) with a few
    multi-row statements. Not ``executemany``: it releases the GIL around
    every row, and each time the event loop thread takes it, the store thread
    waits up to a switch interval (5 ms) to get it back."""
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        part = rows[start : start + _ROWS_PER_INSERT]
        values = ", ".join(["(?, ?, ?, ?, ?, ?)"] * len(part))
        conn.execute(
            f"INSERT INTO updates (seq, dataset_id, doc, data, node, at) VALUES {values}",
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


def _token_id(hashed: bytes) -> bytes:
    """What a grant keeps to tell its token from a later one: a prefix of the
    salted hash (a random salt per token, so no two tokens share it in practice)."""
    return hashed[:8]


def _bump_revocations(conn: sqlite3.Connection) -> None:
    """Count a revocation (or a replaced token) in meta, in the caller's write
    transaction: a serving relay polls the counter (``revocations``)."""
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('revocations', '1') ON CONFLICT (key) "
        "DO UPDATE SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)"
    )


def _has_doc(conn: sqlite3.Connection, key: tuple[int, str]) -> bool:
    return (
        conn.execute("SELECT 1 FROM documents WHERE dataset_id = ? AND doc = ?", key).fetchone()
        is not None
    )


def _check_dataset(dataset: str) -> None:
    if not isinstance(dataset, str) or not DATASET_RE.match(dataset):
        raise UserError(
            f"invalid dataset name {dataset!r}: use letters, digits, '_', '.', '-' (max 64)"
        )


def _check_node(node: str) -> None:
    if not isinstance(node, str) or not NODE_RE.match(node):
        raise UserError(f"invalid node name {node!r}: use letters, digits, '_', '-' (max 32)")


#: A period: a year, or a year and a month.
PERIOD_RE = re.compile(r"^\d{4}(-(0[1-9]|1[0-2]))?\Z")


def _check_period(period: str) -> None:
    if not isinstance(period, str) or not PERIOD_RE.match(period):
        raise UserError(f"invalid period {period!r}: give a year or a month, YYYY or YYYY-MM")


def _locked(dataset: str, doc: str, locked: set[str]) -> PeriodLocked | None:
    """Why ``doc`` may not be written under the ``locked`` periods, or None.
    A year lock covers the year's document and its months' documents; a
    month lock only that month's (not the yearly document)."""
    period = doc.partition("/")[2]
    if not period:
        return None
    hit = period if period in locked else period[:4] if period[:4] in locked else None
    if hit is None:
        return None
    return PeriodLocked(
        f"document {doc!r} is in period {hit!r}, locked on the relay for dataset "
        f"{dataset!r}: the update was not stored; unlock the period "
        f"('branchline relay unlock STORE {dataset} {hit}') to send it"
    )


def _upgrade(conn: sqlite3.Connection, version: int) -> None:
    """Format 1 or 2 -> 3 in one write transaction: 2 added the locks table,
    3 the nodes' carrier flag (existing nodes are not carriers)."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        if version < 2:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS locks (dataset_id INTEGER NOT NULL, "
                "period TEXT NOT NULL, at INTEGER NOT NULL, PRIMARY KEY (dataset_id, period)) "
                "WITHOUT ROWID"
            )
        conn.execute("ALTER TABLE nodes ADD COLUMN carrier INTEGER NOT NULL DEFAULT 0")
        conn.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        with suppress(sqlite3.Error):  # nothing to roll back if BEGIN failed
            conn.execute("ROLLBACK")
        conn.close()
        raise StoreError(
            f"cannot upgrade the relay store to format {FORMAT_VERSION}: {exc}"
        ) from None


def _check_doc(doc: str) -> None:
    if not isinstance(doc, str) or not DOC_RE.match(doc):
        raise UpdateError(f"invalid document name {doc!r}")


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
