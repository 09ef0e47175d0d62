"""Listing conflicts and the resolution journal from a node's resolved tables.

Every kind is derived from replicated state (the ``records``,
``record_conflicts`` and ``resolutions`` tables are functions of the CRDT
documents), so two nodes holding the same updates list the same conflicts
with the same ids:

* ``concurrent_edit`` and ``edit_delete``: inside one record (engine.merge);
* ``duplicate_key``: two live records with one unique key; the earliest
  created (hybrid clock, then node id) is the one references resolve to;
* ``dangling_reference``: a live record refers to a record that is deleted,
  or missing after a full sync (until then the referring record waits).

One kind is this node's alone, since only the writer learns of it:

* ``locked_period``: the relay refused this node's changes to a document
  whose period it has locked (an upload failure; the changes wait in the
  outbox until the period is unlocked and ``branchline retry``).

Pure reading: nothing here writes.
"""

from __future__ import annotations

import hashlib
import sqlite3
from typing import Any

import orjson

from .schema import Collection, Schema
from .store.conflict_index import dangling, shared_keys

Conflict = dict[str, Any]


def conflict_digest(*parts: str) -> str:
    """A stable 20-hex-digit id from the parts that identify a conflict."""
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def list_conflicts(conn: sqlite3.Connection, schema: Schema, node: str = "") -> list[Conflict]:
    """Every open conflict, sorted by id (see the module docstring); ``node``
    names this node in ``locked_period`` conflicts."""
    out = _record_conflicts(conn)
    for coll in schema.collections.values():
        out += _duplicates(conn, coll)
        out += _dangling(conn, coll)
    out += _locked(conn, node)
    out.sort(key=lambda c: c["id"])
    return out


def list_resolutions(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """The journal of resolutions (automatic and by hand), oldest first."""
    rows = conn.execute("SELECT data FROM resolutions ORDER BY at, id").fetchall()
    return [orjson.loads(r[0]) for r in rows]


def _record_conflicts(conn: sqlite3.Connection) -> list[Conflict]:
    out = []
    for cid, coll, rid, kind, fld, data in conn.execute(
        "SELECT id, collection, record_id, kind, field, data FROM record_conflicts"
    ):
        competitors = orjson.loads(data)
        for i, c in enumerate(competitors):
            c["in_force"] = i == 0
        if kind == "concurrent_edit":
            text = (
                f"'{fld}' was changed at the same time at {_nodes(competitors)}; "
                f"the later edit (from {competitors[0]['node']}) is in force, the other "
                "value is kept until someone resolves it (resolve --keep NODE or VALUE)"
            )
        else:
            text = (
                f"the record was deleted at {competitors[0]['node']} while "
                f"{_nodes(competitors[1:])} edited it without seeing the delete "
                "(resolve --keep delete or --keep edit)"
            )
        out.append(
            {
                "id": cid,
                "kind": kind,
                "collection": coll,
                "records": [rid],
                "field": fld,
                "values": competitors,
                "explanation": text,
            }
        )
    return out


def duplicate_keys(conn: sqlite3.Connection, coll: Collection) -> list[str]:
    """Keys shared by several live records of ``coll`` (aliases left out)."""
    return shared_keys(conn, coll.name)


def _duplicates(conn: sqlite3.Connection, coll: Collection) -> list[Conflict]:
    out = []
    for key in duplicate_keys(conn, coll):
        rows = duplicate_group(conn, coll, key)
        ids = [r[0] for r in rows]
        values = [
            {"node": n, "hlc": h, "value": rid, "in_force": i == 0}
            for i, (rid, n, h) in enumerate(rows)
        ]
        how = (
            "the later voucher gets a fresh number at the node that booked it"
            if coll.on_duplicate == "renumber"
            else "resolve --rename NEW_CODE or --merge-into RECORD_ID"
        )
        out.append(
            {
                "id": conflict_digest("duplicate_key", coll.name, key, *sorted(ids)),
                "kind": "duplicate_key",
                "collection": coll.name,
                "records": ids,
                "field": coll.key,
                "key": key,
                "values": values,
                "explanation": (
                    f"{len(ids)} live {coll.name} records share {coll.key} '{key}' "
                    f"(created at {_nodes(values)}); the earliest created is used "
                    f"for references; {how}"
                ),
            }
        )
    return out


def duplicate_group(
    conn: sqlite3.Connection, coll: Collection, key: str
) -> list[tuple[str, str, int]]:
    """(id, created node, created hlc) of the live records sharing ``key``,
    winner (earliest created) first."""
    rows = conn.execute(
        "SELECT id, created_node, created_hlc FROM records INDEXED BY records_key "
        "WHERE collection = ? AND key = ? AND deleted = 0 AND alias_of IS NULL "
        "ORDER BY created_hlc, created_node",
        (coll.name, key),
    ).fetchall()
    return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]


def _dangling(conn: sqlite3.Connection, coll: Collection) -> list[Conflict]:
    return [_dangling_conflict(coll, *row) for row in dangling(conn, coll.name)]


def _dangling_conflict(
    coll: Collection, rid: str, node: str, field: str, target: str, tid: str, state: str
) -> Conflict:
    return {
        "id": conflict_digest("dangling_reference", coll.name, rid, field, tid),
        "kind": "dangling_reference",
        "collection": coll.name,
        "records": [rid],
        "field": field,
        "target": {"collection": target, "id": tid, "state": state},
        "values": [{"node": node, "hlc": None, "value": tid, "in_force": True}],
        "explanation": (
            f"{coll.name} {rid} ({field}) refers to {target} {tid}, which "
            + (
                "was deleted; restore it or point the record at another one"
                if state == "deleted"
                else "did not arrive by the end of a full sync; check the node that made it"
            )
        ),
    }


def _locked(conn: sqlite3.Connection, node: str) -> list[Conflict]:
    out = []
    for fid, doc, records, reason, first_at in conn.execute(
        "SELECT id, doc, record, reason, first_at FROM sync_failures "
        "WHERE direction = 'upload' AND code = 'locked_period'"
    ):
        ids = orjson.loads(records) if records else []
        message = str(reason).partition(": ")[2]
        out.append(
            {
                "id": conflict_digest("locked_period", node, str(doc), str(fid), str(first_at)),
                "kind": "locked_period",
                "collection": str(doc).partition("/")[0],
                "records": ids,
                "field": "",
                "document": doc,
                "failure": int(fid),
                "values": [{"node": node, "hlc": None, "value": message, "in_force": True}],
                "explanation": (
                    f"the relay refused this node's changes to {doc}: {message}; they wait in "
                    "the outbox: book a correction in an open period, or have the period "
                    f"unlocked and run 'branchline retry {fid}'"
                ),
            }
        )
    return out


def _nodes(values: list[dict[str, Any]]) -> str:
    names = sorted({v["node"] for v in values})
    return " and ".join(names)
