"""Turning an app's queued SQL changes into replicated writes.

``Capture`` holds a node's captured tables. ``drain`` takes queued changes
in commit order, each in a savepoint of the node's write transaction: the
change leaves the queue and becomes a ``put``, ``post_voucher`` or
``delete`` (typed values, the schema's validation), or, when the write is
refused, goes whole into ``capture_failures`` with the reason. Either way it
commits with the write transaction, so a crash leaves the change queued or
written, never both, never neither.

Every write transaction of the node drains the whole queue before anything
else (``Replica.write``), so an app's change committed before a remote
update is imported is written before it: two nodes editing one row
concurrently end as the same conflict as any other edit, and a change
written after the import has seen it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import CaptureNotFound, DuplicateKey, UserError
from ..schema import Collection, Schema
from ..store import capture as sql
from ..store import records as rec
from ..store.records import ref_paths
from ..values import encode
from .convert import to_fields
from .spec import CaptureSpec, collection_of
from .writeback import WRITEBACK, WriteBack

if TYPE_CHECKING:
    from ..writes import Writer

#: Queued changes drained per batch (``Node.drain_captured``): bounds how
#: long one drain transaction holds the store (and the app's next write).
DRAIN_BATCH = 500


@dataclass(frozen=True)
class Drained:
    """What a drain did: changes written, and changes quarantined."""

    written: int = 0
    quarantined: int = 0

    @property
    def changes(self) -> int:
        return self.written + self.quarantined


class Capture:
    """The captured tables of one open node."""

    def __init__(self, schema: Schema, specs: dict[str, CaptureSpec]) -> None:
        self.specs = specs
        self.collections: dict[str, Collection] = {
            t: collection_of(schema, s) for t, s in specs.items()
        }
        self.writebacks = [WriteBack(s, self.collections[t]) for t, s in specs.items()]
        # Tables whose records refer to others: their inserts look those up.
        self._refers = {t: bool(ref_paths(c)) for t, c in self.collections.items()}

    def drain(self, w: Writer, limit: int | None = None) -> Drained:
        """Write queued changes (all, or the oldest ``limit``) inside ``w``'s
        transaction. Raises only what the store raises."""
        conn = w.txn.conn
        written = quarantined = 0
        while limit is None or written + quarantined < limit:
            room = DRAIN_BATCH if limit is None else min(DRAIN_BATCH, limit - written - quarantined)
            batch = sql.head(conn, room)
            if not batch:
                break
            seen = _Seen()
            for change in batch:
                spec = self.specs.get(change.table)
                plain = spec is not None and self._plain_insert(spec, change, seen)
                if not plain:
                    # It may read records written before it in this batch;
                    # and it is still queued, as the write-back expects.
                    w.flush()
                    seen.clear()
                sql.take(conn, change.seq)
                if spec is None:
                    continue  # its table is no longer captured
                try:
                    with w.savepoint(), w.deferring(plain):
                        self._write(w, spec, change)
                except UserError as exc:
                    sql.quarantine(conn, change, _code(exc), str(exc), w.now_ms())
                    quarantined += 1
                else:
                    sql.clear_failures(conn, change.table, change.row)
                    written += 1
            w.flush()
        for writeback in self.writebacks:
            writeback.settle(conn)
        return Drained(written, quarantined)

    def retry(self, w: Writer, ids: Iterable[int] | None) -> int:
        """Queue quarantined changes again (all when ``ids`` is None), and
        write again the records that could not be written into their table.
        Raises CaptureNotFound (nothing done) for an unknown id."""
        conn = w.txn.conn
        known = {f.id: f for f in sql.failures(conn)}
        wanted = set(known) if ids is None else set(ids)
        missing = sorted(wanted - set(known))
        if missing:
            raise CaptureNotFound(
                f"no quarantined change with id {', '.join(map(str, missing))}; "
                "'branchline failures' lists them"
            )
        changes = [i for i in wanted if known[i].change.op != WRITEBACK]
        done = sql.requeue(conn, changes)
        for fid in sorted(wanted - set(changes)):
            failure = known[fid]
            sql.drop_failure(conn, fid)
            self._rewrite(w, failure.change.table, str(failure.change.old_key))
            done += 1
        return done

    # -- internals -------------------------------------------------------------

    def _plain_insert(self, spec: CaptureSpec, change: sql.Change, seen: _Seen) -> bool:
        """Whether ``change`` inserts a catalog row that reads no record
        written earlier in the batch (its key and row are new to the batch):
        then its record is re-resolved with the others at the batch's end
        (``Writer.deferring``). Notes its key and row in ``seen``."""
        coll = self.collections[spec.table]
        if change.op != "insert" or coll.is_voucher or self._refers[spec.table]:
            return False
        try:
            stored = self._stored_key(spec, coll, change.new_key)
        except UserError:
            return False  # refused by the write, in its own savepoint
        if stored is None:
            return False
        key = (coll.name, stored)
        row = (spec.table, change.row)
        if key in seen.keys or row in seen.rows:
            return False
        seen.keys.add(key)
        seen.rows.add(row)
        return True

    def _write(self, w: Writer, spec: CaptureSpec, change: sql.Change) -> None:
        coll = self.collections[spec.table]
        conn = w.txn.conn
        where = f"{spec.table} row {change.row}"
        if change.op == "delete":
            rid = self._record_of(w, spec, coll, change.row, change.old_key)
            if rid is not None and rec.lookup(conn, coll, rid) is not None:
                w.delete(coll, rid)
            if rid is not None:
                sql.unlink(conn, spec.table, rid)
            return
        new = change.new or {}
        if change.op == "update":
            rid = self._record_of(w, spec, coll, change.row, change.old_key)
            if rid is not None:
                old = change.old or {}
                edited = {f: v for f, v in new.items() if f not in old or old[f] != v}
                if not edited:
                    return
                # The key it was last shown with stays: the write-back sees a rename.
                shown = sql.linked_row(conn, spec.table, rid)
                if shown is None or shown[0] != change.row:
                    sql.link(conn, spec.table, rid, change.row, change.old_key)
                w.put(coll, {"id": rid, **to_fields(coll, edited, where)})
                return
            # A row whose insert never became a record (it was quarantined):
            # this change brings the whole row, so it is written as one.
        fields = to_fields(coll, new, where)
        key = fields.get(coll.key)
        existing = self._by_key(w, coll, key, where) if key is not None else None
        if existing is not None:
            shown = sql.linked_row(conn, spec.table, existing)
            if shown and shown[0] != change.row and sql.row_exists(conn, spec, shown[0]):
                raise_duplicate(coll, key, existing, spec.table, shown[0])
            sql.link(conn, spec.table, existing, change.row, change.new_key)
            fields.pop(coll.key, None)
            w.put(coll, {"id": existing, **fields})
            return
        rid = w.new_id()
        sql.link(conn, spec.table, rid, change.row, change.new_key)
        if coll.is_voucher:
            if key is None:
                fields.pop(coll.key, None)
            w.post_voucher(coll, fields, rid=rid)
        else:
            w.create(coll, fields, rid)

    def _record_of(
        self, w: Writer, spec: CaptureSpec, coll: Collection, row: int, key: Any
    ) -> str | None:
        """The record row ``row`` shows: its link when it still holds ``key``,
        else the live record with that key."""
        conn = w.txn.conn
        rid = sql.record_of_row(conn, spec.table, row)
        if rid is not None:
            linked = sql.linked_row(conn, spec.table, rid)
            if linked is not None and linked[1] == key:
                return rid
        if key is None:
            return None
        try:
            stored = self._stored_key(spec, coll, key)
        except UserError:
            return None
        found = w.lookup(coll, stored, by_id=False) if stored is not None else None
        return found[0] if found else None

    @staticmethod
    def _stored_key(spec: CaptureSpec, coll: Collection, raw: Any) -> str | None:
        """The key as records hold it for a key column value ``raw`` (None
        for none). Raises UserError for a value the key field refuses."""
        if raw is None:
            return None
        value = to_fields(coll, {coll.key: raw}, spec.table)[coll.key]
        return None if value is None else str(encode(coll.fields[coll.key], value, coll.key))

    @staticmethod
    def _by_key(w: Writer, coll: Collection, key: Any, where: str) -> str | None:
        stored = encode(coll.fields[coll.key], key, f"{where}.{coll.key}")
        found = w.lookup(coll, str(stored), by_id=False)
        return found[0] if found else None

    def _rewrite(self, w: Writer, table: str, rid: str) -> None:
        for writeback in self.writebacks:
            if writeback.spec.table == table:
                writeback.rewrite(w.txn.conn, rid)


@dataclass
class _Seen:
    """Keys and rows of the plain inserts of a batch since its last flush."""

    keys: set[tuple[str, str]] = field(default_factory=set)
    rows: set[tuple[str, int]] = field(default_factory=set)

    def clear(self) -> None:
        self.keys.clear()
        self.rows.clear()


def raise_duplicate(coll: Collection, key: Any, rid: str, table: str, row: int) -> None:
    raise DuplicateKey(
        f"{coll.name}: {coll.key} {key!r} is already record {rid}, shown by {table} row {row}"
    )


def _code(exc: UserError) -> str:
    """A short code for a refused change: the error class, in snake case."""
    name = type(exc).__name__
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")
