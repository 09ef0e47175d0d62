"""Writing to an open node.

``Replica`` is what the writes of one ``Node`` share: the store, the schema,
the loaded documents, the hybrid clock, the materializer and the adapters.
``Replica.write()`` opens one store write transaction and hands out a
``Writer``, through which every replicated write of the node goes (puts,
vouchers, deletes, imports, resolutions): it writes the CRDT entry, logs the
update (the outbox), re-resolves the records and feeds the adapters the
changes, all in that transaction.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from . import capture as capture_mod
from . import plugins
from . import series as series_mod
from .clock import Clock, HybridClock
from .crdt import RecordDoc
from .crdt.document import SEP
from .crdt.statevec import decode_state_vector
from .errors import (
    DuplicateKey,
    RecordDeleted,
    RecordNotFound,
    UnknownCollection,
    UnknownReference,
    UserError,
    ValidationError,
)
from .ids import new_id, node_salt
from .merge import CREATED, DELETED, new_state, resolve, seen_by
from .schema import GAPS, Collection, Schema
from .store import NodeStore, WriteTxn, outbox
from .store import records as rec
from .store.doclog import DocLog
from .store.records import Materialized, Materializer, RecordRow
from .values import encode

#: Records materialized at once by a received update (a limit on the memory
#: a bulk import holds: parsed entries, resolved records, rows).
MATERIALIZE_SLICE = 5_000


@dataclass(frozen=True)
class Posted:
    """A voucher that was booked: its record id and its number."""

    id: str
    number: str
    provisional: bool = False


def collection_of(schema: Schema, name: str) -> Collection:
    """The schema's collection ``name``. Raises UnknownCollection."""
    coll = schema.collections.get(name)
    if coll is None:
        known = ", ".join(sorted(schema.collections))
        raise UnknownCollection(f"unknown collection '{name}' (known: {known})")
    return coll


def check_new_voucher(coll: Collection, fields: dict[str, Any]) -> None:
    """Raises UserError (a catalog) or ValidationError (an id given) for
    what cannot be booked as a new voucher of ``coll``."""
    if not coll.is_voucher:
        raise UserError(f"{coll.name} is a catalog, not a voucher book; use put")
    if "id" in fields:
        raise ValidationError(f"{coll.name}: a new voucher cannot name an id; use put to edit")


class Replica:
    """The in-memory side of one open node home. Not thread-safe."""

    def __init__(
        self,
        store: NodeStore,
        schema: Schema,
        node_id: str,
        clock: Clock,
        rng: random.Random,
        hlc: int,
    ) -> None:
        self.store = store
        self.schema = schema
        self.node_id = node_id
        self.clock = clock
        self.rng = rng
        self.hlc = HybridClock(clock, hlc)
        # One Yjs client id per process: two live Doc instances of one document
        # must never share a client id, or the replicas diverge.
        self.client_id = rng.getrandbits(52) + 1
        # True once this instance's row is in ``clients`` (or in the write
        # transaction under way; reset if it rolls back). Checked on every
        # local write, so it must cost no query.
        self.client_noted = False
        self.salt = node_salt(node_id)
        self.log = DocLog(store.reading, self.client_id, clock.wall_ms)
        self.records = Materializer(schema, node_id, clock.wall_ms, self.document, self.hlc.observe)
        # None unless the node enables adapters: then writes skip them at no cost.
        self.adapters: plugins.AdapterSet | None = None
        self.adapters_meta: str | None = None  # the meta entry they were read from
        #: The captured tables (engine.capture), None when there are none.
        self.capture: capture_mod.Capture | None = None
        self.capture_meta: str | None = None
        # Counts the outside changes ``refresh`` has taken up: a reader that
        # must not miss one compares it with the count it saw last, since
        # whoever calls ``refresh`` first gets its True.
        self.changes_seen = 0

    def adopt_adapters(self, meta: dict[str, str]) -> None:
        """Feed writes to the adapters node ``meta`` enables and to its
        captured tables (and remember which, so ``refresh`` notices another
        process changing them)."""
        self.adapters_meta = meta.get(plugins.META_KEY)
        self.capture_meta = meta.get(capture_mod.META_KEY)
        specs = capture_mod.specs_of(meta)
        self.capture = capture_mod.Capture(self.schema, specs) if specs else None
        sinks = self.capture.writebacks if self.capture is not None else []
        self.set_adapters(plugins.AdapterSet.from_meta(meta, self.schema, sinks))

    def set_adapters(self, adapters: plugins.AdapterSet | None) -> None:
        self.adapters = adapters
        self.records.consumes = adapters.consumes if adapters is not None else _nobody

    def document(self, name: str) -> RecordDoc:
        """Document ``name`` (loaded on demand)."""
        return self.log.get(name).doc

    def states(self, docname: str, rid: str) -> dict[str, Any]:
        """Record ``rid``'s entries (node -> state) in document ``docname``."""
        return self.log.get(docname).doc.states(rid)

    def refresh(self) -> bool:
        """Bring loaded documents up to date with other processes' commits.
        Returns True when something had changed."""
        if not self.store.changed_elsewhere():
            return False
        self.changes_seen += 1
        self.log.catch_up()
        meta = self.store.meta()
        if (
            meta.get(plugins.META_KEY) != self.adapters_meta
            or meta.get(capture_mod.META_KEY) != self.capture_meta
        ):
            # Another process enabled or disabled an adapter (and rebuilt its
            # tables) or a capture: from now on this instance's writes feed the new set.
            self.adopt_adapters(meta)
        return True

    def new_id(self) -> str:
        """A new record id (time-sortable, made by this node)."""
        return new_id(self.hlc.tick(), self.salt, self.rng)

    @contextmanager
    def write(self, drain: bool = True) -> Iterator[Writer]:
        """One write transaction: it first catches up with what other
        processes committed and, with ``drain``, writes every change queued
        by captured tables (engine.capture.drain says why first), and
        commits (durably) when the block ends. Anything raised rolls it
        back, drops the loaded documents (they may hold what did not commit)
        and goes on up. Raises StoreError."""
        noted = self.client_noted
        try:
            with self.store.transaction() as txn:
                self.refresh()
                self.hlc.observe(int(self.store.get_meta("hlc") or 0))
                writer = Writer(self, txn)
                if drain and self.capture is not None:
                    self.capture.drain(writer)
                yield writer
                writer.flush()  # nothing written leaves unresolved
                self.store.set_meta("hlc", str(self.hlc.last))
        except BaseException:
            # The ``clients`` row this write added, if any, rolled back with it.
            self.log.clear()
            self.client_noted = noted
            raise


class Writer:
    """The write transaction of a ``Replica`` under way. Every method raises
    what it says and leaves rolling back to ``Replica.write``."""

    def __init__(self, replica: Replica, txn: WriteTxn) -> None:
        self._r = replica
        self.txn = txn
        self.schema = replica.schema
        self.node_id = replica.node_id
        self._deferring = False
        # (collection, document, record) written under ``deferring``, not yet
        # re-resolved: ``flush`` does them together.
        self._unresolved: list[tuple[Collection, str, str]] = []

    def now_ms(self) -> int:
        return self._r.clock.wall_ms()

    def new_id(self) -> str:
        return self._r.new_id()

    def collection(self, name: str) -> Collection:
        """Raises UnknownCollection."""
        return collection_of(self.schema, name)

    def states(self, docname: str, rid: str) -> dict[str, Any]:
        return self._r.states(docname, rid)

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A part of the transaction undone alone when it raises (and then
        the loaded documents are dropped: they may hold what was undone)."""
        noted = self._r.client_noted
        unresolved = len(self._unresolved)
        try:
            with self._r.store.transaction():
                yield
        except BaseException:
            self._r.log.clear()
            self._r.client_noted = noted
            del self._unresolved[unresolved:]
            raise

    @contextmanager
    def deferring(self, on: bool = True) -> Iterator[None]:
        """With ``on``, writes inside log their update but leave re-resolving
        their records to ``flush``, which does a whole run of them in one
        materialization per document: a bulk of new records costs per batch,
        not per record. Until then the record tables (lookups by id or key,
        ``row``) do not show those writes: callers flush before anything that
        reads a record written so. The documents do show them."""
        was, self._deferring = self._deferring, on
        try:
            yield
        finally:
            self._deferring = was

    def flush(self) -> int:
        """Re-resolve the records written under ``deferring`` (in the order
        of their documents' first write); returns the rows written. Raises
        what ``materialize`` raises."""
        pending, self._unresolved = self._unresolved, []
        groups: dict[tuple[str, str], tuple[Collection, set[str]]] = {}
        for coll, docname, rid in pending:
            groups.setdefault((coll.name, docname), (coll, set()))[1].add(rid)
        return sum(
            self.materialize(coll, self._r.log.get(docname).doc, rids)
            for (_, docname), (coll, rids) in groups.items()
        )

    # -- reads inside the transaction ------------------------------------------

    def lookup(
        self, coll: Collection, id_or_key: str, by_id: bool = True
    ) -> tuple[str, str] | None:
        """(id, document) of the live record with that id or key. With several
        live records on one key (a duplicate_key conflict), the earliest created."""
        return rec.lookup(self.txn.conn, coll, id_or_key, by_id)

    def find_live(self, coll: Collection, id_or_key: str) -> tuple[str, str]:
        """Raises RecordNotFound."""
        found = self.lookup(coll, id_or_key)
        if found is None:
            raise RecordNotFound(f"{coll.name}: no live record with id or {coll.key} {id_or_key!r}")
        return found

    def resolve_ref(self, target: str, value: str, where: str) -> str:
        """The id of the live ``target`` record with that code or id. Raises UnknownReference."""
        found = self.lookup(self.schema.collections[target], value)
        if found is None:
            raise UnknownReference(f"{where}: no {target} record with code or id {value!r}")
        return found[0]

    def row(self, coll: Collection, rid: str) -> RecordRow | None:
        """Record ``rid``'s row (live, deleted or alias), or None."""
        return rec.row_of(self.txn.conn, coll.name, rid)

    def stored_value(self, coll: Collection, rid: str, name: str) -> Any:
        return rec.stored_value(self.txn.conn, coll.name, rid, name)

    # -- writes ----------------------------------------------------------------

    def put(self, coll: Collection, fields: dict[str, Any]) -> str:
        """``Node.put`` inside this transaction."""
        _check_user_writable(coll)
        if coll.is_voucher and isinstance(fields, dict):
            self._check_voucher_edit(coll, fields)
        return self._put(coll, fields)

    def create(self, coll: Collection, fields: dict[str, Any], rid: str) -> str:
        """A new catalog record with id ``rid`` (one from ``new_id``). Raises as ``put``."""
        _check_user_writable(coll)
        return self._put(coll, fields, new_record_id=rid)

    def post_voucher(
        self, coll: Collection, fields: dict[str, Any], rid: str | None = None
    ) -> Posted:
        """``Node.post_voucher`` inside this transaction; ``rid``: the new
        voucher's id (one from ``new_id``), default a new one."""
        check_new_voucher(coll, fields)
        if fields.get("number"):
            # A typed number already in use must not turn the booking
            # into an edit of the other voucher.
            number = encode(coll.fields["number"], fields["number"], f"{coll.name}.number")
            taken = self.lookup(coll, number, by_id=False)
            if taken is not None:
                raise DuplicateKey(
                    f"{coll.name}: number {number!r} is already used by voucher {taken[0]}"
                )
            rid = rid or self.new_id()
            self._put(coll, fields, new_record_id=rid)
            return Posted(rid, str(fields["number"]))
        rid = rid or self.new_id()
        alloc = self.allocate(coll, self._partition_date(coll, fields), rid)
        self._put(coll, {**fields, "number": alloc.number}, new_record_id=rid)
        return Posted(rid, alloc.number, alloc.provisional)

    def delete(self, coll: Collection, id_or_key: str) -> str:
        """``Node.delete`` inside this transaction."""
        _check_user_writable(coll)
        rid, docname = self.find_live(coll, id_or_key)
        self.write_entry(coll, docname, rid, {DELETED: True})
        numbered = self.numbered(coll, rid)
        if numbered is not None:
            key, number = numbered
            series_mod.void(self.txn.conn, key, number, coll.name, rid, self.now_ms())
            self.journal_gap(coll, key, number, "void", rid)
        return rid

    def restore(self, coll: Collection, rid: str) -> None:
        """``Node.restore`` inside this transaction."""
        _check_user_writable(coll)
        row = self.row(coll, rid)
        if row is None:
            raise RecordNotFound(f"{coll.name}: no record {rid}")
        self.write_entry(coll, row.doc, rid, {DELETED: False})
        numbered = self.numbered(coll, rid) if row.deleted else None
        if numbered is not None:
            self.journal_gap(coll, *numbered, "restored", rid)

    def journal_gap(
        self,
        coll: Collection,
        key: str,
        number: str,
        reason: str,
        rid: str,
        at_ms: int | None = None,
    ) -> None:
        """Write one entry of the replicated gap journal (``number_gaps``):
        a new record of this node's, never edited afterwards, so every node
        lists it and the relay's authorship check accepts it. ``at_ms``:
        when it happened (default now)."""
        gaps = self.schema.collections.get(GAPS)
        if gaps is None:
            return  # a schema built in code without the journal
        gid = self.new_id()
        at = dt.datetime.fromtimestamp((self.now_ms() if at_ms is None else at_ms) / 1000, dt.UTC)
        values = {
            "code": gid,
            "series": key,
            "collection": coll.name,
            "number": number,
            "reason": reason,
            "voucher": rid,
            "node": self.node_id,
            "at": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        }
        self._put(gaps, values, new_record_id=gid)

    def numbered(self, coll: Collection, rid: str) -> tuple[str, str] | None:
        """(series key, number) of a numbered voucher, else None."""
        if not coll.is_voucher or coll.series is None:
            return None
        number = self.stored_value(coll, rid, "number")
        if not number:
            return None
        raw = self.stored_value(coll, rid, "date")
        return series_mod.series_key(coll, dt.date.fromisoformat(raw) if raw else None), number

    def allocate(self, coll: Collection, date: dt.date | None, rid: str) -> series_mod.Allocation:
        """The next number of ``coll``'s series for record ``rid``. Raises SeriesError."""
        return series_mod.allocate(self.txn.conn, coll, self.node_id, date, rid, self.now_ms())

    def finalize_provisional(self, coll: Collection) -> int:
        """Give final numbers to ``coll``'s provisionally numbered vouchers
        while the series has numbers; returns how many."""
        done = 0
        empty: set[str] = set()  # series keys (years) without a number left
        for rid, date in rec.unnumbered(self.txn.conn, coll.name):
            day = dt.date.fromisoformat(date) if date else None
            key = series_mod.series_key(coll, day)
            if key in empty:
                continue
            number = series_mod.finalize(self.txn.conn, coll, self.node_id, rid, day, self.now_ms())
            if number is None:
                empty.add(key)
                continue
            done += 1
            row = self.row(coll, rid)
            if row is not None and not row.deleted:
                self.write_entry(coll, row.doc, rid, {"number": number})
        return done

    def write_entry(self, coll: Collection, docname: str, rid: str, values: dict[str, Any]) -> None:
        """Write ``values`` as this node's entry of record ``rid``: one
        replicated write that has seen every entry here, logged in the
        outbox, the record re-resolved. Raises RecordDeleted for an edit of
        a deleted record (unless the write sets ``_deleted``)."""
        loaded = self._r.log.get(docname)
        states = loaded.doc.states(rid)
        current = resolve(states)
        if current.complete and current.deleted and DELETED not in values:
            raise RecordDeleted(f"{coll.name} {rid} is deleted; restore it before editing")
        hlc = self._r.hlc.tick(at_least=current.newest)
        state = new_state(states.get(self.node_id), values, hlc, seen_by(states, self.node_id))
        update = loaded.doc.write(rid, self.node_id, state)
        if not self._r.client_noted:
            # Every local write comes through here: the first one of this
            # instance notes its client id, in the same transaction, so an
            # own-only diff (``export_parts``) never misses an item it wrote.
            self._r.log.note_clients(self.txn, [self._r.client_id])
            self._r.client_noted = True
        self._r.log.append(self.txn, loaded, update, "local", rid)
        if self._deferring:
            self._unresolved.append((coll, docname, rid))
            return
        self.materialize(coll, loaded.doc, {rid})

    def import_update(
        self, coll: Collection, name: str, data: bytes, unsynced: bool
    ) -> set[str] | None:
        """Integrate one received update of document ``name``; returns the
        records whose state changed, or None when nothing was new (then
        nothing is stored). With ``unsynced`` it also goes into the outbox.
        Raises UpdateError for bytes that are not an update."""
        loaded = self._r.log.get(name)
        before = loaded.doc.state_vector()
        changed, integrated, pending = loaded.doc.apply(data)
        if not integrated and not pending:
            return None  # nothing new: importing twice stores nothing
        self._adopt_clients(loaded.doc, before)
        # The raw bytes, not just what integrated: a part waiting for
        # missing updates would otherwise be lost on restart.
        seq = self._r.log.append(self.txn, loaded, data, "remote", pending=unsynced)
        if unsynced:
            outbox.carries(self.txn, seq, sorted(changed))
        # In slices, in key order: what one slice parses and resolves is
        # dropped before the next, so a bulk import's memory is bounded by
        # the slice, not the batch. Same transaction: all or nothing.
        ordered = sorted(changed)
        for i in range(0, len(ordered), MATERIALIZE_SLICE):
            part = ordered[i : i + MATERIALIZE_SLICE]
            self.materialize(coll, loaded.doc, set(part), hold=True)
            loaded.doc.release(part)
        loaded.doc.release()
        return changed

    def materialize(
        self, coll: Collection, doc: RecordDoc, rids: set[str], hold: bool = False
    ) -> int:
        """Re-resolve records into the record tables and feed the adapters
        the changes (``Materializer.materialize``). Returns the rows written."""
        return self._deliver(self._r.records.materialize(self.txn, coll, doc, rids, hold))

    def settle_waiting(self) -> int:
        """Show the records still waiting for a reference; returns how many."""
        return self._deliver(self._r.records.settle(self.txn))

    def compact(self, docname: str) -> int:
        """Fold ``docname``'s log into a snapshot; returns the rows removed."""
        return self._r.log.compact(self.txn, self._r.log.get(docname))

    # -- internals -------------------------------------------------------------

    def _deliver(self, done: Materialized) -> int:
        adapters = self._r.adapters
        if adapters is not None:
            for coll, changes in done.changes:
                adapters.apply(self.txn.conn, coll, changes)
        return done.rows

    def _adopt_clients(self, doc: RecordDoc, before: bytes) -> None:
        """An import that set only this node's own entries brought this
        node's work written elsewhere (an earlier life of the node, records
        built for it): note the clients it advanced as this node's, so
        own-only diffs (``export_parts``) publish those items too. Imports
        that also set other nodes' entries adopt nothing."""
        keys = doc.set_keys()
        if not keys or any(k.partition(SEP)[2] != self.node_id for k in keys):
            return
        old = decode_state_vector(before)
        new = decode_state_vector(doc.state_vector())
        self._r.log.note_clients(
            self.txn,
            [client for client, clock in new.items() if clock > old.get(client, 0)],
        )

    def _check_voucher_edit(self, coll: Collection, fields: dict[str, Any]) -> None:
        """Refuse a ``put`` that would create a voucher or change a voucher's
        number (a printed number never changes; clashes are renumbered by
        ``resolve``). Raises ValidationError."""
        book = (
            f"{coll.name} is a voucher book: book a new voucher with "
            f"'branchline voucher {coll.name} JSON' (Node.post_voucher), which numbers it"
        )
        number = fields.get(coll.key)
        if "id" not in fields:
            if number is None:
                raise ValidationError(f"{book}; put only edits a voucher named by id or number")
            key = encode(coll.fields[coll.key], number, f"{coll.name}.{coll.key}")
            if self.lookup(coll, key, by_id=False) is None:
                raise ValidationError(f"{book}; no voucher is numbered {key!r}")
            return
        if number is None:
            return
        found = self.lookup(coll, str(fields["id"]))
        if found is None:
            return  # _put says the voucher does not exist
        key = encode(coll.fields[coll.key], number, f"{coll.name}.{coll.key}")
        row = self.row(coll, found[0])
        if row is not None and row.key != key:
            raise ValidationError(
                f"{coll.name}: voucher {found[0]} is numbered {row.key!r} and keeps it "
                "(a number once issued never changes); a clash of numbers is settled with "
                "'branchline resolve --renumber'"
            )

    def _put(
        self, coll: Collection, fields: dict[str, Any], new_record_id: str | None = None
    ) -> str:
        if not isinstance(fields, dict):
            raise ValidationError(f"{coll.name}: expected an object of fields")
        unknown = [k for k in fields if k != "id" and k not in coll.fields]
        if unknown:
            raise ValidationError(
                f"{coll.name}: unknown field(s) {', '.join(map(str, unknown))} "
                f"(known: {', '.join(coll.fields)})"
            )
        existing: tuple[str, str] | None = None
        if new_record_id is None and "id" in fields:
            existing = self.find_live(coll, str(fields["id"]))
        elif new_record_id is None and fields.get(coll.key) is not None:
            # Validate the key first: SQLite cannot even look up a malformed one.
            key = encode(coll.fields[coll.key], fields[coll.key], f"{coll.name}.{coll.key}")
            existing = self.lookup(coll, key, by_id=False)
        values = self._encode(coll, fields, creating=existing is None)
        if existing is not None and "id" not in fields:
            # Found by its key: re-writing the same key would only show up as
            # an edit in conflicts.
            values.pop(coll.key, None)
        if existing is None:
            rid = new_record_id or self.new_id()
            docname = _doc_name(coll, values)
            values[CREATED] = True
        else:
            rid, docname = existing
            if coll.partition and coll.partition_field in values:
                moved = _doc_name(coll, values)
                if moved != docname:
                    raise ValidationError(
                        f"{coll.name}.{coll.partition_field}: cannot move a voucher from "
                        f"period {docname.partition('/')[2]} to {moved.partition('/')[2]}; "
                        "void it and book a new one"
                    )
        self.write_entry(coll, docname, rid, values)
        return rid

    def _encode(self, coll: Collection, fields: dict[str, Any], creating: bool) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, value in fields.items():
            if name == "id":
                continue
            fld = coll.fields[name]
            where = f"{coll.name}.{name}"
            stored = encode(fld, value, where)
            if stored is None and fld.required:
                raise ValidationError(f"{where}: required, cannot be empty")
            if fld.type == "ref" and stored is not None:
                assert fld.to is not None
                stored = self.resolve_ref(fld.to, stored, where)
            elif fld.type == "lines" and stored is not None:
                for i, line in enumerate(stored, 1):
                    for sub in fld.fields:
                        if sub.type == "ref" and sub.name in line:
                            assert sub.to is not None
                            line[sub.name] = self.resolve_ref(
                                sub.to, line[sub.name], f"{where} line {i}, {sub.name}"
                            )
            values[name] = stored
        if creating:
            missing = [f.name for f in coll.fields.values() if f.required and f.name not in values]
            if missing:
                raise ValidationError(
                    f"{coll.name}: missing required field(s) {', '.join(missing)}"
                )
        return values

    def _partition_date(self, coll: Collection, fields: dict[str, Any]) -> dt.date | None:
        if coll.partition_field not in coll.fields:
            return None
        raw = fields.get(coll.partition_field)
        if raw is None:
            return None
        stored = encode(
            coll.fields[coll.partition_field],
            raw,
            f"{coll.name}.{coll.partition_field}",
        )
        return dt.date.fromisoformat(stored)


def _doc_name(coll: Collection, values: dict[str, Any]) -> str:
    if coll.partition is None:
        return coll.name
    date = values[coll.partition_field]
    return f"{coll.name}/{date[:7] if coll.partition == 'month' else date[:4]}"


def _check_user_writable(coll: Collection) -> None:
    """Raises UserError for a collection only Branchline writes."""
    if coll.system:
        raise UserError(
            f"{coll.name} is written by Branchline only (the gap journal); "
            "void a voucher with delete instead"
        )


def _nobody(coll: Collection) -> bool:
    return False
