"""The document log: per CRDT document a snapshot plus the update rows after
it (``updates``, ``snapshots``), the documents loaded from them, compaction,
and the Yjs client ids this home writes with (``clients``).

One ``DocLog`` per open store keeps at most ``MAX_LOADED_DOCS`` documents in
memory (least recently used are dropped and reloaded on demand). The relay's
log (``engine.relay.sqlite_store``) differs (documents per dataset, raw
waiting rows, a memory budget); what both share is the compaction rule,
``compaction_due``.
"""

from __future__ import annotations

import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

from ..crdt import RecordDoc, trim_heap
from ..crdt.split import iter_parts
from ..errors import UpdateError
from .txn import WriteTxn

MAX_LOADED_DOCS = 64
# A document's log is folded into a new snapshot once it holds COMPACT_MIN_ROWS
# rows and a quarter of the snapshot's size (re-encoding a large document costs
# about a second, so it must be rare), or COMPACT_MAX_ROWS rows in any case.
COMPACT_MIN_ROWS = 1000
COMPACT_MAX_ROWS = 20_000
COMPACT_RATIO = 0.25
TRIM_AFTER_BYTES = 4 << 20  # after loading this much, hand freed memory back
#: A snapshot is stored in parts of about this size (format 8).
SNAPSHOT_PART_BYTES = 4 << 20

Reading = Callable[[], AbstractContextManager[sqlite3.Connection]]


def compaction_due(
    tail: int,
    tail_bytes: int,
    base_bytes: int,
    *,
    min_rows: int = COMPACT_MIN_ROWS,
    ratio: float = COMPACT_RATIO,
    max_rows: int = COMPACT_MAX_ROWS,
) -> bool:
    """Whether a log of ``tail`` rows (``tail_bytes``) over a snapshot of
    ``base_bytes`` should be folded into a new snapshot."""
    return tail >= max_rows or (tail >= min_rows and tail_bytes >= ratio * base_bytes)


@dataclass
class Loaded:
    """A document in memory and where it stands in the log."""

    doc: RecordDoc
    applied: int  # highest update-log seq integrated into ``doc``
    snapshot: int  # ``upto`` of the snapshot it was loaded from
    tail: int  # log rows after the snapshot
    tail_bytes: int = 0
    base_bytes: int = 0  # size of the snapshot


@dataclass
class _Read:
    """What ``_rows`` read of a document: its snapshot's ``upto`` and size,
    the log rows after it, their bytes, and the last seq."""

    upto: int = 0
    base: int = 0
    rows: int = 0
    tail: int = 0
    last: int = 0


def _rows(conn: sqlite3.Connection, name: str, seen: _Read) -> Iterator[bytes]:
    """Document ``name``'s snapshot, then its log rows after it, in order;
    notes what it read in ``seen``."""
    snap = conn.execute("SELECT upto, data FROM snapshots WHERE doc = ?", (name,)).fetchone()
    if snap is not None:
        seen.upto = seen.last = int(snap[0])
        data: bytes = snap[1]
        del snap
        seen.base = len(data)
        yield data
        for (data,) in conn.execute(
            "SELECT data FROM snapshot_parts WHERE doc = ? ORDER BY part", (name,)
        ):
            seen.base += len(data)
            yield data
        del data
    for seq, data in conn.execute(
        "SELECT seq, data FROM updates WHERE doc = ? AND seq > ? ORDER BY seq", (name, seen.upto)
    ):
        seen.rows += 1
        seen.tail += len(data)
        seen.last = int(seq)
        yield data


class DocLog:
    """The log of one open store and the documents loaded from it.

    ``reading`` opens a consistent read snapshot (``NodeStore.reading``);
    ``wall_ms`` dates the rows written.
    """

    def __init__(
        self,
        reading: Reading,
        client_id: int,
        wall_ms: Callable[[], int],
    ) -> None:
        self._reading = reading
        self.client_id = client_id
        self._wall_ms = wall_ms
        self._docs: OrderedDict[str, Loaded] = OrderedDict()

    def clear(self) -> None:
        """Drop every loaded document (after a rollback: they may hold
        changes that did not commit)."""
        self._docs.clear()

    def documents(self) -> list[str]:
        """Names of the documents the log holds, sorted."""
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT doc FROM updates UNION SELECT doc FROM snapshots ORDER BY 1"
            ).fetchall()
        return [str(r[0]) for r in rows]

    def get(self, name: str) -> Loaded:
        """Document ``name``, loaded from its snapshot and log if needed (an
        unknown name is an empty document)."""
        loaded = self._docs.get(name)
        if loaded is not None:
            self._docs.move_to_end(name)
            return loaded
        with self._reading() as conn:
            seen = _Read()
            # Read as applied, one row at a time: a large document's bytes
            # are never all in memory beside it (tens of MB at the peak).
            doc = RecordDoc(name, self.client_id, _rows(conn, name, seen))
        loaded = Loaded(
            doc, seen.last, seen.upto, seen.rows, tail_bytes=seen.tail, base_bytes=seen.base
        )
        size = seen.base + seen.tail
        if size > TRIM_AFTER_BYTES:
            trim_heap()
        self._docs[name] = loaded
        while len(self._docs) > MAX_LOADED_DOCS:
            self._docs.popitem(last=False)
        return loaded

    def catch_up(self) -> None:
        """Apply to every loaded document what other processes logged."""
        for loaded in list(self._docs.values()):
            self._catch_up(loaded)

    def _catch_up(self, loaded: Loaded) -> None:
        with self._reading() as conn:
            # The snapshot's bytes only when it is newer: it may be tens of
            # megabytes, and this runs at every write after another's commit.
            snap = conn.execute(
                "SELECT upto, data FROM snapshots WHERE doc = ? AND upto > ?",
                (loaded.doc.name, loaded.applied),
            ).fetchone()
            if snap is not None:
                loaded.doc.apply(bytes(snap[1]))
                loaded.base_bytes = len(snap[1])
                for (part,) in conn.execute(
                    "SELECT data FROM snapshot_parts WHERE doc = ? ORDER BY part",
                    (loaded.doc.name,),
                ):
                    loaded.doc.apply(bytes(part))
                    loaded.base_bytes += len(part)
                loaded.snapshot = loaded.applied = int(snap[0])
                loaded.tail = loaded.tail_bytes = 0
            for seq, data in conn.execute(
                "SELECT seq, data FROM updates WHERE doc = ? AND seq > ? ORDER BY seq",
                (loaded.doc.name, loaded.applied),
            ):
                loaded.doc.apply(bytes(data))
                loaded.applied = int(seq)
                loaded.tail += 1
                loaded.tail_bytes += len(data)
        loaded.doc.release()

    def append(
        self,
        txn: WriteTxn,
        loaded: Loaded,
        data: bytes,
        origin: str,
        record: str | None = None,
        pending: bool = False,
    ) -> int:
        """Log an update ``loaded`` has integrated (a local one goes into the
        outbox, a remote one with ``pending``); compacts when due. Returns its seq."""
        cur = txn.execute(
            "INSERT INTO updates (doc, data, origin, pending, record, at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                loaded.doc.name,
                data,
                origin,
                int(pending or origin == "local"),
                record,
                self._wall_ms(),
            ),
        )
        assert cur.lastrowid is not None
        loaded.applied = cur.lastrowid
        loaded.tail += 1
        loaded.tail_bytes += len(data)
        if compaction_due(loaded.tail, loaded.tail_bytes, loaded.base_bytes):
            self.compact(txn, loaded)
        return loaded.applied

    def compact(self, txn: WriteTxn, loaded: Loaded) -> int:
        """Fold ``loaded``'s log into a new snapshot and delete the rows not
        in the outbox. Returns the rows deleted."""
        upto = loaded.applied
        if upto <= loaded.snapshot:
            return 0
        snapshot = loaded.doc.diff()
        self._store_snapshot(txn, loaded.doc.name, upto, snapshot)
        cur = txn.execute(
            "DELETE FROM updates WHERE doc = ? AND seq <= ? AND pending = 0",
            (loaded.doc.name, upto),
        )
        loaded.snapshot = upto
        loaded.tail = loaded.tail_bytes = 0
        loaded.base_bytes = len(snapshot)
        return int(cur.rowcount)

    def _store_snapshot(self, txn: WriteTxn, name: str, upto: int, snapshot: bytes) -> None:
        """``snapshot`` as ``name``'s snapshot, in parts of about
        ``SNAPSHOT_PART_BYTES`` (a load then holds one part at a time)."""
        txn.execute("DELETE FROM snapshot_parts WHERE doc = ?", (name,))
        try:
            for i, part in enumerate(iter_parts(snapshot, SNAPSHOT_PART_BYTES)):
                if i == 0:
                    self._store_part0(txn, name, upto, part)
                else:
                    txn.execute("INSERT INTO snapshot_parts VALUES (?, ?, ?)", (name, i, part))
        except UpdateError:
            # Bytes the splitter does not read (pycrdt wrote them, so they
            # are an update): kept whole, as before parts existed.
            txn.execute("DELETE FROM snapshot_parts WHERE doc = ?", (name,))
            self._store_part0(txn, name, upto, snapshot)

    def _store_part0(self, txn: WriteTxn, name: str, upto: int, data: bytes) -> None:
        txn.execute(
            "INSERT INTO snapshots (doc, upto, data, at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (doc) DO UPDATE SET upto = excluded.upto, data = excluded.data, "
            "at = excluded.at",
            (name, upto, data, self._wall_ms()),
        )

    # -- clients --------------------------------------------------------------

    def clients(self) -> set[int]:
        """The Yjs client ids this home's local updates were written with."""
        with self._reading() as conn:
            return {int(c) for (c,) in conn.execute("SELECT client FROM clients")}

    def note_clients(self, txn: WriteTxn, clients: list[int]) -> None:
        """Add ``clients`` to this home's writers (known ones are kept)."""
        at = self._wall_ms()
        txn.executemany(
            "INSERT OR IGNORE INTO clients (client, first_at) VALUES (?, ?)",
            [(c, at) for c in clients],
        )
