"""The embedding API: one ``Node`` per node home.

``Node`` is a facade. A node holds its dataset's collections as CRDT
documents in its SQLite store (``engine.store``), resolves records with
``engine.merge``, numbers vouchers with ``engine.series`` and exchanges raw
CRDT updates with other replicas (``engine.diffs``). Every write goes
through one ``engine.writes.Writer`` in one SQLite transaction (update log +
outbox + resolved records + adapters + series state) and is durable when the
method returns.

Several processes may open the same home; each write first catches up with
what the others committed, under the store's write lock, so no write is lost.
Reads come from the resolved ``records`` table and are always current.
"""

from __future__ import annotations

import datetime as dt
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from . import capture, diffs, plugins, resolution
from . import series as series_mod
from .clock import Clock, SystemClock, system_random
from .conflicts import list_conflicts, list_resolutions
from .crdt import trim_heap
from .crdt.split import iter_parts
from .errors import (
    AdapterError,
    AdapterNotFound,
    CaptureError,
    CaptureNotFound,
    DatasetMismatch,
    QueryError,
    SeriesError,
    UnknownCollection,
    UpdateError,
    UserError,
    ValidationError,
)
from .gcpause import paused_gc
from .merge import resolve
from .names import DATASET_RE, DOC_RE, META_RELAY_CA, META_TOKEN_REFUSED, NODE_RE, relay_url_ok
from .query import QueryResult, adapter_owning, run_query
from .schema import GAPS, Collection, Schema, load_schema, parse_schema
from .store import NodeStore, doclog, outbox, urgent
from .store import capture as capture_sql
from .store import records as rec
from .store.conflict_index import is_stale
from .store.doclog import Loaded
from .store.node_store import own_tables
from .tls import load_ca
from .writes import Posted, Replica, check_new_voucher, collection_of

__all__ = ["EMPTY_UPDATE", "ImportReport", "Node", "Posted"]

EMPTY_UPDATE = diffs.EMPTY_UPDATE
TRIM_AFTER_BYTES = doclog.TRIM_AFTER_BYTES  # after importing this much, hand freed memory back
#: Slice of a received update imported per transaction (``Node.import_sliced``):
#: about 150 records of a typical catalog, some 20 ms of work, which bounds
#: how long another writer of the home waits (docs/architecture.md).
IMPORT_SLICE_BYTES = 64 << 10

# Aliases: inside ``Node`` the name ``list`` is the method, not the type.
Records = list[dict[str, Any]]
Strings = list[str]
Ints = list[int]
Outbox = list[tuple[int, str, bytes]]
Parts = diffs.Parts
CaptureFailures = list[capture.FailureRow]
#: Node meta: ``replicated`` once the home's voids are in ``number_gaps``
#: (absent in homes made before the gap journal replicated).
GAP_JOURNAL_META = "gap_journal"
REPLICATED = "replicated"
#: What ``Node.gaps`` gives of each entry of the gap journal.
GAP_FIELDS = ("series", "number", "reason", "voucher", "collection", "node", "at")


@dataclass(frozen=True)
class ImportReport:
    """What ``import_updates`` changed: documents that had something new,
    records whose replicated state changed (``waiting`` of them now wait for
    a record they refer to), update-log rows written, and series state rows
    added or raised (an export of this node)."""

    documents: int
    records: int
    stored: int
    series: int = 0
    waiting: int = 0


class Node:
    """An open node home. Not thread-safe; use one ``Node`` per thread."""

    def __init__(
        self, home: Path, store: NodeStore, schema: Schema, clock: Clock, rng: random.Random
    ) -> None:
        meta = store.meta()
        self.home = Path(home)
        self.store = store
        self.schema = schema
        self.dataset = meta["dataset"]
        self.node_id = meta["node"]
        self._clock = clock
        self._replica = Replica(store, schema, self.node_id, clock, rng, int(meta.get("hlc", "0")))
        self._client_id = self._replica.client_id
        self._replica.adopt_adapters(meta)
        store.changed_elsewhere()
        if is_stale(store.conn):
            with store.transaction() as txn:
                if is_stale(txn.conn):  # another process may have rebuilt it first
                    self._replica.records.index.rebuild(txn.conn)

    @property
    def _adapters(self) -> plugins.AdapterSet | None:
        return self._replica.adapters

    # -- opening -----------------------------------------------------------

    @classmethod
    def create(
        cls,
        home: str | Path,
        *,
        dataset: str,
        node: str,
        schema: str | Path | Schema = "accounting",
        relay: str | None = None,
        token: str | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        adapters: Iterable[str] | dict[str, dict[str, Any]] | None = None,
        new_node: bool | None = None,
        relay_ca: str | Path | None = None,
    ) -> Node:
        """Create a node home, with ``adapters`` enabled (names, or names ->
        options). ``new_node`` says whether this node id never issued voucher
        numbers anywhere (default: yes without a relay, no with one); a home
        that is not new issues provisional numbers until its first completed
        sync (docs/conflicts.md). ``relay_ca``: the PEM file of the CA that
        signed a private relay's certificate. Raises UserError for bad names
        or CA file, HomeExists,
        SchemaError, AdapterNotFound, AdapterConfigError."""
        if not DATASET_RE.match(dataset):
            raise UserError(
                f"invalid dataset name {dataset!r}: use letters, digits, '_', '.', '-' (max 64)"
            )
        if not NODE_RE.match(node):
            raise UserError(f"invalid node name {node!r}: use letters, digits, '_', '-' (max 32)")
        sch = schema if isinstance(schema, Schema) else load_schema(schema)
        clock = clock or SystemClock()
        meta = {
            "dataset": dataset,
            "node": node,
            "schema_name": sch.name,
            "schema_version": str(sch.version),
            "schema_source": sch.source,
            "hlc": "0",
            "created_at": str(clock.wall_ms()),
            GAP_JOURNAL_META: REPLICATED,
        }
        if relay:
            meta["relay"] = relay
        if token:
            meta["token"] = token
        if relay_ca is not None:
            meta[META_RELAY_CA] = load_ca(relay_ca)
        if not (relay is None if new_node is None else new_node):
            meta[series_mod.NUMBERING_META] = series_mod.UNCONFIRMED
        store = NodeStore.create(Path(home), meta)
        created = cls(Path(home), store, sch, clock, rng or system_random())
        wanted = adapters if isinstance(adapters, dict) else {key: {} for key in adapters or ()}
        try:
            for name, options in wanted.items():
                created.enable_adapter(name, options)
            created._declared_captures()
        except BaseException:
            created.close()
            raise
        return created

    @classmethod
    def open(
        cls,
        home: str | Path,
        *,
        dataset: str | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> Node:
        """Open a node home. With ``dataset``, refuse a home of another dataset.

        Raises HomeNotFound, FormatVersionError, DatasetMismatch.
        """
        store = NodeStore.open(Path(home))
        meta = store.meta()
        if dataset is not None and meta["dataset"] != dataset:
            store.close()
            raise DatasetMismatch(f"{home} belongs to dataset '{meta['dataset']}', not '{dataset}'")
        sch = parse_schema(meta["schema_source"], origin=f"{home} (stored schema)")
        opened = cls(Path(home), store, sch, clock or SystemClock(), rng or system_random())
        try:
            if meta.get(GAP_JOURNAL_META) != REPLICATED:
                opened._replicate_old_voids()
            opened._declared_captures()
        except BaseException:
            opened.close()
            raise
        return opened

    def _replicate_old_voids(self) -> None:
        """Once, in a home made before the gap journal replicated: publish
        the voids its local series journal holds as this node's entries
        of ``number_gaps`` (with their own times)."""
        with self._replica.write() as w:
            rows = w.txn.conn.execute(
                "SELECT series, number, collection, record_id, at FROM series_journal "
                "WHERE event = 'void' ORDER BY seq"
            ).fetchall()
            for key, number, cname, rid, at in rows:
                coll = self.schema.collections.get(cname)
                if coll is not None and rid:
                    w.journal_gap(coll, key, number, "void", rid, at_ms=at)
            self.store.set_meta(GAP_JOURNAL_META, REPLICATED)

    def close(self) -> None:
        self._replica.log.clear()
        self.store.close()

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -----------------------------------------------------------

    def put(self, collection: str, fields: dict[str, Any]) -> str:
        """Insert a record, or update the one named by ``id`` or by the unique
        key in ``fields`` (only the given fields change). Returns the record id.

        In a voucher book, only an edit of an existing voucher that keeps its
        number: new vouchers are booked with ``post_voucher``, which numbers
        them from the series (ValidationError otherwise).

        Raises UnknownCollection, ValidationError, UnknownReference,
        RecordNotFound, RecordDeleted; nothing is written then.
        """
        coll = self.collection(collection)
        with self._replica.write() as w:
            return w.put(coll, fields)

    def post_voucher(self, collection: str, fields: dict[str, Any]) -> Posted:
        """Book a new voucher and give it the next number of its series
        (unless ``fields`` carries a ``number`` typed by hand).

        The number is durable together with the voucher; a failed booking
        uses no number. Raises as ``put``, and SeriesError.
        """
        coll = self.collection(collection)
        check_new_voucher(coll, fields)  # before taking the write lock
        with self._replica.write() as w:
            return w.post_voucher(coll, fields)

    def delete(self, collection: str, id_or_key: str) -> str:
        """Delete a live record (a ``_deleted`` write that replicates). Returns its id.

        Deleting a numbered voucher journals its number as void. Raises
        RecordNotFound.
        """
        coll = self.collection(collection)
        with self._replica.write() as w:
            return w.delete(coll, id_or_key)

    def batch(self, calls: Iterable[Callable[[Node], Any]]) -> list[tuple[bool, Any]]:
        """Run each ``call(node)`` in one write transaction, each in a
        savepoint of its own, and commit once (group commit). Returns, in
        order, ``(True, result)`` or ``(False, exception)``: a call that
        raised is undone alone. Raises StoreError when the commit fails (then
        none of them is durable)."""
        out: list[tuple[bool, Any]] = []
        with self._replica.write() as w:
            for call in calls:
                try:
                    # Not a bare savepoint: the loaded documents may hold
                    # what the call wrote before it raised, and must not.
                    with w.savepoint():
                        out.append((True, call(self)))
                except Exception as exc:
                    out.append((False, exc))
        return out

    def restore(self, collection: str, record_id: str) -> None:
        """Undo a delete (wins over the delete it has seen). Raises RecordNotFound."""
        coll = self.collection(collection)
        with self._replica.write() as w:
            w.restore(coll, record_id)

    def add_block(self, collection: str, first: int, last: int, year: int | None = None) -> None:
        """Take a block of a ``blocks`` series leased by the relay, then give
        final numbers to provisionally numbered vouchers. Raises SeriesError."""
        coll = self.collection(collection)
        key = self._blocks_key(coll, year)
        with self._replica.write() as w:
            series_mod.add_block(w.txn.conn, key, first, last, w.now_ms())
            w.finalize_provisional(coll)

    def refill_blocks(self, source: series_mod.BlockSource) -> int:
        """Lease blocks so every ``blocks`` series of this year holds its reserve,
        and finalize provisional numbers. Returns the numbers leased."""
        leased = 0
        year = dt.date.fromtimestamp(self._clock.wall_ms() / 1000).year
        for coll in self.schema.ordered():
            if coll.series is None or coll.series.strategy != "blocks":
                continue
            key = self._blocks_key(coll, year)
            while True:
                missing = coll.series.reserve - series_mod.reserve_left(self.store.conn, key)
                if missing <= 0 and not self._has_provisional(coll):
                    break
                count = max(coll.series.block_size, missing)
                first, last = source.lease(key, count)
                self.add_block(coll.name, first, last, year)
                leased += last - first + 1
        return leased

    def configure(
        self, *, relay: str | None = None, token: str | None = None, ca: str | Path | None = None
    ) -> None:
        """Change the relay URL and/or the token this home syncs with (a
        re-enrolled or rotated token, a moved relay). A new token clears a
        refusal of the old one; a relay given to a home that never completed
        a sync makes its numbering unconfirmed until it does (it may be an
        existing node's). A running ``node run`` uses them at its next
        connection. ``ca``: the PEM file of the CA of a private relay
        certificate (``""`` goes back to the system's CAs). Raises UserError
        for a bad URL, an empty token or a CA file that is not one."""
        if relay is None and token is None and ca is None:
            raise UserError("give --relay URL, --token T or --ca FILE")
        ca_path = load_ca(ca) if ca else None
        if relay is not None and not relay_url_ok(relay):
            raise UserError(f"relay {relay!r}: expected a ws:// or wss:// URL")
        if token is not None and not token.strip():
            raise UserError("the token is empty; give the one 'branchline relay enroll' printed")
        with self._replica.write() as w:
            meta = self.store.meta()
            if relay is not None:
                self.store.set_meta("relay", relay)
                if "last_sync" not in meta and not meta.get("relay"):
                    series_mod.set_numbering(w.txn.conn, False)
            if token is not None:
                self.store.set_meta("token", token)
                self.store.delete_meta(META_TOKEN_REFUSED)
            if ca_path is not None:
                self.store.set_meta(META_RELAY_CA, ca_path)
            elif ca is not None:
                self.store.delete_meta(META_RELAY_CA)

    def numbering_known(self) -> bool:
        """False while this home cannot know how far its node's series went
        (a rebuilt home before its first completed sync): ``node`` series
        then issue provisional numbers."""
        return series_mod.numbering_known(self.store.conn)

    def confirm_numbering(self) -> int:
        """After a completed sync (the node's earlier vouchers are here and
        counted, ``series.learn``): mark the numbering known and give final
        numbers to provisionally numbered vouchers (of ``blocks`` series as
        far as leased numbers go). Returns how many were finalized; writes
        nothing when there is nothing to do."""
        node_series = [c for c in self.schema.ordered() if c.series is not None]
        if self.numbering_known() and not any(self._has_provisional(c) for c in node_series):
            return 0
        with self._replica.write() as w:
            series_mod.set_numbering(w.txn.conn, True)
            return sum(w.finalize_provisional(c) for c in node_series)

    def series_state(self) -> dict[str, Any]:
        """This home's series state for an export file (``series.dump_state``)."""
        with self.store.reading() as conn:
            return series_mod.dump_state(conn)

    def gaps(self, series: str | None = None) -> Records:
        """The replicated gap journal (``number_gaps``): every number any
        node voided (or restored), ordered by series, number and time.
        ``series`` keeps one voucher book (``sales_invoice``) or one series
        key (``sales_invoice@2027``). Raises UnknownCollection for a
        ``series`` that names no voucher book with a series."""
        if series is not None:
            book = self.collection(series.partition("@")[0])
            if book.series is None:
                raise UnknownCollection(f"{book.name} has no number series")
        rows = [
            {k: r.get(k) for k in GAP_FIELDS}
            for r in self.list(GAPS)
            if series is None or series in (r.get("series"), r.get("collection"))
        ]
        rows.sort(key=lambda r: (r["series"] or "", r["number"] or "", r["at"] or ""))
        return rows

    def reserve_left(self, collection: str, year: int | None = None) -> int:
        """Unused leased numbers of a ``blocks`` series."""
        coll = self.collection(collection)
        return series_mod.reserve_left(self.store.conn, self._blocks_key(coll, year))

    # -- reading -----------------------------------------------------------

    def collection(self, name: str) -> Collection:
        """The schema's collection. Raises UnknownCollection."""
        return collection_of(self.schema, name)

    def get(self, collection: str, id_or_key: str, *, codes: bool = False) -> dict[str, Any] | None:
        """A live record by id or unique key, typed (Decimal, date, ...), or None.
        With ``codes``, references show the target's code instead of its id."""
        coll = self.collection(collection)
        found = rec.lookup(self.store.conn, coll, id_or_key)
        if found is None:
            return None
        row = rec.live_row(self.store.conn, coll.name, found[0])
        return rec.to_dicts(self.store.conn, coll, [row], codes)[0] if row else None

    def list(
        self, collection: str, *, codes: bool = False, limit: int | None = None, offset: int = 0
    ) -> Records:
        """The live records of a collection in id (creation time) order: all
        of them, or ``limit`` of them after the first ``offset``."""
        coll = self.collection(collection)
        rows = rec.live_rows(self.store.conn, coll.name, limit, offset)
        return rec.to_dicts(self.store.conn, coll, rows, codes)

    def find(self, collection: str, **equals: Any) -> Records:
        """Live records whose fields equal the given values."""
        coll = self.collection(collection)
        for name in equals:
            if name not in coll.fields:
                raise ValidationError(f"{collection}: unknown field '{name}'")
        return [r for r in self.list(collection) if all(r.get(k) == v for k, v in equals.items())]

    def count(self, collection: str) -> int:
        return rec.count(self.store.conn, self.collection(collection).name)

    def conflicts(self, *, resolved: bool = False) -> Records:
        """Every open conflict, derived from replicated state, sorted by id
        (engine.conflicts lists the kinds; enabled adapters add ``invariant``
        conflicts, see ``invariant_conflicts``). Each has ``id``, ``kind``,
        ``collection``, ``records``, ``field``, ``values`` (``node``,
        ``hlc``, ``value``, ``in_force``) and an ``explanation``.

        With ``resolved``, the journal of resolutions instead, oldest first.
        """
        self.refresh()
        if resolved:
            return list_resolutions(self.store.conn)
        found = list_conflicts(self.store.conn, self.schema, self.node_id)
        found += plugins.conflict_dicts(self.store.conn)
        return sorted(found, key=lambda c: str(c["id"]))

    def resolve(
        self,
        conflict_id: str,
        *,
        keep: Any = None,
        rename: str | None = None,
        merge_into: str | None = None,
        renumber: bool = False,
        record: str | None = None,
    ) -> dict[str, Any]:
        """Resolve an open conflict with one replicated write (see
        engine.resolution for what each choice does) and journal it.
        Returns the journal entry. Raises ConflictNotFound, UserError for a
        choice that does not fit the conflict, and as ``put``.
        """
        choice = resolution.Choice(keep, rename, merge_into, renumber, record)
        with self._replica.write() as w:
            return resolution.resolve(w, conflict_id, choice)

    def record_keys(self, collection: str, ids: Iterable[str]) -> dict[str, str | None]:
        """Record id -> its unique key (code or voucher number; None when it
        has none or the record is not here), for listing records readably."""
        wanted = list(dict.fromkeys(ids))
        out: dict[str, str | None] = dict.fromkeys(wanted)
        for i in range(0, len(wanted), 500):
            chunk = wanted[i : i + 500]
            out.update(
                self.store.conn.execute(
                    f"SELECT id, key FROM records WHERE collection = ? AND id IN "
                    f"({','.join('?' * len(chunk))})",
                    (collection, *chunk),
                ).fetchall()
            )
        return out

    def record_ids_starting(self, collection: str, prefix: str, limit: int = 50) -> tuple[str, ...]:
        """Ids of ``collection``'s records (deleted ones too) that start with
        ``prefix`` (case-insensitive), at most ``limit``."""
        if not prefix or not prefix.isalnum():
            return ()
        rows = self.store.conn.execute(
            "SELECT id FROM records WHERE collection = ? AND id >= ? AND id < ? "
            "ORDER BY id LIMIT ?",
            (collection, prefix.upper(), prefix.upper() + "\x7f", limit),
        ).fetchall()
        return tuple(str(r[0]) for r in rows)

    def waiting(self) -> int:
        """Received records held back until a record they refer to arrives."""
        return rec.waiting_count(self.store.conn)

    def waiting_records(self, limit: int = 1000) -> Records:
        """The records ``waiting`` counts (at most ``limit``), by collection
        and id: ``collection``, ``id``, ``key`` (the code or voucher number
        as received, or None), ``doc`` and ``missing`` (``[{collection,
        id}]`` of the records they wait for)."""
        self.refresh()
        out: Records = []
        for cname, rid, docname, tcoll, tid in rec.waiting_rows(self.store.conn):
            if not out or (out[-1]["collection"], out[-1]["id"]) != (cname, rid):
                if len(out) >= limit:
                    break
                coll = self.schema.collections.get(cname)
                values = resolve(self._doc(docname).doc.states(rid)).values if coll else {}
                key = values.get(coll.key) if coll else None
                out.append(
                    {"collection": cname, "id": rid, "key": key, "doc": docname, "missing": []}
                )
            out[-1]["missing"].append({"collection": tcoll, "id": tid})
        return out

    def settle_waiting(self) -> int:
        """After a full sync: show the records still waiting for a reference
        (each then lists as a ``dangling_reference`` conflict). Returns how many."""
        if not rec.has_waiting(self.store.conn):
            return 0  # the usual case: no write transaction at all
        with self._replica.write() as w:
            shown = w.settle_waiting()
            self._number_returned(w)
            return shown

    # -- replication -------------------------------------------------------

    def documents(self) -> Strings:
        """Names of the CRDT documents this node holds."""
        return self._replica.log.documents()

    def state(self) -> dict[str, bytes]:
        """Per document, the Yjs state vector (what this node holds)."""
        self.refresh()
        return {name: self._doc(name).doc.state_vector() for name in self.documents()}

    def export_updates(
        self, since: dict[str, bytes] | None = None, *, docs: Iterable[str] | None = None
    ) -> dict[str, bytes]:
        """Per document, the update a replica in state ``since`` lacks
        (everything when ``since`` is None). Documents with nothing new are left
        out. ``docs`` limits the export to those documents (a sync answer needs
        one document; diffing all of them per answer was quadratic). Raises
        UpdateError for an invalid state vector."""
        self.refresh()
        out = {}
        held = self.documents()
        if docs is None:
            names = held
        else:
            have = set(held)
            names = [d for d in dict.fromkeys(docs) if d in have]
        for name in names:
            sv = None if since is None else since.get(name)
            data = self._doc(name).doc.diff(sv)
            if data != EMPTY_UPDATE:
                out[name] = data
        return out

    def export_parts(
        self, doc: str, since: bytes | None, max_bytes: int, *, own_only: bool = False
    ) -> Parts:
        """What a replica in state ``since`` lacks of ``doc``, as updates of at
        most ``max_bytes`` each, each with the outbox seqs it carries (so an
        acknowledgement of it can clear them).

        One part when the whole diff fits. Otherwise the document's outbox
        rows, in order and merged in groups under ``max_bytes``: what the
        replica lacks besides them (changes that came from elsewhere, say by
        file) goes in a later exchange, once the replica's state includes the
        parts and the rest is small. Seqs are read before the diff is
        computed, so a part never claims a row it does not hold.

        With ``own_only`` (for a relay that checks authorship), the diff holds
        only the items this node wrote (clients in the ``clients`` table) and
        their deletions, never another node's entries or deletions. Outbox
        rows it would not hold go whole into the same part: rows imported with
        ``import --unsynced`` (a former life of this node, whose client ids
        are not in ``clients``) and local rows written before store format 3;
        so every claimed row is in the part, and nothing written on top of
        them waits at the relay for them.

        Raises UpdateError for an invalid state vector, or (``own_only``)
        when the diff cannot be split safely; nothing is exported then.
        """
        with self.store.reading() as conn:
            rows = outbox.of_doc(conn, doc)
            mine = self._replica.log.clients()
        # Only now catch up with other processes' commits: the diff below then
        # holds every row just read. (Refreshing before the read let a row
        # committed in between be claimed by a diff without it; its ack then
        # cleared a row that never reached the relay.)
        self.refresh()
        loaded = self._doc(doc).doc if doc in self.documents() else None
        own = (mine, self._client_id) if own_only else None
        return diffs.parts(loaded, since, rows, max_bytes, own)

    def unsynced_updates(self) -> dict[str, bytes]:
        """Per document, one update holding every local change the relay has
        not acknowledged (the outbox), for ``export --unsynced``."""
        with self.store.reading() as conn:
            by_doc = outbox.by_doc(conn)
        return {doc: diffs.merged(blobs) for doc, blobs in by_doc.items()}

    def import_updates(
        self,
        updates: dict[str, bytes],
        *,
        unsynced: bool = False,
        series: dict[str, Any] | None = None,
    ) -> ImportReport:
        """Integrate updates from another replica in one durable transaction.
        With ``unsynced`` (work another life of this node never uploaded),
        what is new here also goes into the outbox, to upload at the next sync.
        ``series`` (this node's series state from an export of it) is merged
        in the same transaction (``series.restore_state``).

        Idempotent: what is already here is not stored again. Raises
        UpdateError (nothing stored) for a bad document name or bad bytes.
        """
        for name in updates:
            self._collection_of(name)
        report, _ = self._import_once(updates, unsynced, series)
        if sum(len(data) for data in updates.values()) > TRIM_AFTER_BYTES:
            trim_heap()
        return report

    def import_sliced(
        self, name: str, data: bytes, max_bytes: int = IMPORT_SLICE_BYTES
    ) -> ImportReport:
        """Integrate one received update of document ``name`` in slices of at
        most about ``max_bytes`` (``engine.crdt.split``), each its own durable
        transaction: a catch-up of a large document then holds the store's
        write lock a few milliseconds at a time, so this process's other
        threads (a branch server's ``put``) and other processes write in
        between, and SQLite never holds a huge transaction. A crash leaves the
        slices before it, as if fewer updates had arrived; the rest comes with
        the next sync. Raises UpdateError for a bad document name or bad bytes
        (the slices before the bad one stay)."""
        self._collection_of(name)
        documents = stored = waiting = 0
        changed: set[tuple[str, str]] = set()
        # One slice at a time: all of them at once would be the update's
        # size again (tens of MB) beside it.
        for part in iter_parts(bytes(data), max_bytes):
            report, records = self._import_once({name: part}, False, None)
            documents = max(documents, report.documents)
            stored += report.stored
            waiting = report.waiting  # what still waits after the last slice
            changed |= records
        if len(data) > TRIM_AFTER_BYTES:
            trim_heap()
        return ImportReport(documents, len(changed), stored, 0, waiting)

    def _import_once(
        self, updates: dict[str, bytes], unsynced: bool, series: dict[str, Any] | None
    ) -> tuple[ImportReport, set[tuple[str, str]]]:
        """``import_updates`` in one transaction; also returns the
        (collection, record) pairs that changed."""
        documents = records = stored = restored = 0
        touched: set[str] = set()
        changed_records: set[tuple[str, str]] = set()
        # A bulk import makes millions of short-lived containers: see gcpause.
        with paused_gc(), self._replica.write() as w:
            if series is not None:
                restored = series_mod.restore_state(w.txn.conn, series)
            for name, data in updates.items():
                coll = self._collection_of(name)
                changed = w.import_update(coll, name, bytes(data), unsynced)
                if changed is None:
                    continue
                documents += 1
                stored += 1
                changed_records |= {(coll.name, rid) for rid in changed}
                if changed and coll.on_duplicate == "renumber":
                    touched.add(coll.name)
            if touched:
                resolution.renumber_own_duplicates(w, touched)
            if changed_records:
                self._number_returned(w)
            records = len(changed_records)
            held = rec.waiting_ids(w.txn.conn) if changed_records else set()
        report = ImportReport(documents, records, stored, restored, len(held & changed_records))
        return report, changed_records

    def _number_returned(self, w: Any) -> None:
        """This node's provisionally numbered vouchers that came back (a
        rebuilt home gets its earlier life's work from the relay, maybe
        after its first completed sync, maybe held back for a reference
        first): adopted if their mapping was lost with the disk, and given
        final numbers once the numbering is known. A few indexed reads."""
        for coll in self.schema.ordered():
            if coll.series is None:
                continue
            series_mod.adopt_provisional(w.txn.conn, coll, self.node_id, w.now_ms())
            if rec.has_unnumbered(w.txn.conn, coll.name):
                w.finalize_provisional(coll)

    def outbox(self, limit: int = 1000) -> Outbox:
        """Local updates the relay has not acknowledged: (seq, document, update)."""
        return outbox.rows(self.store.conn, limit=limit)

    def outbox_rows_per_doc(self) -> dict[str, int]:
        """Per document with any, its outbox rows (changes the relay lacks)."""
        return outbox.rows_per_doc(self.store.conn)

    def pending(self) -> dict[str, int]:
        """Per collection (every one of the schema), the records with local
        changes the relay has not acknowledged yet."""
        out = dict.fromkeys(self.schema.collections, 0)
        for doc, count in outbox.records_per_doc(self.store.conn).items():
            name = doc.partition("/")[0]
            if name in out:
                out[name] += count
        return out

    def urgent_pending(self) -> dict[str, int]:
        """Per collection with ``urgent_when``, its pending records that match
        it now (engine.store.urgent); they are part of ``pending`` too."""
        return urgent.pending(self.store.conn, self.schema).counts

    def urgent_docs(self) -> set[str]:
        """Documents a sync pass takes first: those holding urgent pending
        records and pending changes of the records these refer to."""
        return urgent.pending(self.store.conn, self.schema, with_docs=True).docs

    def pending_records(self, limit: int = 1000) -> Records:
        """Records with local changes the relay has not acknowledged, oldest
        change first (at most ``limit``): ``collection``, ``id``, ``key``
        (its code or number) and ``doc``."""
        return [
            {
                "collection": coll if coll else doc.partition("/")[0],
                "id": rid,
                "key": key,
                "doc": doc,
            }
            for doc, rid, coll, key in outbox.pending_records(self.store.conn, limit)
        ]

    def ack(self, seqs: Iterable[int]) -> None:
        """Mark outbox entries acknowledged by the relay (durably)."""
        with self.store.transaction() as txn:
            outbox.ack(txn, seqs)

    def refresh(self) -> bool:
        """Bring loaded documents up to date with other processes' commits.
        Returns True when something had changed since the last call (by
        anyone: see ``changes_seen``)."""
        return self._replica.refresh()

    @property
    def changes_seen(self) -> int:
        """How many times a refresh (any caller's, a write's included) found
        other processes' commits: grows by one or more per outside change."""
        return self._replica.changes_seen

    def compact(self, docname: str | None = None) -> int:
        """Fold log rows into snapshots (acknowledged or remote rows are then
        removed; the outbox stays). Returns the rows removed."""
        removed = 0
        names = [docname] if docname else self.documents()
        for name in names:
            with self._replica.write() as w:
                removed += w.compact(name)
        return removed

    # -- internals ---------------------------------------------------------

    def _collection_of(self, docname: str) -> Collection:
        if not isinstance(docname, str) or not DOC_RE.match(docname):
            raise UpdateError(f"invalid document name {docname!r}")
        name = docname.partition("/")[0]
        if name not in self.schema.collections:
            raise UpdateError(
                f"document {docname!r} belongs to collection '{name}', which this node's "
                f"schema ({self.schema.name} v{self.schema.version}) does not have"
            )
        return self.schema.collections[name]

    def _doc(self, name: str) -> Loaded:
        return self._replica.log.get(name)

    def _blocks_key(self, coll: Collection, year: int | None) -> str:
        if coll.series is None or coll.series.strategy != "blocks":
            raise SeriesError(f"{coll.name} does not use a 'blocks' series")
        if coll.series.reset == "yearly":
            year = year or dt.date.fromtimestamp(self._clock.wall_ms() / 1000).year
            return series_mod.series_key(coll, dt.date(year, 1, 1))
        return series_mod.series_key(coll, None)

    def provisional_years(self, collection: str) -> Ints:
        """Years of a yearly series whose vouchers wait for a final number."""
        return series_mod.waiting_years(self.store.conn, collection)

    def _has_provisional(self, coll: Collection) -> bool:
        return rec.has_unnumbered(self.store.conn, coll.name)

    # -- adapters (issue 5) ------------------------------------------------

    def adapters(self) -> dict[str, dict[str, Any]]:
        """Enabled adapters: name -> options, in the order they were enabled."""
        return plugins.enabled(self.store.meta())

    def enable_adapter(self, name: str, options: dict[str, Any] | None = None) -> None:
        """Enable an installed adapter (with options) and fill its tables from
        the current records, in one transaction. Enabling it again replaces
        its options and rebuilds. Raises AdapterNotFound, AdapterConfigError.

        Other processes that have this home open take up the new set at
        their next read or write.
        """
        adapter = plugins.load(name, self.schema, options)
        with self._replica.write() as w:
            txn = w.txn
            wanted = plugins.enabled(self.store.meta())
            wanted[name] = dict(options or {})
            plugins.ensure_conflicts_table(txn.conn)
            adapter.setup(txn.conn)
            plugins.rebuild(txn.conn, adapter, self._live_records(adapter), compare=False)
            self.store.set_meta(plugins.META_KEY, orjson.dumps(wanted).decode())
        self._replica.adopt_adapters(self.store.meta())

    def disable_adapter(self, name: str) -> None:
        """Disable an adapter and drop its tables, views and conflicts.
        Raises AdapterNotFound when it is not enabled."""
        wanted = plugins.enabled(self.store.meta())
        if name not in wanted:
            raise AdapterNotFound(
                f"adapter '{name}' is not enabled on this node "
                f"(enabled: {', '.join(wanted) or 'none'})"
            )
        try:
            adapter: plugins.Adapter | None = plugins.load(name, self.schema, wanted[name])
        except AdapterError:
            adapter = None  # not installed any more: forget it, its tables stay
        with self._replica.write() as w:
            txn = w.txn
            if adapter is not None:
                adapter.drop(txn.conn)
            plugins.ensure_conflicts_table(txn.conn)
            txn.execute("DELETE FROM adapter_conflicts WHERE adapter = ?", (name,))
            del wanted[name]
            self.store.set_meta(plugins.META_KEY, orjson.dumps(wanted).decode())
        self._replica.adopt_adapters(self.store.meta())

    def rebuild_adapters(
        self, names: Iterable[str] | None = None, *, compare: bool = True
    ) -> plugins.RebuildReports:
        """Rebuild enabled adapters' tables from the records and, with
        ``compare``, report rows that differed from the incremental tables
        (there should be none). One transaction: an interrupted rebuild
        leaves the tables as they were. Raises AdapterNotFound."""
        if isinstance(self._adapters, plugins.BrokenAdapterSet):
            raise self._adapters.error
        active = self._adapters.adapters if self._adapters else []
        chosen = [a for a in active if names is None or a.name in set(names)]
        missing = set(names or ()) - {a.name for a in chosen}
        if missing:
            raise AdapterNotFound(
                f"adapter(s) {', '.join(sorted(missing))} not enabled on this node "
                f"(enabled: {', '.join(a.name for a in active) or 'none'})"
            )
        with self._replica.write() as w:
            return [
                plugins.rebuild(w.txn.conn, a, self._live_records(a), compare=compare)
                for a in chosen
            ]

    # -- write-back capture (issue 15) -------------------------------------

    def captures(self) -> dict[str, capture.CaptureSpec]:
        """Captured tables: name -> spec (collection, key column, columns)."""
        return capture.specs_of(self.store.meta())

    def enable_capture(self, table: str, collection: str, key: str | None = None) -> int:
        """Capture the app's table ``table`` (in this node's store) into
        ``collection``: from now on every insert, update and delete of it is
        queued in the app's own transaction and becomes a replicated write,
        and changes from other nodes are written into it. ``key``: the
        column holding the collection's key (default: the key's name). Its
        existing rows are queued as inserts and every live record missing
        from it is written in, in one transaction; returns the rows queued
        (``drain_captured`` writes them). Raises CaptureError."""
        with self._replica.write() as w:
            conn = w.txn.conn
            specs = self.captures()
            if table in specs:
                raise CaptureError(f"{table} is captured already (into {specs[table].collection})")
            taken = [s.table for s in specs.values() if s.collection == collection]
            if taken:
                raise CaptureError(f"{collection} is captured already, by table {taken[0]}")
            spec = capture.plan(conn, self.schema, table, collection, key, self._reserved())
            capture_sql.ensure_tables(conn)
            capture_sql.install(conn, spec)
            queued = capture_sql.enqueue_existing(conn, spec)
            one = capture.Capture(self.schema, {table: spec})
            one.writebacks[0].rebuild(
                conn, plugins.live_records(conn, self.schema, [collection], self._states)
            )
            specs[table] = spec
            self.store.set_meta(capture.META_KEY, capture.specs_to_meta(specs))
        self._replica.adopt_adapters(self.store.meta())
        return queued

    def disable_capture(self, table: str, *, discard_failures: bool = False) -> None:
        """Stop capturing ``table``: its queued changes are written first,
        then its triggers go (the table and its rows stay the app's).
        Raises CaptureNotFound, and CaptureError while changes of it are
        quarantined, unless ``discard_failures``."""
        specs = self.captures()
        if table not in specs:
            raise CaptureNotFound(
                f"{table} is not captured on this node (captured: {', '.join(specs) or 'none'})"
            )
        with self._replica.write() as w:
            conn = w.txn.conn
            held = [f for f in capture_sql.failures(conn) if f.change.table == table]
            if held and not discard_failures:
                raise CaptureError(
                    f"{len(held)} change(s) of {table} are quarantined ('branchline failures'); "
                    "retry them, or disable with --discard-failures to give them up"
                )
            capture_sql.forget(conn, table)
            del specs[table]
            self.store.set_meta(capture.META_KEY, capture.specs_to_meta(specs))
        self._replica.adopt_adapters(self.store.meta())

    def drain_captured(self, limit: int = capture.DRAIN_BATCH) -> capture.Drained:
        """Write the oldest ``limit`` changes queued by captured tables, in
        one transaction (a refused one is quarantined, listed by
        ``capture_failures``). Costs one read when nothing is queued."""
        self.refresh()  # takes up a capture another process enabled
        if self._replica.capture is None or not capture_sql.any_queued(self.store.conn):
            return capture.Drained()
        with self._replica.write(drain=False) as w:
            assert self._replica.capture is not None
            return self._replica.capture.drain(w, limit)

    def capture_queued(self) -> dict[str, int]:
        """Changes waiting in the capture queue, per table."""
        return capture_sql.queued(self.store.conn)

    def capture_status(self) -> dict[str, int]:
        """Captured tables, changes waiting to be written, changes quarantined."""
        conn = self.store.conn
        return {
            "tables": len(self.captures()),
            "queued": sum(capture_sql.queued(conn).values()),
            "quarantined": capture_sql.failure_count(conn),
        }

    def capture_failures(self) -> CaptureFailures:
        """Quarantined changes (and records that could not be written into
        their table), oldest first, with the reason."""
        return capture_sql.failures(self.store.conn)

    def retry_captured(self, ids: Iterable[int] | None = None) -> int:
        """Queue quarantined changes ``ids`` (all when None) again, after
        their cause is fixed; returns how many. Raises CaptureNotFound."""
        if self._replica.capture is None:
            if ids:
                raise CaptureNotFound("no table is captured on this node")
            return 0
        with self._replica.write(drain=False) as w:
            assert self._replica.capture is not None
            return self._replica.capture.retry(w, ids)

    def _declared_captures(self) -> None:
        """Capture the tables the schema declares (``[capture.<table>]``),
        creating those missing with a column per field; nothing to do (and
        no write) once they are all captured."""
        have = self.captures()
        for decl in self.schema.captures:
            if decl.table in have:
                continue
            coll = self.collection(decl.collection)
            key = decl.key or coll.key
            columns = {key: "TEXT"}
            for name, fld in coll.fields.items():
                if name != coll.key:
                    columns[name] = "INTEGER" if fld.type in ("int", "bool") else "TEXT"
            with self.store.transaction() as txn:
                capture_sql.create_table(txn.conn, decl.table, key, columns)
            self.enable_capture(decl.table, decl.collection, decl.key)

    def _reserved(self) -> frozenset[str]:
        """Tables an app must not capture: the store's own and the adapters'."""
        adapters = self._adapters.adapters if self._adapters else []
        return own_tables() | {"adapter_conflicts"} | {t for a in adapters for t in a.tables()}

    def live_records(self, collections: Iterable[str]) -> Iterator[plugins.RecordChange]:
        """Every live record of ``collections`` as an ``inserted`` change, in
        collection and id order, as an adapter's rebuild gets them: for books
        kept outside the store (adapters.pg_books). Read it inside
        ``store.reading()`` for one snapshot."""
        return plugins.live_records(self.store.conn, self.schema, collections, self._states)

    def invariant_conflicts(self) -> Records:
        """Adapters' open conflicts (kind ``invariant``), shaped like
        ``conflicts()`` plus ``level`` (error, warning), ``rule`` and ``adapter``."""
        return plugins.conflict_dicts(self.store.conn)

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> QueryResult:
        """Run one read-only SQL statement on the store (adapter tables,
        views, records). Raises QueryError for writes or bad SQL (naming the
        adapter to enable for a table of one this node has not enabled)."""
        try:
            return run_query(self.store.path, sql, params)
        except QueryError as exc:
            missing = re.search(r"no such table: (\w+)", str(exc))
            owner = missing and adapter_owning(missing[1], self.schema, skip=self.adapters())
            if not owner:
                raise
            raise QueryError(
                f"{exc} (a table of the '{owner}' adapter, which this node has not enabled: "
                f"'branchline adapters enable --home {self.home} {owner}')"
            ) from None

    def _states(self, docname: str, rid: str) -> dict[str, Any]:
        return self._replica.states(docname, rid)

    def _live_records(self, adapter: plugins.Adapter) -> Iterator[plugins.RecordChange]:
        return plugins.live_records(self.store.conn, self.schema, adapter.collections, self._states)
