"""Resolving conflicts with ordinary replicated writes, and journalling them.

A resolution is one write by the resolving node that has seen every
competing write, so the merge core (engine.merge) no longer finds a
conflict, on any node, once the write arrives. Each write also appends an
entry to the record's ``_journal`` (what, when, which node, old -> new),
which replicates with the record: every node lists the same journal.

* ``concurrent_edit``: ``keep`` a competitor's node name, ``in_force``, or a
  literal value for the field;
* ``edit_delete``: ``keep`` ``delete`` (or the deleting node) or ``edit``
  (or an editing node), which restores the record with the edits;
* ``duplicate_key``: ``rename`` the loser (or ``record``) to a new key;
  ``merge_into`` a record of the group, which makes the others aliases of
  it (references to them resolve to it; nothing is deleted); or
  ``renumber`` the losing vouchers from this node's series.

Two nodes resolving one conflict at once both write; their writes are
concurrent, so the usual rule (later hybrid clock wins) still gives every
node the same answer, and differing choices show as a new conflict.

Automatic policy (schema ``on_duplicate = "renumber"``): after importing,
a node renumbers the losing vouchers *it created*, and only those, so two
nodes never renumber the same voucher.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

import orjson

from . import series as series_mod
from .conflicts import (
    Conflict,
    conflict_digest,
    duplicate_group,
    duplicate_keys,
    list_conflicts,
)
from .errors import ConflictNotFound, UserError, ValidationError
from .merge import ALIAS, DELETED, JOURNAL
from .schema import Collection
from .store import WriteTxn
from .values import encode

if TYPE_CHECKING:
    from .node import Node

JOURNAL_CAP = 16  # entries one node keeps per record; older ones are dropped
RESOLVABLE = ("concurrent_edit", "edit_delete", "duplicate_key")


def resolve(
    node: Node,
    conflict_id: str,
    *,
    keep: Any = None,
    rename: str | None = None,
    merge_into: str | None = None,
    renumber: bool = False,
    record: str | None = None,
) -> dict[str, Any]:
    """Resolve one open conflict (see the module docstring); returns the
    journal entry written. Raises ConflictNotFound, UserError."""
    choices = [keep is not None, rename is not None, merge_into is not None, renumber]
    if sum(choices) != 1:
        raise UserError("choose exactly one of keep, rename, merge_into, renumber")
    with node._write() as txn:
        found = [
            c for c in list_conflicts(txn.conn, node.schema, node.node_id) if c["id"] == conflict_id
        ]
        if not found:
            raise ConflictNotFound(
                f"no open conflict {conflict_id!r}; list them with 'branchline conflicts'"
            )
        conflict = found[0]
        kind = conflict["kind"]
        coll = node.collection(conflict["collection"])
        if kind not in RESOLVABLE:
            raise UserError(
                f"a {kind} conflict is resolved by fixing the data: {conflict['explanation']}"
            )
        if kind == "duplicate_key":
            if keep is not None:
                raise UserError("a duplicate_key conflict needs rename, merge_into or renumber")
            if rename is not None:
                return _rename(node, txn, coll, conflict, rename, record)
            if merge_into is not None:
                return _merge_into(node, txn, coll, conflict, merge_into)
            return _renumber_losers(node, txn, coll, conflict, record, auto=False)[0]
        if keep is None:
            raise UserError(f"a {kind} conflict is resolved with keep (a node name or a value)")
        if kind == "concurrent_edit":
            return _keep_value(node, txn, coll, conflict, keep)
        return _keep_side(node, txn, coll, conflict, keep)


def renumber_own_duplicates(
    node: Node, txn: WriteTxn, collections: set[str]
) -> list[dict[str, Any]]:
    """Apply ``on_duplicate = "renumber"``: give fresh numbers to the losing
    vouchers this node created, in ``collections``. Inside the caller's
    write transaction; returns the journal entries."""
    done: list[dict[str, Any]] = []
    for name in sorted(collections):
        coll = node.schema.collections[name]
        if coll.on_duplicate != "renumber":
            continue
        for key in duplicate_keys(txn.conn, coll):
            group = duplicate_group(txn.conn, coll, key)
            if any(n == node.node_id for _, n, _ in group[1:]):
                conflict = {
                    "id": _group_id(coll, key, group),
                    "kind": "duplicate_key",
                    "records": [g[0] for g in group],
                    "key": key,
                }
                done += _renumber_losers(node, txn, coll, conflict, None, auto=True)
    return done


def _group_id(coll: Collection, key: str, group: list[tuple[str, str, int]]) -> str:
    return conflict_digest("duplicate_key", coll.name, key, *sorted(g[0] for g in group))


def _keep_value(
    node: Node, txn: WriteTxn, coll: Collection, conflict: Conflict, keep: Any
) -> dict[str, Any]:
    field = conflict["field"]
    values = conflict["values"]
    by_node = {v["node"]: v["value"] for v in values}
    if keep == "in_force":
        value = values[0]["value"]
    elif isinstance(keep, str) and keep in by_node:
        value = by_node[keep]
    elif field == ALIAS:
        value = keep
    else:
        fld = coll.fields[field]
        raw = keep
        if isinstance(keep, str) and fld.type in ("int", "bool", "lines"):
            try:
                raw = orjson.loads(keep)
            except orjson.JSONDecodeError:
                raise ValidationError(
                    f"{coll.name}.{field}: {keep!r} is neither a node of this conflict "
                    f"({', '.join(sorted(by_node))}) nor a valid {fld.type} value"
                ) from None
        value = encode(fld, raw, f"{coll.name}.{field}")
        if fld.type == "ref" and value is not None:
            value = node._resolve_ref(txn, fld.to or "", value, f"{coll.name}.{field}")
    rid = conflict["records"][0]
    old = values[0]["value"]
    return _write(node, txn, coll, rid, {field: value}, conflict, "keep", old, value, False)


def _keep_side(
    node: Node, txn: WriteTxn, coll: Collection, conflict: Conflict, keep: Any
) -> dict[str, Any]:
    deleter = conflict["values"][0]["node"]
    editors = {v["node"] for v in conflict["values"][1:]}
    if keep in ("delete", deleter):
        deleted = True
    elif keep in ("edit", "restore") or keep in editors:
        deleted = False
    else:
        raise UserError(
            f"keep 'delete' (or {deleter}) or 'edit' (or {', '.join(sorted(editors))}), "
            f"not {keep!r}"
        )
    rid = conflict["records"][0]
    action = "keep_delete" if deleted else "keep_edit"
    return _write(node, txn, coll, rid, {DELETED: deleted}, conflict, action, True, deleted, False)


def _rename(
    node: Node,
    txn: WriteTxn,
    coll: Collection,
    conflict: Conflict,
    new_key: str,
    record: str | None,
) -> dict[str, Any]:
    ids = conflict["records"]
    rid = _loser(ids, record)
    stored = encode(coll.fields[coll.key], new_key, f"{coll.name}.{coll.key}")
    if node._lookup(txn, coll, stored, by_id=False) is not None:
        raise UserError(f"{coll.name}: {coll.key} {new_key!r} is taken by a live record")
    return _write(
        node,
        txn,
        coll,
        rid,
        {coll.key: stored},
        conflict,
        "rename",
        conflict["key"],
        stored,
        False,
    )


def _merge_into(
    node: Node, txn: WriteTxn, coll: Collection, conflict: Conflict, winner: str
) -> dict[str, Any]:
    ids = conflict["records"]
    if winner not in ids:
        raise UserError(f"merge into one of the conflict's records: {', '.join(ids)}")
    entry: dict[str, Any] = {}
    for rid in ids:
        if rid != winner:
            entry = _write(
                node, txn, coll, rid, {ALIAS: winner}, conflict, "merge_into", rid, winner, False
            )
    return entry


def _renumber_losers(
    node: Node,
    txn: WriteTxn,
    coll: Collection,
    conflict: Conflict,
    record: str | None,
    auto: bool,
) -> list[dict[str, Any]]:
    if coll.series is None:
        raise UserError(f"{coll.name} has no series to renumber from; use rename")
    ids = conflict["records"]
    losers = [_loser(ids, record)] if record is not None else ids[1:]
    if auto:
        losers = [rid for rid in losers if _created_by(txn, coll, rid) == node.node_id]
    entries = []
    for rid in losers:
        row = txn.execute(
            "SELECT json_extract(data, '$.' || ?) FROM records WHERE collection = ? AND id = ?",
            (coll.partition_field, coll.name, rid),
        ).fetchone()
        date = dt.date.fromisoformat(row[0]) if row and row[0] else None
        alloc = series_mod.allocate(txn.conn, coll, node.node_id, date, rid, node._clock.wall_ms())
        entries.append(
            _write(
                node,
                txn,
                coll,
                rid,
                {"number": alloc.number},
                conflict,
                "renumber",
                conflict["key"],
                alloc.number,
                auto,
            )
        )
    return entries


def _loser(ids: list[str], record: str | None) -> str:
    if record is None:
        return ids[-1]  # the latest created
    if record not in ids[1:]:
        raise UserError(
            f"{record!r} is not a losing record of this conflict; choose one of "
            f"{', '.join(ids[1:])} (the first, {ids[0]}, is the one in force)"
        )
    return record


def _created_by(txn: WriteTxn, coll: Collection, rid: str) -> str | None:
    row = txn.execute(
        "SELECT created_node FROM records WHERE collection = ? AND id = ?", (coll.name, rid)
    ).fetchone()
    return str(row[0]) if row else None


def _write(
    node: Node,
    txn: WriteTxn,
    coll: Collection,
    rid: str,
    values: dict[str, Any],
    conflict: Conflict,
    action: str,
    old: Any,
    new: Any,
    auto: bool,
) -> dict[str, Any]:
    """One replicated write of ``values`` plus a journal entry on record ``rid``."""
    row = txn.execute(
        "SELECT doc FROM records WHERE collection = ? AND id = ?", (coll.name, rid)
    ).fetchone()
    if row is None:
        raise ConflictNotFound(f"{coll.name} {rid} is not here any more")
    loaded = node._doc(row[0])
    entry = {
        "id": node._new_id(),
        "conflict": conflict["id"],
        "kind": conflict["kind"],
        "collection": coll.name,
        "record": rid,
        "action": action,
        "old": old,
        "new": new,
        "node": node.node_id,
        "at": node._clock.wall_ms(),
        "auto": auto,
    }
    mine = loaded.doc.states(rid).get(node.node_id)
    earlier = mine["f"].get(JOURNAL, [0, []])[1] if isinstance(mine, dict) else []
    journal = [*(earlier if isinstance(earlier, list) else []), entry][-JOURNAL_CAP:]
    node._write_entry(txn, coll, loaded, rid, {**values, JOURNAL: journal})
    return entry
