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
from dataclasses import dataclass
from typing import Any

import orjson

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
from .values import encode
from .writes import Writer

JOURNAL_CAP = 16  # entries one node keeps per record; older ones are dropped
RESOLVABLE = ("concurrent_edit", "edit_delete", "duplicate_key")


@dataclass(frozen=True)
class Choice:
    """How to resolve a conflict: exactly one of ``keep``, ``rename``,
    ``merge_into``, ``renumber`` (``record``: which losing record, for
    rename and renumber). Raises UserError otherwise."""

    keep: Any = None
    rename: str | None = None
    merge_into: str | None = None
    renumber: bool = False
    record: str | None = None

    def __post_init__(self) -> None:
        given = [self.keep is not None, self.rename is not None, self.merge_into is not None]
        if sum(given) + self.renumber != 1:
            raise UserError("choose exactly one of keep, rename, merge_into, renumber")


def resolve(w: Writer, conflict_id: str, choice: Choice) -> dict[str, Any]:
    """Resolve one open conflict (see the module docstring) in ``w``'s
    transaction; returns the journal entry written. Raises ConflictNotFound,
    UserError."""
    keep, rename, merge_into, record = choice.keep, choice.rename, choice.merge_into, choice.record
    found = [c for c in list_conflicts(w.txn.conn, w.schema, w.node_id) if c["id"] == conflict_id]
    if not found:
        raise ConflictNotFound(
            f"no open conflict {conflict_id!r}; list them with 'branchline conflicts'"
        )
    conflict = found[0]
    kind = conflict["kind"]
    coll = w.collection(conflict["collection"])
    if kind not in RESOLVABLE:
        raise UserError(
            f"a {kind} conflict is resolved by fixing the data: {conflict['explanation']}"
        )
    if kind == "duplicate_key":
        if keep is not None:
            raise UserError("a duplicate_key conflict needs rename, merge_into or renumber")
        if rename is not None:
            return _rename(w, coll, conflict, rename, record)
        if merge_into is not None:
            return _merge_into(w, coll, conflict, merge_into)
        return _renumber_losers(w, coll, conflict, record, auto=False)[0]
    if keep is None:
        raise UserError(f"a {kind} conflict is resolved with keep (a node name or a value)")
    if kind == "concurrent_edit":
        return _keep_value(w, coll, conflict, keep)
    return _keep_side(w, coll, conflict, keep)


def renumber_own_duplicates(w: Writer, collections: set[str]) -> list[dict[str, Any]]:
    """Apply ``on_duplicate = "renumber"``: give fresh numbers to the losing
    vouchers this node created, in ``collections``. Inside ``w``'s
    transaction; returns the journal entries."""
    done: list[dict[str, Any]] = []
    for name in sorted(collections):
        coll = w.schema.collections[name]
        if coll.on_duplicate != "renumber":
            continue
        for key in duplicate_keys(w.txn.conn, coll):
            group = duplicate_group(w.txn.conn, coll, key)
            if any(n == w.node_id for _, n, _ in group[1:]):
                conflict = {
                    "id": _group_id(coll, key, group),
                    "kind": "duplicate_key",
                    "records": [g[0] for g in group],
                    "key": key,
                }
                done += _renumber_losers(w, coll, conflict, None, auto=True)
    return done


def _group_id(coll: Collection, key: str, group: list[tuple[str, str, int]]) -> str:
    return conflict_digest("duplicate_key", coll.name, key, *sorted(g[0] for g in group))


def _keep_value(w: Writer, coll: Collection, conflict: Conflict, keep: Any) -> dict[str, Any]:
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
            value = w.resolve_ref(fld.to or "", value, f"{coll.name}.{field}")
    rid = conflict["records"][0]
    old = values[0]["value"]
    return _write(w, coll, rid, {field: value}, conflict, "keep", old, value, False)


def _keep_side(w: Writer, coll: Collection, conflict: Conflict, keep: Any) -> dict[str, Any]:
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
    entry = _write(w, coll, rid, {DELETED: deleted}, conflict, action, True, deleted, False)
    numbered = None if deleted else w.numbered(coll, rid)
    if numbered is not None:
        # The voided number is in use again: the gap journal says so.
        w.journal_gap(coll, *numbered, "restored", rid)
    return entry


def _rename(
    w: Writer,
    coll: Collection,
    conflict: Conflict,
    new_key: str,
    record: str | None,
) -> dict[str, Any]:
    ids = conflict["records"]
    rid = _loser(ids, record)
    stored = encode(coll.fields[coll.key], new_key, f"{coll.name}.{coll.key}")
    if w.lookup(coll, stored, by_id=False) is not None:
        raise UserError(f"{coll.name}: {coll.key} {new_key!r} is taken by a live record")
    return _write(
        w,
        coll,
        rid,
        {coll.key: stored},
        conflict,
        "rename",
        conflict["key"],
        stored,
        False,
    )


def _merge_into(w: Writer, coll: Collection, conflict: Conflict, winner: str) -> dict[str, Any]:
    ids = conflict["records"]
    if winner not in ids:
        raise UserError(f"merge into one of the conflict's records: {', '.join(ids)}")
    entry: dict[str, Any] = {}
    for rid in ids:
        if rid != winner:
            entry = _write(
                w,
                coll,
                rid,
                {ALIAS: winner},
                conflict,
                "merge_into",
                rid,
                winner,
                False,
            )
    return entry


def _renumber_losers(
    w: Writer,
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
        losers = [
            rid for rid in losers if (row := w.row(coll, rid)) and row.created_node == w.node_id
        ]
    entries = []
    for rid in losers:
        raw = w.stored_value(coll, rid, coll.partition_field)
        alloc = w.allocate(coll, dt.date.fromisoformat(raw) if raw else None, rid)
        entries.append(
            _write(
                w,
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


def _write(
    w: Writer,
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
    row = w.row(coll, rid)
    if row is None:
        raise ConflictNotFound(f"{coll.name} {rid} is not here any more")
    entry = {
        "id": w.new_id(),
        "conflict": conflict["id"],
        "kind": conflict["kind"],
        "collection": coll.name,
        "record": rid,
        "action": action,
        "old": old,
        "new": new,
        "node": w.node_id,
        "at": w.now_ms(),
        "auto": auto,
    }
    mine = w.states(row.doc, rid).get(w.node_id)
    earlier = mine["f"].get(JOURNAL, [0, []])[1] if isinstance(mine, dict) else []
    journal = [*(earlier if isinstance(earlier, list) else []), entry][-JOURNAL_CAP:]
    w.write_entry(coll, row.doc, rid, {**values, JOURNAL: journal})
    return entry
