"""``PgRelayStore``: the relay store on PostgreSQL, for several relay
processes sharing one store.

Where: one PostgreSQL **schema** of an existing database, named by the URL
``postgresql://[user@]host[:port]/database?schema=NAME`` (``schema``
defaults to ``branchline``). ``create`` makes the schema and its tables;
several stores may share a database under different schemas.

Durability: every write is one transaction with ``synchronous_commit = on``:
a method that returned committed. The format version is in ``meta``
(``format``); ``open`` upgrades an older one and refuses a newer one.

Several processes: every change of a dataset's log (append, compaction)
first takes the dataset's row lock (``SELECT ... FOR NO KEY UPDATE``: an
enroll's foreign key check does not wait for it), so appends
of one dataset are serialized across processes and its positions follow
commit order with no gap. Each process keeps its own pycrdt documents
(``DocCache``); under the lock, or in a REPEATABLE READ snapshot for reads,
it first applies the log rows other processes added since it last looked
(or reloads, when a compaction removed some of them). The append
transaction also sends ``pg_notify('branchline_<schema>', 'dataset:head')``
(a position, never an update), which ``wait_changes`` listens for on a
connection of its own. Leases are one upsert of the series row, exact across
processes.

Connections: one for the store's calls, serialized by a lock as the SQLite
store's one connection is (the relay server calls the store from its one
store thread, so a pool would add nothing), and one for ``wait_changes``.
A lost connection (server restarted, backend terminated) makes the call
raise StoreUnavailable (nothing acknowledged) and drops the documents in
memory; the next call connects again. While the server cannot be reached,
calls fail at once until the next try (``Outage``: every 0.1 s, backing off
to 2 s), and the outage is logged once when it starts and once when it ends.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg

from ..crdt.statevec import decode_state_vector
from ..errors import (
    BranchlineError,
    FormatVersionError,
    NotAuthor,
    RelayStoreExists,
    RelayStoreNotFound,
    StoreError,
    StoreUnavailable,
    UnknownNode,
    UpdateError,
    UserError,
)
from ..tokens import new_token, token_hash
from .doccache import DocCache, Loaded, RelayLimits, diff_of, integrate, still_waiting
from .outage import Outage
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

log = logging.getLogger("branchline.relay")

FORMAT_VERSION = 1
SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,40}\Z")
DEFAULT_SCHEMA = "branchline"
CONNECT_TIMEOUT_S = 5
#: How long wait_changes waits before trying again to connect its listener.
LISTEN_RETRY_S = 0.5

SCHEMA_SQL = """
CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);
-- head: position of the latest stored update, folded: the highest position
-- whose log row a compaction deleted.
CREATE TABLE datasets (
    id bigserial PRIMARY KEY,
    name text NOT NULL UNIQUE,
    created_at bigint NOT NULL,
    head bigint NOT NULL DEFAULT 0,
    folded bigint NOT NULL DEFAULT 0
);
-- token_hash = HMAC-SHA256(key=salt, token): the token itself is never stored.
CREATE TABLE nodes (
    dataset_id bigint NOT NULL REFERENCES datasets (id),
    name text NOT NULL,
    salt bytea NOT NULL,
    token_hash bytea NOT NULL,
    read_only boolean NOT NULL,
    enrolled_at bigint NOT NULL,
    revoked_at bigint,
    carrier boolean NOT NULL DEFAULT false,
    PRIMARY KEY (dataset_id, name)
);
-- The update log, keyed by position (1, 2, ... per dataset, commit order):
-- rows after their document's snapshot, waiting rows, and folded rows kept
-- for logged_after.
CREATE TABLE updates (
    dataset_id bigint NOT NULL,
    position bigint NOT NULL,
    doc text NOT NULL,
    data bytea NOT NULL,
    node text NOT NULL,
    at bigint NOT NULL,
    waiting boolean NOT NULL DEFAULT false,
    digest bytea,
    PRIMARY KEY (dataset_id, position)
);
CREATE INDEX updates_doc ON updates (dataset_id, doc, position);
CREATE UNIQUE INDEX updates_waiting ON updates (dataset_id, doc, digest) WHERE waiting;
-- A document's full state after every log row with position <= upto.
CREATE TABLE snapshots (
    dataset_id bigint NOT NULL,
    doc text NOT NULL,
    upto bigint NOT NULL,
    data bytea NOT NULL,
    at bigint NOT NULL,
    PRIMARY KEY (dataset_id, doc)
);
CREATE TABLE documents (
    dataset_id bigint NOT NULL,
    doc text NOT NULL,
    updates bigint NOT NULL,
    bytes bigint NOT NULL,
    PRIMARY KEY (dataset_id, doc)
);
CREATE TABLE series (
    dataset_id bigint NOT NULL,
    series_key text NOT NULL,
    next bigint NOT NULL,
    PRIMARY KEY (dataset_id, series_key)
);
CREATE TABLE locks (
    dataset_id bigint NOT NULL,
    period text NOT NULL,
    at bigint NOT NULL,
    PRIMARY KEY (dataset_id, period)
);
CREATE TABLE leases (
    id bigserial PRIMARY KEY,
    dataset_id bigint NOT NULL,
    series_key text NOT NULL,
    first bigint NOT NULL,
    last bigint NOT NULL,
    node text,
    at bigint NOT NULL
);
CREATE TABLE node_seen (
    dataset text NOT NULL,
    node text NOT NULL,
    at bigint NOT NULL,
    PRIMARY KEY (dataset, node)
)
"""


@dataclass(frozen=True)
class PgLocation:
    """Where a PostgreSQL relay store lives: the connection URL (without
    ``schema``) and the schema."""

    conninfo: str
    schema: str

    @property
    def channel(self) -> str:
        """The LISTEN/NOTIFY channel of the store's commits."""
        return f"branchline_{self.schema}"

    def __str__(self) -> str:  # the URL as given, without a password
        parts = urlsplit(self.conninfo)
        host = parts.hostname or ""
        netloc = f"{parts.username}@{host}" if parts.username else host
        if parts.port:
            netloc += f":{parts.port}"
        query = urlencode({"schema": self.schema})
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def is_pg_url(spec: str) -> bool:
    """True when ``spec`` names a PostgreSQL store rather than a file."""
    return spec.startswith(("postgresql://", "postgres://"))


def parse_url(url: str) -> PgLocation:
    """The location named by ``url``. Raises UserError for a URL that is
    not ``postgresql://host/database[?schema=NAME]``."""
    if not is_pg_url(url):
        raise UserError(f"not a PostgreSQL URL: {url!r} (postgresql://host/database)")
    parts = urlsplit(url)
    if not parts.path.strip("/"):
        raise UserError(f"{url!r} names no database: postgresql://host/DATABASE")
    query = dict(parse_qsl(parts.query))
    schema = query.pop("schema", DEFAULT_SCHEMA)
    if not SCHEMA_RE.match(schema):
        raise UserError(f"invalid schema {schema!r}: lower-case letters, digits and '_' (max 41)")
    conninfo = urlunsplit(
        (parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment)
    )
    return PgLocation(conninfo, schema)


class PgRelayStore(RelayStore):
    """The PostgreSQL relay store. Open with ``create`` or ``open``."""

    def __init__(self, where: PgLocation, limits: RelayLimits) -> None:
        self.where = where
        self.path = str(where)  # what messages and the CLI show
        self.limits = limits
        self._lock = threading.RLock()
        self._conn: psycopg.Connection[Any] | None = None
        self._cache = DocCache(limits)
        self._known: dict[int, int] = {}  # dataset id -> position the cache reflects
        self._closed = False
        self._watch_lock = threading.Lock()
        self._listener: psycopg.Connection[Any] | None = None
        self._heads: dict[str, int] = {}
        self._outage = Outage(time.monotonic)

    # -- opening -----------------------------------------------------------

    @classmethod
    def create(cls, url: str, limits: RelayLimits | None = None) -> PgRelayStore:
        """Create the store's schema and tables. Raises UserError (bad URL),
        RelayStoreNotFound (no such database), RelayStoreExists, StoreError."""
        store = cls(parse_url(url), limits or RelayLimits())
        schema = store.where.schema
        try:
            with store._lock, store._tx() as cur:
                cur.execute(
                    "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'meta'",
                    (schema,),
                )
                if cur.fetchone() is not None:
                    raise RelayStoreExists(
                        f"{store.path} already holds a relay store; open it instead"
                    )
                cur.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
                for statement in SCHEMA_SQL.split(";"):
                    if statement.strip():
                        cur.execute(statement)
                cur.execute(
                    "INSERT INTO meta (key, value) VALUES ('format', %s), ('created_at', %s), "
                    "('revocations', '0')",
                    (str(FORMAT_VERSION), str(_now())),
                )
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def open(cls, url: str, limits: RelayLimits | None = None) -> PgRelayStore:
        """Open an existing store. Raises UserError (bad URL),
        RelayStoreNotFound (no database or no store in the schema),
        FormatVersionError (a newer format), StoreError."""
        store = cls(parse_url(url), limits or RelayLimits())
        try:
            with store._lock, store._tx() as cur:
                cur.execute(
                    "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'meta'",
                    (store.where.schema,),
                )
                if cur.fetchone() is None:
                    raise RelayStoreNotFound(
                        f"no relay store at {store.path}; create one with "
                        f"'branchline relay init --store {store.path}'"
                    )
                cur.execute("SELECT value FROM meta WHERE key = 'format'")
                row = cur.fetchone()
                version = int(row[0]) if row else 0
                if version != FORMAT_VERSION:
                    raise FormatVersionError(
                        f"{store.path} has relay store format {version}, this Branchline "
                        f"reads format {FORMAT_VERSION}; use the Branchline version that "
                        "wrote it"
                    )
                store._heads = _heads(cur)
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._cache.clear()
            if self._conn is not None:
                with suppress(psycopg.Error):
                    self._conn.close()
                self._conn = None
        listener, self._listener = self._listener, None
        if listener is not None:
            with suppress(psycopg.Error):
                listener.close()  # wakes a wait_changes blocked on it

    def __enter__(self) -> PgRelayStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- nodes -------------------------------------------------------------

    def enroll(
        self, dataset: str, node: str, *, read_only: bool = False, carrier: bool = False
    ) -> Enrollment:
        check_dataset(dataset)
        check_node(node)
        token, salt = new_token()
        hashed = token_hash(salt, token)
        now = _now()
        with self._lock, self._tx() as cur:
            cur.execute(
                "INSERT INTO datasets (name, created_at) VALUES (%s, %s) "
                "ON CONFLICT (name) DO NOTHING RETURNING id",
                (dataset, now),
            )
            row = cur.fetchone()
            created = row is not None
            if row is None:
                cur.execute("SELECT id FROM datasets WHERE name = %s", (dataset,))
                row = cur.fetchone()
                assert row is not None
            cur.execute(
                "INSERT INTO nodes AS n (dataset_id, name, salt, token_hash, read_only, "
                "carrier, enrolled_at) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (dataset_id, name) DO UPDATE SET salt = excluded.salt, "
                "token_hash = excluded.token_hash, read_only = excluded.read_only, "
                "carrier = excluded.carrier, enrolled_at = excluded.enrolled_at, "
                "revoked_at = NULL RETURNING (xmax <> 0)",
                (row[0], node, salt, hashed, read_only, carrier, now),
            )
            replaced = bool(_one(cur)[0])
            if replaced:  # the old token stops working: open connections must notice
                _bump_revocations(cur)
        return Enrollment(dataset, node, token, read_only, replaced, created, carrier)

    def revoke(self, dataset: str, node: str) -> bool:
        check_dataset(dataset)
        check_node(node)
        with self._lock, self._tx() as cur:
            ds_id = _dataset_id(cur, dataset)
            cur.execute(
                "SELECT revoked_at FROM nodes WHERE dataset_id = %s AND name = %s FOR UPDATE",
                (ds_id, node),
            )
            row = cur.fetchone()
            if row is None:
                raise UnknownNode(f"dataset '{dataset}' has no enrolled node '{node}'")
            if row[0] is not None:
                return False
            cur.execute(
                "UPDATE nodes SET revoked_at = %s WHERE dataset_id = %s AND name = %s",
                (_now(), ds_id, node),
            )
            _bump_revocations(cur)
            return True

    def note_seen(self, dataset: str, node: str, at_ms: int) -> None:
        with self._lock, self._tx() as cur:
            cur.execute(
                "INSERT INTO node_seen AS s (dataset, node, at) VALUES (%s, %s, %s) "
                "ON CONFLICT (dataset, node) DO UPDATE SET at = greatest(s.at, excluded.at)",
                (dataset, node, at_ms),
            )

    def last_seen(self) -> dict[tuple[str, str], int]:
        with self._lock, self._tx() as cur:
            cur.execute("SELECT dataset, node, at FROM node_seen")
            return {(str(d), str(n)): int(at) for d, n, at in cur.fetchall()}

    def revocations(self) -> int:
        with self._lock, self._tx() as cur:
            cur.execute("SELECT value FROM meta WHERE key = 'revocations'")
            row = cur.fetchone()
        return int(row[0]) if row else 0

    def lapsed(self, grants: Sequence[NodeGrant]) -> dict[NodeGrant, str]:
        out: dict[NodeGrant, str] = {}
        with self._lock, self._tx() as cur:
            for grant in dict.fromkeys(grants):
                cur.execute(
                    "SELECT n.token_hash, n.revoked_at FROM nodes n JOIN datasets d "
                    "ON d.id = n.dataset_id WHERE d.name = %s AND n.name = %s",
                    (grant.dataset, grant.node),
                )
                row = cur.fetchone()
                reason = lapse_reason(grant, (bytes(row[0]), row[1]) if row else None)
                if reason is not None:
                    out[grant] = reason
        return out

    def authenticate(self, dataset: str, node: str, token: str) -> NodeGrant:
        with self._lock, self._tx() as cur:
            cur.execute(
                "SELECT n.salt, n.token_hash, n.read_only, n.revoked_at, n.carrier FROM nodes n "
                "JOIN datasets d ON d.id = n.dataset_id WHERE d.name = %s AND n.name = %s",
                (dataset, node),
            )
            row = cur.fetchone()
        found = (bytes(row[0]), bytes(row[1]), row[2], row[3], row[4]) if row else None
        return grant_for(dataset, node, token, found)

    # -- updates -----------------------------------------------------------

    def append_updates(self, dataset: str, updates: Sequence[UpdateIn]) -> list[Appended]:
        limits = self.limits
        results = prechecked(updates, limits.max_batch, limits.max_update_bytes)
        with self._lock:
            touched: set[tuple[int, str]] = set()
            ds_id = -1
            try:
                with self._tx(pipeline=True) as cur:
                    pending = [u for i, u in enumerate(updates) if results[i] is None]
                    facts = cur.connection.cursor()
                    # Queued behind the lock, read with it: one round trip.
                    ds_id, head = self._lock_dataset(
                        cur, dataset, lambda: _ask_batch_facts(facts, dataset, pending)
                    )
                    writers, known_docs, locked = _batch_facts(facts, dataset, pending)
                    new_head = self._append(
                        cur, ds_id, head, dataset, updates, results, touched,
                        (writers, known_docs, locked),
                    )  # fmt: skip
                    if new_head != head:
                        cur.execute(
                            "UPDATE datasets SET head = %s WHERE id = %s "
                            "RETURNING pg_notify(%s, %s)",
                            (new_head, ds_id, self.where.channel, f"{dataset}:{new_head}"),
                        )
            except BaseException:
                # The documents hold what the rolled-back transaction had
                # integrated: reload them when next needed.
                for key in touched:
                    self._cache.drop(key)
                self._known.pop(ds_id, None)
                raise
            self._known[ds_id] = new_head
            self._cache.evict()
        return [r for r in results if r is not None]

    def _append(
        self,
        cur: psycopg.Cursor[Any],
        ds_id: int,
        head: int,
        dataset: str,
        updates: Sequence[UpdateIn],
        results: list[Appended | None],
        touched: set[tuple[int, str]],
        facts: tuple[dict[str, tuple[BranchlineError | None, bool]], set[str], set[str]],
    ) -> int:
        """Integrate and log the batch under the dataset's lock (``facts``:
        what ``_batch_facts`` read); the new head."""
        writers, known_docs, locked = facts
        new_docs: set[str] = set()
        room: dict[str, BranchlineError | None] = {}
        counts: dict[str, tuple[int, int]] = {}
        rows: list[tuple[int, int, str, bytes, str, int]] = []
        position = head
        now = _now()
        for i, u in enumerate(updates):
            if results[i] is not None:
                continue
            err, carrier = writers[u.node]
            if err is None and locked:
                err = locked_by(dataset, u.doc, locked)
            if err is None and u.doc not in known_docs:
                if u.doc not in room:
                    room[u.doc] = self._room_for(cur, ds_id, dataset, len(new_docs))
                    if room[u.doc] is None:
                        new_docs.add(u.doc)
                err = room[u.doc]
            if err is not None:
                results[i] = Appended(u.doc, "rejected", error=err)
                continue
            key = (ds_id, u.doc)
            touched.add(key)
            loaded = self._load(cur, key)
            data = bytes(u.data)
            try:
                integrated, waiting = integrate(loaded, data, None if carrier else u.node, u.doc)
            except (UpdateError, NotAuthor) as exc:
                # Rebuild the document from what this transaction holds, the
                # rows not yet copied included.
                _insert_rows(cur, rows)
                rows.clear()
                self._cache.drop(key)
                if isinstance(exc, UpdateError):
                    exc = UpdateError(f"document {u.doc!r}: {exc}")
                results[i] = Appended(u.doc, "rejected", error=exc)
                continue
            if waiting:
                digest = hashlib.sha256(data).digest()
                cur.execute(
                    "INSERT INTO updates (dataset_id, position, doc, data, node, at, waiting, "
                    "digest) VALUES (%s, %s, %s, %s, %s, %s, true, %s) ON CONFLICT DO NOTHING "
                    "RETURNING 1",
                    (ds_id, position + 1, u.doc, data, u.node, now, digest),
                )
                if cur.fetchone() is None:  # the same waiting bytes again
                    results[i] = Appended(u.doc, "duplicate")
                    continue
            elif not integrated:
                results[i] = Appended(u.doc, "duplicate")
                continue
            else:
                rows.append((ds_id, position + 1, u.doc, data, u.node, now))
            position += 1
            self._cache.logged(loaded, position, len(data))
            n, b = counts.get(u.doc, (0, 0))
            counts[u.doc] = (n + 1, b + len(data))
            results[i] = Appended(u.doc, "stored", seq=position, position=position)
        _insert_rows(cur, rows)
        if counts:
            cur.execute(
                "INSERT INTO documents AS d (dataset_id, doc, updates, bytes) "
                "SELECT %s, * FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) "
                "ON CONFLICT (dataset_id, doc) DO UPDATE SET "
                "updates = d.updates + excluded.updates, bytes = d.bytes + excluded.bytes",
                (
                    ds_id,
                    list(counts),
                    [n for n, _ in counts.values()],
                    [b for _, b in counts.values()],
                ),
            )
        for doc in counts:
            cached = self._cache.docs.get((ds_id, doc))
            if cached is not None and self._cache.compaction_due(cached):
                self._compact(cur, (ds_id, doc), cached, position)
        return position

    def _room_for(
        self, cur: psycopg.Cursor[Any], ds_id: int, dataset: str, adding: int
    ) -> BranchlineError | None:
        cur.execute("SELECT count(*) FROM documents WHERE dataset_id = %s", (ds_id,))
        count = int(_one(cur)[0]) + adding
        return room_refusal(dataset, count, self.limits.max_documents_per_dataset)

    def head(self, dataset: str) -> int:
        with self._lock, self._tx() as cur:
            cur.execute("SELECT head FROM datasets WHERE name = %s", (dataset,))
            row = cur.fetchone()
        if row is None:
            raise unknown_dataset(dataset)
        return int(row[0])

    def logged_after(self, dataset: str, position: int, limit: int) -> list[Logged] | None:
        check_follow(position, limit)
        with self._lock, self._tx(snapshot=True, pipeline=True) as cur:
            cur.execute("SELECT id, folded FROM datasets WHERE name = %s", (dataset,))
            row = cur.fetchone()
            if row is None:
                raise unknown_dataset(dataset)
            if position < int(row[1]):
                return None
            cur.execute(
                "SELECT position, doc, data, node FROM updates WHERE dataset_id = %s "
                "AND position > %s ORDER BY position LIMIT %s",
                (row[0], position, min(limit, self.limits.logged_after_max)),
            )
            return [Logged(int(p), str(d), bytes(b), str(n)) for p, d, b, n in cur.fetchall()]

    def wait_changes(self, timeout_s: float) -> set[str]:
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._watch_lock:
            if self._closed:
                raise StoreError(f"{self.path}: the relay store is closed")
            moved: set[str] = set()
            if self._listener is None:
                moved = self._listen(deadline)
                if moved or self._listener is None:
                    return moved
            listener = self._listener
            try:
                for note in listener.notifies(
                    timeout=max(0.0, deadline - time.monotonic()), stop_after=1
                ):
                    name, _, pos = note.payload.rpartition(":")
                    moved.add(name)
                    with suppress(ValueError):
                        self._heads[name] = max(self._heads.get(name, 0), int(pos))
            except psycopg.Error:
                # The server went away (or close() ran): listen again next
                # call, and compare heads then for what was missed.
                self._listener = None
                with suppress(psycopg.Error):
                    listener.close()
            return moved

    def _listen(self, deadline: float) -> set[str]:
        """Connect the listener and LISTEN, then compare heads with the last
        seen (commits before the LISTEN show there, later ones notify).
        On failure, wait until ``deadline`` (or the retry period) and return
        nothing."""
        try:
            conn = self._connect()
            conn.execute(f'LISTEN "{self.where.channel}"')
            with conn.cursor() as cur:
                heads = _heads(cur)
        except (psycopg.Error, StoreError):
            time.sleep(max(0.0, min(LISTEN_RETRY_S, deadline - time.monotonic())))
            return set()
        if self._closed:
            conn.close()
            return set()
        self._listener = conn
        moved = {d for d, h in heads.items() if self._heads.get(d) != h}
        self._heads = heads
        return moved

    def state_vector(self, dataset: str, doc: str) -> bytes:
        check_doc(doc)
        with self._lock, self._tx(snapshot=True, pipeline=True) as cur:
            key = self._reading(cur, dataset, doc)
            if key is None:
                return EMPTY_STATE_VECTOR
            sv: bytes = self._load(cur, key).doc.get_state()
        self._cache.evict()
        return sv

    def diff(self, dataset: str, doc: str, state_vector: bytes | None = None) -> bytes:
        check_doc(doc)
        if state_vector is not None:
            decode_state_vector(bytes(state_vector))
        with self._lock, self._tx(snapshot=True, pipeline=True) as cur:
            key = self._reading(cur, dataset, doc)
            if key is None:
                return EMPTY_UPDATE
            loaded = self._load(cur, key)
            out = diff_of(loaded, doc, state_vector)
        self._cache.evict()
        return out

    def documents(self, dataset: str) -> list[str]:
        with self._lock, self._tx() as cur:
            ds_id = _dataset_id(cur, dataset)
            cur.execute("SELECT doc FROM documents WHERE dataset_id = %s ORDER BY doc", (ds_id,))
            return [str(r[0]) for r in cur.fetchall()]

    def compact(self, dataset: str, doc: str | None = None) -> int:
        names = [doc] if doc is not None else self.documents(dataset)
        removed = 0
        for name in names:
            check_doc(name)
            with self._lock:
                key = None
                try:
                    with self._tx() as cur:
                        ds_id, head = self._lock_dataset(cur, dataset)
                        key = (ds_id, name)
                        if key not in self._cache.docs and not _has_doc(cur, key):
                            continue
                        removed += self._compact(cur, key, self._load(cur, key), head)
                except BaseException:
                    if key is not None:
                        self._cache.drop(key)
                    raise
                self._cache.evict()
        return removed

    # -- period locks ------------------------------------------------------

    def lock_period(self, dataset: str, period: str) -> bool:
        check_period(period)
        with self._lock, self._tx() as cur:
            ds_id = _dataset_id(cur, dataset)
            cur.execute(
                "INSERT INTO locks (dataset_id, period, at) VALUES (%s, %s, %s) "
                "ON CONFLICT DO NOTHING",
                (ds_id, period, _now()),
            )
            return cur.rowcount > 0

    def unlock_period(self, dataset: str, period: str) -> bool:
        check_period(period)
        with self._lock, self._tx() as cur:
            ds_id = _dataset_id(cur, dataset)
            cur.execute("DELETE FROM locks WHERE dataset_id = %s AND period = %s", (ds_id, period))
            return cur.rowcount > 0

    # -- series ------------------------------------------------------------

    def lease(
        self, dataset: str, series_key: str, count: int, *, node: str | None = None
    ) -> tuple[int, int]:
        check_lease(series_key, count, self.limits.max_lease)
        with self._lock, self._tx() as cur:
            ds_id = _dataset_id(cur, dataset)
            # One upsert: the series row's lock serializes concurrent leases.
            cur.execute(
                "INSERT INTO series AS s (dataset_id, series_key, next) VALUES (%s, %s, %s) "
                "ON CONFLICT (dataset_id, series_key) DO UPDATE SET next = s.next + %s "
                "RETURNING next",
                (ds_id, series_key, 1 + count, count),
            )
            nxt = int(_one(cur)[0])
            first, last = nxt - count, nxt - 1
            cur.execute(
                "INSERT INTO leases (dataset_id, series_key, first, last, node, at) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (ds_id, series_key, first, last, node, _now()),
            )
        return first, last

    # -- inspection --------------------------------------------------------

    def status(self) -> list[DatasetInfo]:
        out = []
        with self._lock, self._tx(snapshot=True, pipeline=True) as cur:
            cur.execute("SELECT id, name, created_at FROM datasets ORDER BY name")
            for ds_id, name, created in cur.fetchall():
                cur.execute(
                    "SELECT name, read_only, enrolled_at, revoked_at, carrier FROM nodes "
                    "WHERE dataset_id = %s ORDER BY name",
                    (ds_id,),
                )
                nodes = [
                    NodeInfo(str(n), bool(ro), rev is not None, int(at), rev, bool(carrier))
                    for n, ro, at, rev, carrier in cur.fetchall()
                ]
                cur.execute(
                    "SELECT d.doc, d.updates, d.bytes, (SELECT count(*) FROM updates u "
                    "WHERE u.dataset_id = d.dataset_id AND u.doc = d.doc AND (u.waiting "
                    "OR u.position > coalesce((SELECT upto FROM snapshots s WHERE "
                    "s.dataset_id = d.dataset_id AND s.doc = d.doc), 0))) "
                    "FROM documents d WHERE d.dataset_id = %s ORDER BY d.doc",
                    (ds_id,),
                )
                docs = [DocumentInfo(str(d), int(n), int(b), int(r)) for d, n, b, r in cur]
                cur.execute(
                    "SELECT series_key, next FROM series WHERE dataset_id = %s ORDER BY series_key",
                    (ds_id,),
                )
                series = {str(k): int(v) for k, v in cur.fetchall()}
                cur.execute(
                    "SELECT period FROM locks WHERE dataset_id = %s ORDER BY period", (ds_id,)
                )
                locks = [str(r[0]) for r in cur.fetchall()]
                out.append(DatasetInfo(str(name), int(created), nodes, docs, series, locks))
        return out

    # -- migration (engine/relay/migrate.py) --------------------------------

    def import_rows(
        self,
        tables: dict[str, tuple[Sequence[str], Iterable[Sequence[Any]]]],
        revocations: int,
    ) -> dict[str, int]:
        """Copy rows into the (empty) store's tables, in one transaction, and
        return each table's row count after it. ``tables``: table -> (columns,
        rows), in an order the foreign keys allow."""
        counts: dict[str, int] = {}
        with self._lock, self._tx() as cur:
            for table, (columns, rows) in tables.items():
                cols = ", ".join(columns)
                with cur.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
                cur.execute(f"SELECT count(*) FROM {table}")
                counts[table] = int(_one(cur)[0])
            for table in ("datasets", "leases"):  # serial ids go on after the copied ones
                cur.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"coalesce((SELECT max(id) FROM {table}), 0) + 1, false)"
                )
            cur.execute("UPDATE meta SET value = %s WHERE key = 'revocations'", (str(revocations),))
        self._lost()
        return counts

    def loaded_documents(self) -> int:
        """Documents held in memory now (for metrics)."""
        with self._lock:
            return len(self._cache.docs)

    # -- internals ---------------------------------------------------------

    def _connect(self) -> psycopg.Connection[Any]:
        """A new autocommit connection on the store's schema. Raises
        RelayStoreNotFound (no such database), StoreError."""
        try:
            return psycopg.connect(
                self.where.conninfo,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_S,
                options=f"-c search_path={self.where.schema} -c synchronous_commit=on",
            )
        except psycopg.OperationalError as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            if "does not exist" in reason and "database" in reason:
                raise RelayStoreNotFound(
                    f"cannot open {self.path}: {reason}; create the database first "
                    "(createdb), then 'branchline relay init --store URL'"
                ) from None
            raise StoreError(f"cannot connect to PostgreSQL for {self.path}: {reason}") from None

    @contextmanager
    def _tx(self, snapshot: bool = False, pipeline: bool = False) -> Iterator[psycopg.Cursor[Any]]:
        """One transaction, committed on exit (durable), rolled back on an
        exception. ``snapshot``: REPEATABLE READ, one view of every table.
        ``pipeline``: statements go out without waiting for their results
        until one is read (BEGIN with the first query, the last writes with
        COMMIT: a round trip is most of a small transaction's time); the
        body must not read ``rowcount``. A lost connection raises StoreError
        and is replaced on the next call."""
        if self._closed:
            raise StoreError(f"{self.path}: the relay store is closed")
        if self._conn is None or self._conn.closed:
            self._conn = self._reconnect()
            self._lost()  # documents may be stale after a gap
        conn = self._conn
        try:
            cur = conn.cursor()
            try:
                with conn.pipeline() if pipeline else nullcontext():
                    cur.execute(
                        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if snapshot else "BEGIN"
                    )
                    yield cur
                    cur.execute("COMMIT")
            except BaseException:
                if not conn.closed:
                    with suppress(psycopg.Error):
                        conn.execute("ROLLBACK")
                raise
        except psycopg.OperationalError as exc:
            self._lost()
            with suppress(psycopg.Error):
                conn.close()
            self._conn = None
            if self._outage.failed(_reason(exc), retry_now=True):
                log.warning(
                    "%s: PostgreSQL connection lost (%s); reconnecting", self.path, _reason(exc)
                )
            raise StoreUnavailable(
                f"{self.path}: PostgreSQL connection lost ({_reason(exc)})"
            ) from None
        except psycopg.Error as exc:
            self._lost()
            raise StoreError(f"{self.path}: {_reason(exc)}") from None

    def _reconnect(self) -> psycopg.Connection[Any]:
        """A new connection, unless an outage waits for its next try. Raises
        StoreUnavailable (unreachable: logged once per outage),
        RelayStoreNotFound."""
        self._outage.check(self.path)
        try:
            conn = self._connect()
        except RelayStoreNotFound:
            raise
        except StoreError as exc:
            if self._outage.failed(str(exc).split(": ", 1)[-1]):
                log.warning(
                    "%s; calls fail (nothing acknowledged) until it is back, tried again "
                    "every %.1f-%.0f s",
                    exc,
                    self._outage.first_s,
                    self._outage.max_s,
                )
            raise StoreUnavailable(str(exc)) from None
        down = self._outage.ended()
        if down is not None:
            log.info("%s: PostgreSQL reachable again after %.1f s", self.path, down)
        return conn

    def _lost(self) -> None:
        """Forget the documents in memory: they may hold what a failed
        transaction integrated, or miss what others committed."""
        self._cache.clear()
        self._known.clear()

    def _lock_dataset(
        self, cur: psycopg.Cursor[Any], dataset: str, queue: Callable[[], None] | None = None
    ) -> tuple[int, int]:
        """Take the dataset's row lock (held to the commit) and bring the
        documents in memory up to its head: (dataset id, head). ``queue``
        sends more statements after the lock's, before its answer is read."""
        cur.execute(
            "SELECT id, head, folded FROM datasets WHERE name = %s FOR NO KEY UPDATE", (dataset,)
        )
        if queue is not None:
            queue()
        row = cur.fetchone()
        if row is None:
            raise unknown_dataset(dataset)
        ds_id, head, folded = int(row[0]), int(row[1]), int(row[2])
        self._catch_up(cur, ds_id, head, folded)
        return ds_id, head

    def _reading(self, cur: psycopg.Cursor[Any], dataset: str, doc: str) -> tuple[int, str] | None:
        """In a snapshot transaction: the document's key with the documents
        in memory brought up to the snapshot, or None when it has none."""
        cur.execute("SELECT id, head, folded FROM datasets WHERE name = %s", (dataset,))
        row = cur.fetchone()
        if row is None:
            raise unknown_dataset(dataset)
        ds_id = int(row[0])
        self._catch_up(cur, ds_id, int(row[1]), int(row[2]))
        key = (ds_id, doc)
        if key not in self._cache.docs and not _has_doc(cur, key):
            return None
        return key

    def _catch_up(self, cur: psycopg.Cursor[Any], ds_id: int, head: int, folded: int) -> None:
        """Apply to the loaded documents of the dataset the rows other
        processes logged since this one last looked; reload them instead
        when a compaction deleted some of those rows."""
        known = self._known.get(ds_id)
        self._known[ds_id] = head
        if known == head:
            return
        cached = {k[1]: v for k, v in self._cache.docs.items() if k[0] == ds_id}
        if not cached:
            return
        if known is None or known > head or folded > known:
            self._cache.drop_dataset(ds_id)
            return
        cur.execute(
            "SELECT position, doc, data FROM updates WHERE dataset_id = %s AND position > %s "
            "AND position <= %s AND doc = ANY(%s) ORDER BY position",
            (ds_id, known, head, list(cached)),
        )
        for position, doc, data in cur.fetchall():
            loaded = cached[str(doc)]
            loaded.doc.apply_update(bytes(data))
            self._cache.logged(cached[str(doc)], int(position), len(data))

    def _load(self, cur: psycopg.Cursor[Any], key: tuple[int, str]) -> Loaded:
        loaded = self._cache.get(key)
        if loaded is not None:
            return loaded
        cur.execute("SELECT upto, data FROM snapshots WHERE dataset_id = %s AND doc = %s", key)
        snap = cur.fetchone()
        upto = int(snap[0]) if snap is not None else 0
        cur.execute(
            "SELECT position, data FROM updates WHERE dataset_id = %s AND doc = %s "
            "AND (position > %s OR waiting) ORDER BY position",
            (*key, upto),
        )
        return self._cache.build(
            key,
            (upto, bytes(snap[1])) if snap is not None else None,
            ((int(p), bytes(d)) for p, d in cur.fetchall()),
        )

    def _compact(
        self, cur: psycopg.Cursor[Any], key: tuple[int, str], loaded: Loaded, head: int
    ) -> int:
        """Fold the document's log into its snapshot (the dataset lock held)."""
        if loaded.tail == 0:
            return 0
        upto = loaded.applied
        data = loaded.doc.get_update()
        cur.execute(
            "INSERT INTO snapshots (dataset_id, doc, upto, data, at) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (dataset_id, doc) DO UPDATE SET upto = excluded.upto, "
            "data = excluded.data, at = excluded.at",
            (*key, upto, data, _now()),
        )
        sv = loaded.doc.get_state()
        kept = kept_bytes = 0
        cur.execute(
            "SELECT position, data FROM updates WHERE dataset_id = %s AND doc = %s AND waiting",
            key,
        )
        for position, blob in cur.fetchall():
            if still_waiting(bytes(blob), sv):
                kept += 1
                kept_bytes += len(blob)
            else:
                cur.execute(
                    "UPDATE updates SET waiting = false WHERE dataset_id = %s AND position = %s",
                    (key[0], position),
                )
        cur.execute(
            "WITH gone AS (DELETE FROM updates WHERE dataset_id = %s AND doc = %s "
            "AND position <= %s AND NOT waiting AND position <= %s RETURNING position) "
            "UPDATE datasets SET folded = greatest(folded, (SELECT max(position) FROM gone)) "
            "WHERE id = %s AND EXISTS (SELECT 1 FROM gone)",
            (*key, upto, head - self.limits.keep_positions, key[0]),
        )
        return self._cache.compacted(loaded, len(data), kept, kept_bytes)


def _insert_rows(
    cur: psycopg.Cursor[Any], rows: Sequence[tuple[int, int, str, bytes, str, int]]
) -> None:
    """Log rows (dataset_id, position, doc, data, node, at) with one INSERT of
    arrays, sent in binary (COPY cannot go in a pipeline)."""
    if not rows:
        return
    columns = list(zip(*rows, strict=True))
    cur.execute(
        "INSERT INTO updates (dataset_id, position, doc, data, node, at) "
        "SELECT * FROM unnest(%b::bigint[], %b::bigint[], %b::text[], %b::bytea[], "
        "%b::text[], %b::bigint[])",
        [list(c) for c in columns],
    )


def _ask_batch_facts(cur: psycopg.Cursor[Any], dataset: str, pending: Sequence[UpdateIn]) -> None:
    """Send the query ``_batch_facts`` reads."""
    cur.execute(
        "WITH ds AS (SELECT id FROM datasets WHERE name = %(name)s) "
        "SELECT 'n', name, read_only, revoked_at, carrier FROM nodes "
        "WHERE dataset_id = (SELECT id FROM ds) AND name = ANY(%(nodes)s) "
        "UNION ALL SELECT 'd', doc, NULL, NULL, NULL FROM documents "
        "WHERE dataset_id = (SELECT id FROM ds) AND doc = ANY(%(docs)s) "
        "UNION ALL SELECT 'l', period, NULL, NULL, NULL FROM locks "
        "WHERE dataset_id = (SELECT id FROM ds)",
        {
            "name": dataset,
            "nodes": sorted({u.node for u in pending}),
            "docs": sorted({u.doc for u in pending}),
        },
    )


def _batch_facts(
    cur: psycopg.Cursor[Any], dataset: str, pending: Sequence[UpdateIn]
) -> tuple[dict[str, tuple[BranchlineError | None, bool]], set[str], set[str]]:
    """What ``_ask_batch_facts`` asked, read in the write transaction after
    the dataset's lock (a revoke or a lock committed elsewhere applies from
    the next batch on): per node of the batch, why it may not write (or
    None) and whether it is a carrier; the batch's documents the dataset
    already has; its locked periods."""
    rows: dict[str, tuple[object, object, object]] = {}
    known: set[str] = set()
    locked: set[str] = set()
    for kind, name, read_only, revoked_at, carrier in cur.fetchall():
        if kind == "n":
            rows[str(name)] = (read_only, revoked_at, carrier)
        else:
            (known if kind == "d" else locked).add(str(name))
    nodes = {u.node for u in pending}
    return {n: writer_refusal(dataset, n, rows.get(n)) for n in nodes}, known, locked


def _dataset_id(cur: psycopg.Cursor[Any], dataset: str) -> int:
    cur.execute("SELECT id FROM datasets WHERE name = %s", (dataset,))
    row = cur.fetchone()
    if row is None:
        raise unknown_dataset(dataset)
    return int(row[0])


def _has_doc(cur: psycopg.Cursor[Any], key: tuple[int, str]) -> bool:
    cur.execute("SELECT 1 FROM documents WHERE dataset_id = %s AND doc = %s", key)
    return cur.fetchone() is not None


def _heads(cur: psycopg.Cursor[Any]) -> dict[str, int]:
    cur.execute("SELECT name, head FROM datasets")
    return {str(n): int(h) for n, h in cur.fetchall()}


def _bump_revocations(cur: psycopg.Cursor[Any]) -> None:
    cur.execute("UPDATE meta SET value = (value::bigint + 1)::text WHERE key = 'revocations'")


def _one(cur: psycopg.Cursor[Any]) -> tuple[Any, ...]:
    row = cur.fetchone()
    assert row is not None  # the statement returns a row
    return tuple(row)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _now() -> int:
    return time.time_ns() // 1_000_000
