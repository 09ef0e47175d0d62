"""End-of-run checks on real stores (node homes and a relay store file).

Each check reads the files only (it opens nodes through the public
``Node.open`` and SQLite read connections), returns a list of human-readable
problems (empty: the check holds) and never writes. They are meant for
quiescent stores (no process writing), after a run converged; the soak
(``harness.soak``) runs them, and a simulator can run the same ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from pycrdt import Doc, Map

from engine.node import Node
from engine.relay.pg_store import is_pg_url, parse_url
from engine.schema import parse_schema
from engine.store.conflict_index import ConflictIndex
from engine.store.node_store import STORE_FILE

#: At most this many problems are listed per check (the count is exact).
MAX_LISTED = 20


@dataclass(frozen=True)
class AckedWrite:
    """A write a caller was told succeeded: the writer's entry of the record
    (``"{record}|{node}"`` in document ``doc``) right after the call returned.
    ``hlc`` is the newest write timestamp in that entry."""

    node: str
    collection: str
    record: str
    doc: str
    hlc: int
    entry: dict[str, Any]


def entry_hlc(entry: Mapping[str, Any]) -> int:
    """The newest write timestamp of a record entry (0 when it has none)."""
    writes = entry.get("w")
    if not isinstance(writes, list):
        return 0
    return max((int(w[0]) for w in writes if isinstance(w, list) and w), default=0)


def _ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)


def records_digest(home: Path) -> tuple[str, int, int, int]:
    """(sha256 of every resolved record and record conflict, records, outbox
    rows, waiting records) of one home, read without opening a ``Node``."""
    conn = _ro(home / STORE_FILE)
    try:
        h = hashlib.sha256()
        records = 0
        for row in conn.execute(
            "SELECT collection, id, doc, key, deleted, created_hlc, created_node, "
            "updated_hlc, data, alias_of FROM records ORDER BY collection, id"
        ):
            h.update(orjson.dumps(list(row)))
            records += 1
        for row in conn.execute(
            "SELECT id, collection, record_id, kind, field, data FROM record_conflicts ORDER BY id"
        ):
            h.update(orjson.dumps(list(row)))
        pending = int(conn.execute("SELECT COUNT(*) FROM updates WHERE pending = 1").fetchone()[0])
        waiting = int(conn.execute("SELECT COUNT(*) FROM waiting").fetchone()[0])
        return h.hexdigest(), records, pending, waiting
    finally:
        conn.close()


def _records(home: Path) -> dict[tuple[str, str], tuple[Any, ...]]:
    conn = _ro(home / STORE_FILE)
    try:
        return {
            (str(r[0]), str(r[1])): tuple(r[2:])
            for r in conn.execute(
                "SELECT collection, id, doc, key, deleted, created_hlc, created_node, "
                "updated_hlc, data, alias_of FROM records"
            )
        }
    finally:
        conn.close()


def replicas_identical(homes: Mapping[str, Path]) -> list[str]:
    """Every home holds the same resolved records and lists the same
    conflicts (ids, kinds, values) and the same resolution journal."""
    problems: list[str] = []
    names = sorted(homes)
    if len(names) < 2:
        return problems
    first = names[0]
    base = _records(homes[first])
    views: dict[str, tuple[bytes, bytes]] = {}
    for name in names:
        with Node.open(homes[name]) as node:
            views[name] = (
                orjson.dumps(node.conflicts(), default=str, option=orjson.OPT_SORT_KEYS),
                orjson.dumps(
                    node.conflicts(resolved=True), default=str, option=orjson.OPT_SORT_KEYS
                ),
            )
    for name in names[1:]:
        other = _records(homes[name])
        missing = sorted(set(base) - set(other))
        extra = sorted(set(other) - set(base))
        differ = sorted(k for k in set(base) & set(other) if base[k] != other[k])
        for label, keys in (("missing", missing), ("extra", extra), ("different", differ)):
            if keys:
                shown = ", ".join(f"{c}/{i}" for c, i in keys[:5])
                problems.append(f"{name} vs {first}: {len(keys)} records {label} ({shown})")
        if views[name][0] != views[first][0]:
            problems.append(f"{name} vs {first}: open conflicts differ")
        if views[name][1] != views[first][1]:
            problems.append(f"{name} vs {first}: resolution journals differ")
    return problems


def _entries(home: Path, docs: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Per document, the raw Map of record entries (key -> JSON text)."""
    out: dict[str, dict[str, Any]] = {}
    with Node.open(home) as node:
        updates = node.export_updates(docs=docs)
    for doc, data in updates.items():
        ydoc: Doc[Any] = Doc()
        ydoc.apply_update(data)
        out[doc] = dict(ydoc.get("r", type=Map).to_py() or {})
    return out


def lost_writes(acked: Iterable[AckedWrite], homes: Mapping[str, Path]) -> list[str]:
    """Every acknowledged write is on every replica: the writer's entry of the
    record exists there, and is the acknowledged one or a later write of the
    same node (a newer timestamp). Returns one line per lost write (at most
    ``MAX_LISTED``, then a count)."""
    latest: dict[tuple[str, str], AckedWrite] = {}
    for w in acked:
        key = (w.node, w.record)
        if key not in latest or w.hlc >= latest[key].hlc:
            latest[key] = w
    docs = sorted({w.doc for w in latest.values()})
    problems: list[str] = []
    lost = 0
    for name, home in sorted(homes.items()):
        maps = _entries(home, docs)
        for (writer, record), w in sorted(latest.items()):
            raw = maps.get(w.doc, {}).get(f"{record}|{writer}")
            entry = orjson.loads(raw) if isinstance(raw, str) else None
            why = ""
            if not isinstance(entry, dict):
                why = "entry missing"
            elif entry_hlc(entry) < w.hlc:
                why = f"entry older ({entry_hlc(entry)} < {w.hlc})"
            elif entry_hlc(entry) == w.hlc and entry != w.entry:
                why = "entry differs at the same timestamp"
            if why:
                lost += 1
                if len(problems) < MAX_LISTED:
                    problems.append(f"{name}: write of {writer} to {w.collection}/{record}: {why}")
    if lost > len(problems):
        problems.append(f"... {lost} lost writes in all")
    return problems


def count_lost(problems: list[str]) -> int:
    """How many lost writes a ``lost_writes`` result reports."""
    if problems and problems[-1].startswith("... "):
        return int(problems[-1].split()[1])
    return len(problems)


def voucher_numbers_unique(homes: Mapping[str, Path]) -> list[str]:
    """No voucher number is used by two live vouchers of one book, on any home."""
    problems: list[str] = []
    for name, home in sorted(homes.items()):
        with Node.open(home) as node:
            books = [c.name for c in node.schema.collections.values() if c.is_voucher]
        conn = _ro(home / STORE_FILE)
        try:
            for book in books:
                for number, n in conn.execute(
                    "SELECT json_extract(data, '$.number') AS num, COUNT(*) FROM records "
                    "WHERE collection = ? AND deleted = 0 AND num IS NOT NULL "
                    "GROUP BY num HAVING COUNT(*) > 1",
                    (book,),
                ):
                    problems.append(f"{name}: {book} number {number!r} used {n} times")
        finally:
            conn.close()
    return problems[:MAX_LISTED]


def gap_journal_problems(node: Node, excused: Iterable[str] = ()) -> list[str]:
    """The replicated gap journal of an open ``node`` is complete: every
    deleted voucher of a numbered book has a ``void`` entry, and every entry
    names a record this node holds. ``excused``: record ids to pass over."""
    gaps = node.gaps()
    voided = {(g["collection"], g["voucher"]) for g in gaps if g["reason"] == "void"}
    skip = set(excused)
    problems = []
    for coll in node.schema.collections.values():
        if coll.series is None:
            continue
        rows = node.store.conn.execute(
            "SELECT id FROM records WHERE collection = ? AND deleted = 1", (coll.name,)
        )
        missing = [rid for (rid,) in rows if (coll.name, rid) not in voided and rid not in skip]
        if missing:
            problems.append(f"deleted {coll.name} vouchers without a void gap: {missing[:3]}")
    ids = {str(rid) for (rid,) in node.store.conn.execute("SELECT id FROM records")}
    strays = [g for g in gaps if g["voucher"] not in ids]
    if strays:
        problems.append(f"gap entries naming no voucher: {strays[:3]}")
    return problems


def gap_journals_complete(homes: Mapping[str, Path]) -> list[str]:
    """``gap_journal_problems`` of every home."""
    problems: list[str] = []
    for name, home in sorted(homes.items()):
        with Node.open(home) as node:
            problems += [f"{name}: {p}" for p in gap_journal_problems(node)]
    return problems[:MAX_LISTED]


def voucher_numbers_kept(
    issued: Mapping[str, tuple[str, bool]], homes: Mapping[str, Path]
) -> list[str]:
    """Every voucher numbered final by its series still carries that number
    (none changed after issue), every provisional one got a final number,
    and no number of a series is held by two vouchers, deleted ones included
    (none issued twice)."""
    problems: list[str] = []
    for name, home in sorted(homes.items()):
        conn = _ro(home / STORE_FILE)
        try:
            rows = conn.execute(
                "SELECT collection, id, key FROM records WHERE json_extract(data, '$.number') "
                "IS NOT NULL"
            ).fetchall()
        finally:
            conn.close()
        now = {str(rid): str(key) for _, rid, key in rows}
        for rid, (number, provisional) in sorted(issued.items()):
            held = now.get(rid)
            if held is None:
                continue
            if not provisional and held != number:
                problems.append(f"{name}: voucher {rid} was issued {number}, now numbered {held}")
            elif provisional and held == number:
                problems.append(f"{name}: voucher {rid} still has provisional number {number}")
        issued_numbers = Counter((c, k) for c, rid, k in rows if rid in issued)
        problems += [
            f"{name}: {c} number {k!r} held by {n} vouchers"
            for (c, k), n in sorted(issued_numbers.items())
            if n > 1
        ]
    return problems[:MAX_LISTED]


@contextlib.contextmanager
def _relay_sql(
    spec: Path | str,
) -> Iterator[tuple[Callable[[str, tuple[Any, ...]], list[Any]], str]]:
    """A read-only query function on a relay store (a SQLite file or a
    PostgreSQL URL; ``?`` marks parameters in both) and the name of the log's
    order column (``seq`` on SQLite, ``position`` on PostgreSQL)."""
    if not is_pg_url(str(spec)):
        conn = _ro(Path(spec))
        try:
            yield (lambda sql, args: conn.execute(sql, args).fetchall()), "seq"
        finally:
            conn.close()
        return
    import psycopg

    where = parse_url(str(spec))
    with psycopg.connect(where.conninfo) as pg:
        pg.read_only = True
        pg.execute(f'SET search_path TO "{where.schema}"')

        def query(sql: str, args: tuple[Any, ...]) -> list[Any]:
            return pg.execute(sql.replace("?", "%s"), args).fetchall()

        yield query, "position"


def relay_duplicates(spec: Path | str) -> list[str]:
    """The relay stored no update twice: no two log rows of a document hold
    the same bytes, and replaying a document's snapshot and log in order,
    every plain (not waiting) row changed the document. ``spec``: the relay
    store's file or PostgreSQL URL."""
    problems: list[str] = []
    with _relay_sql(spec) as (query, order):
        for dataset_id, doc, n in query(
            "SELECT dataset_id, doc, COUNT(*) - COUNT(DISTINCT data) FROM updates "
            "GROUP BY dataset_id, doc HAVING COUNT(*) > COUNT(DISTINCT data)",
            (),
        ):
            problems.append(f"dataset {dataset_id} document {doc}: {n} rows repeat another's bytes")
        docs = query("SELECT DISTINCT dataset_id, doc FROM updates", ())
        for dataset_id, doc in docs:
            ydoc: Doc[Any] = Doc()
            changes = [0]

            def changed(_event: Any, counter: list[int] = changes) -> None:
                counter[0] += 1

            snaps = query(
                "SELECT upto, data FROM snapshots WHERE dataset_id = ? AND doc = ?",
                (dataset_id, doc),
            )
            snap = snaps[0] if snaps else None
            if snap is not None:
                ydoc.apply_update(bytes(snap[1]))
            ydoc.observe(changed)
            upto = int(snap[0]) if snap is not None else 0
            for seq, data, waiting in query(
                f"SELECT {order}, data, waiting FROM updates WHERE dataset_id = ? AND doc = ? "
                f"AND ({order} > ? OR waiting) ORDER BY {order}",
                (dataset_id, doc, upto),
            ):
                before = changes[0]
                ydoc.apply_update(bytes(data))
                if not waiting and changes[0] == before:
                    problems.append(f"dataset {dataset_id} document {doc}: row {seq} added nothing")
                    if len(problems) >= MAX_LISTED:
                        return problems
    return problems


def relay_holds_everything(spec: Path | str, dataset: str, homes: Mapping[str, Path]) -> list[str]:
    """The relay's state vector of every document equals every home's
    (``spec``: the relay store's file or PostgreSQL URL)."""
    from engine.relay.stores import open_store

    problems: list[str] = []
    with contextlib.closing(open_store(spec)) as store:
        relay_docs = store.documents(dataset)
        relay_sv = {d: store.state_vector(dataset, d) for d in relay_docs}
    for name, home in sorted(homes.items()):
        with Node.open(home) as node:
            state = node.state()
        if sorted(state) != relay_docs:
            problems.append(f"{name}: documents differ from the relay's")
            continue
        for doc, sv in state.items():
            if _sv(sv) != _sv(relay_sv[doc]):
                problems.append(f"{name}: {doc} state differs from the relay's")
    return problems[:MAX_LISTED]


def _sv(data: bytes) -> dict[int, int]:
    """A Yjs v1 state vector (varuint count, then client/clock varuint pairs)
    as {client: clock}: its byte order is not canonical."""
    pos = 0

    def varuint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    out = {}
    for _ in range(varuint()):
        client = varuint()
        out[client] = varuint()
    return out


def integrity(paths: Iterable[Path]) -> list[str]:
    """``PRAGMA integrity_check`` answers ``ok`` for every SQLite file."""
    problems: list[str] = []
    for path in paths:
        conn = _ro(path)
        try:
            rows = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
        finally:
            conn.close()
        if rows != ["ok"]:
            problems.append(f"{path}: {'; '.join(rows[:5])}")
    return problems


def conflict_indexes_true(homes: Mapping[str, Path]) -> list[str]:
    """Every home's conflict index (engine.store.conflict_index) holds
    exactly what a rebuild from its records would."""
    problems: list[str] = []
    for name, home in sorted(homes.items()):
        conn = _ro(home / STORE_FILE)
        try:
            source = conn.execute("SELECT value FROM meta WHERE key = 'schema_source'").fetchone()
            index = ConflictIndex(parse_schema(str(source[0]), origin=f"{home} (stored schema)"))
            missing, extra = index.compare(conn)
        finally:
            conn.close()
        problems += [f"{name}: the conflict index lacks {row}" for row in sorted(missing)]
        problems += [f"{name}: the conflict index has a stale {row}" for row in sorted(extra)]
    return problems[:MAX_LISTED]
