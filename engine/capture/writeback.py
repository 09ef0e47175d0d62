"""Record changes written back into a captured table (DESIGN §8's adapter
contract, in the write transaction of the change), with the suppress flag
on so the triggers do not capture them again.

Which row shows a record: the one ``capture_links`` names (checked to still
hold the key it was written under, so a ``VACUUM`` that renumbered rowids
cannot mislead it), else the row holding the record's key, else a new row.
A row with queued changes of the app is left alone: it holds what the app
wrote after the state the node has, and the drain will write that. A key
that two live records hold (a ``duplicate_key`` conflict) is shown by the
earliest created, as everywhere else, until the conflict is resolved.
Columns of the table that are not fields (the app's own) are never touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from ..plugins import RecordChange
from ..schema import Collection
from ..store import capture as sql
from ..store import records as rec
from .convert import to_columns
from .spec import CaptureSpec

#: Code of a record that could not be written into its table (a constraint
#: of the app's table refused it): listed with the quarantined changes.
WRITEBACK = "writeback"


class WriteBack:
    """Writes the changes of one collection into its captured table."""

    def __init__(self, spec: CaptureSpec, coll: Collection) -> None:
        self.spec = spec
        self.coll = coll
        self.name = f"capture:{spec.table}"
        self.collections = frozenset({coll.name})

    def tables(self) -> Sequence[str]:
        return ()  # the app owns its table

    def setup(self, conn: Any) -> None:
        return None

    def drop(self, conn: Any) -> None:
        return None

    def apply(self, conn: Any, changes: Sequence[RecordChange]) -> None:
        sql.set_suppress(conn, True)
        try:
            for change in changes:
                self.write(conn, change)
        finally:
            sql.set_suppress(conn, False)

    def rebuild(self, conn: Any, records: Iterable[RecordChange]) -> None:
        """Show every live record in the table (rows with queued changes and
        the app's other rows stay as they are)."""
        self.apply(conn, list(records))

    def write(self, conn: Any, change: RecordChange) -> None:
        """Show ``change`` in the table, or remove its row (deleted, merged
        into another, or hidden by an earlier record holding its key)."""
        spec, coll = self.spec, self.coll
        rid = change.id
        sql.undefer(conn, spec.table, rid)
        linked = sql.linked_row(conn, spec.table, rid)
        if linked is not None and sql.row_pending(conn, spec.table, linked[0]):
            # Its row changed again since (a rename, say): that change comes
            # first, this record is written after it (``settle``).
            sql.defer(conn, spec.table, rid)
            return
        key = change.values.get(coll.key)
        row = self._row_of(conn, rid, key)
        gone = change.kind == "deleted" or change.alias_of is not None
        hidden = False
        if not gone and key is not None:
            owner = rec.lookup(conn, coll, str(key), by_id=False)
            hidden = owner is not None and owner[0] != rid
        if row is None and key is not None and not (gone or hidden):
            row = sql.row_with_key(conn, spec, key)
        if row is not None and sql.row_pending(conn, spec.table, row):
            sql.defer(conn, spec.table, rid)
            return
        if gone or hidden:
            if row is not None and sql.record_of_row(conn, spec.table, row) in (rid, None):
                sql.delete_row(conn, spec, row)
            sql.unlink(conn, spec.table, rid)
            if key is not None:
                self._show_owner(conn, key, rid)
            if linked is not None and linked[1] is not None and linked[1] != key:
                self._show_owner(conn, linked[1], rid)  # a duplicate of its old key shows now
            return
        if key is not None:
            # Another row holding the key shows a record that no longer may.
            other = sql.row_with_key(conn, spec, key)
            if other is not None and other != row:
                if sql.row_pending(conn, spec.table, other):
                    sql.defer(conn, spec.table, rid)
                    return
                shown = sql.record_of_row(conn, spec.table, other)
                sql.delete_row(conn, spec, other)
                if shown is not None:
                    sql.unlink(conn, spec.table, shown)
        columns = to_columns(conn, coll, spec, change.values)
        try:
            row = sql.write_row(conn, spec, row, columns)
        except sql.RowRefused as exc:
            # The app's own constraint (a UNIQUE column, a CHECK): the record
            # stays replicated; the person sees why its row could not be written.
            self._failed(conn, change, row, str(exc))
            return
        sql.link(conn, spec.table, rid, row, columns[spec.key])
        sql.clear_writeback_failure(conn, spec.table, rid)
        if linked is not None and linked[1] is not None and linked[1] != columns[spec.key]:
            self._show_owner(conn, linked[1], rid)  # a duplicate of its old key shows now

    def _row_of(self, conn: Any, rid: str, key: Any) -> int | None:
        """The row showing record ``rid`` (whose key is now ``key``): its
        linked row while that holds the key it was shown with, or the new
        one (the app renamed it), else the row holding the linked key."""
        linked = sql.linked_row(conn, self.spec.table, rid)
        if linked is None:
            return None
        row, shown = linked
        if sql.row_holds(conn, self.spec, row, shown) or (
            key is not None and sql.row_holds(conn, self.spec, row, key)
        ):
            return row
        return sql.row_with_key(conn, self.spec, shown) if shown is not None else None

    def settle(self, conn: Any) -> None:
        """Write the records that waited for their row's queued changes."""
        for rid in sql.deferred(conn, self.spec.table):
            self.rewrite(conn, rid)

    def rewrite(self, conn: Any, rid: str) -> None:
        """Show record ``rid`` as it is now (suppress flag on)."""
        change = self._current(conn, rid)
        if change is None:
            sql.undefer(conn, self.spec.table, rid)
            return
        self.apply(conn, [change])

    def _current(self, conn: Any, rid: str) -> RecordChange | None:
        row = rec.row_of(conn, self.coll.name, rid)
        if row is None:
            return None
        live = rec.live_row(conn, self.coll.name, rid)
        if live is None:
            values = orjson.loads(rec.stored_data(conn, self.coll.name, rid) or "{}")
            return RecordChange("deleted", self.coll.name, rid, row.doc, values, 0, "", 0)
        return RecordChange(
            "updated", self.coll.name, rid, row.doc, orjson.loads(live[1]), 0, "", 0, (), live[2]
        )

    def _show_owner(self, conn: Any, key: Any, gone: str) -> None:
        """A record left its key (or lost it to an earlier one): the record
        holding it now, if any, is shown instead."""
        owner = rec.lookup(conn, self.coll, str(key), by_id=False)
        if owner is None or owner[0] == gone:
            return
        change = self._current(conn, owner[0])
        if change is not None:
            self.write(conn, change)

    def _failed(self, conn: Any, change: RecordChange, row: int | None, why: str) -> None:
        # A write-back failure names its record where a change names its old key.
        key = change.values.get(self.coll.key)
        values = to_columns(conn, self.coll, self.spec, change.values)
        sql.quarantine(
            conn,
            sql.Change(0, self.spec.table, WRITEBACK, row or 0, change.id, key, None, values, 0),
            WRITEBACK,
            f"{self.coll.name} {change.id} could not be written into {self.spec.table}: {why}",
        )
