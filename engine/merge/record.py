"""Resolving one record from what each node has written to it.

A record lives in the CRDT as one entry per writing node, a ``NodeState``::

    {"w": [[hlc, seen], ...],             # the node's writes still referenced
     "f": {field: [write_index, value]}}  # each field's latest value and its write

``hlc`` is the write's hybrid-clock timestamp; ``seen`` is, per other node,
the newest timestamp of that node's entry the writer had observed (a node's
entry is replaced as a whole, so that one number says exactly which of its
field values the writer knew). One put is one write shared by all its fields,
which keeps entries small. Every node computes the same result from the same
entries, whatever order they arrived in:

* a field value another node's write has seen (``other.seen[node] >= hlc``)
  is superseded; the survivors of a field are concurrent writes;
* the value in force is the survivor with the highest (hlc, node); the others
  are kept and reported as a ``concurrent_edit`` conflict unless they hold
  the same value;
* ``_deleted`` is a field like any other, so delete vs restore is a register;
  a live delete that had not seen another node's later field write is an
  ``edit_delete`` conflict;
* ``_created`` is written once by the creating node; a record whose creation
  has not arrived yet is incomplete and not shown;
* ``_alias`` (the record was merged into another) is a register like any
  field; ``_journal`` is not: each node keeps its own list of the
  resolutions it made, and the record's journal is the union of all lists;
* an entry that is not well-formed (a faulty peer) is ignored everywhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

DELETED = "_deleted"
CREATED = "_created"
ALIAS = "_alias"
JOURNAL = "_journal"

NodeState = dict[str, Any]  # {"w": [[hlc, seen], ...], "f": {field: [write, value]}}
Entry = tuple[int, dict[str, int], Any]  # one field's (hlc, seen, value)


@dataclass(frozen=True)
class Competitor:
    """One concurrent write of a field."""

    node: str
    hlc: int
    value: Any


@dataclass(frozen=True)
class FieldConflict:
    """A conflict inside one record. ``kind`` is ``concurrent_edit`` (``field``
    is set; ``competitors[0]`` is the value in force) or ``edit_delete``
    (``competitors[0]`` is the delete, the rest the unseen edits)."""

    kind: str
    field: str
    competitors: tuple[Competitor, ...]

    def conflict_id(self, collection: str, record_id: str) -> str:
        """Stable across nodes: derived from the competing writes only."""
        parts = [self.kind, collection, record_id, self.field]
        parts += [
            f"{c.node}@{c.hlc}" for c in sorted(self.competitors, key=lambda c: (c.node, c.hlc))
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


@dataclass
class Resolved:
    """A record as every node sees it given the same entries."""

    values: dict[str, Any] = field(default_factory=dict)
    writers: dict[str, tuple[str, int]] = field(default_factory=dict)
    deleted: bool = False
    created: tuple[int, str] | None = None  # (hlc, node); None while incomplete
    conflicts: list[FieldConflict] = field(default_factory=list)
    newest: int = 0  # highest hlc of any entry
    journal: list[dict[str, Any]] = field(default_factory=list)  # sorted by id

    @property
    def complete(self) -> bool:
        return self.created is not None


def seen_by(states: dict[str, NodeState], writer: str) -> dict[str, int]:
    """What ``writer`` has observed of the other nodes' entries: node -> newest hlc."""
    out = {}
    for node, state in states.items():
        if node != writer and well_formed(state) and state["w"]:
            out[node] = max(write[0] for write in state["w"])
    return out


def new_state(
    current: NodeState | None, values: dict[str, Any], hlc: int, seen: dict[str, int]
) -> NodeState:
    """The writer's replacement entry: its earlier fields plus ``values``, all
    written by one new write at ``hlc``. Writes no field refers to any more
    are dropped."""
    old_writes = current["w"] if current else []
    fields = {
        name: [ref, value] for name, (ref, value) in (current["f"] if current else {}).items()
    }
    for name, value in values.items():
        fields[name] = [-1, value]
    used = sorted({ref for ref, _ in fields.values() if ref >= 0})
    renumber = {old: new for new, old in enumerate(used)}
    writes = [old_writes[i] for i in used] + [[hlc, seen]]
    last = len(writes) - 1
    for entry in fields.values():
        entry[0] = renumber[entry[0]] if entry[0] >= 0 else last
    return {"w": writes, "f": fields}


def entries(state: NodeState) -> dict[str, Entry]:
    """A well-formed state's fields as (hlc, seen, value)."""
    writes = state["w"]
    return {name: (*writes[ref], value) for name, (ref, value) in state["f"].items()}


def resolve(states: dict[str, NodeState]) -> Resolved:
    """Resolve a record from each node's entry (see module docstring)."""
    out = Resolved()
    if len(states) == 1:
        return _resolve_single(states, out)
    states = {node: state for node, state in states.items() if well_formed(state)}
    if len(states) == 1:
        return _resolve_single(states, out)
    by_field: dict[str, list[tuple[str, Entry]]] = {}
    delete_seen: dict[str, dict[str, int]] = {}
    for node, state in states.items():
        for name, entry in entries(state).items():
            by_field.setdefault(name, []).append((node, entry))
            if entry[0] > out.newest:
                out.newest = entry[0]
            if name == DELETED:
                delete_seen[node] = entry[1]
    journals = by_field.pop(JOURNAL, None)
    if journals:
        out.journal = _union(entry[2] for _, entry in journals)
    created = by_field.pop(CREATED, None)
    if created:
        node, entry = min(created, key=lambda ne: (ne[1][0], ne[0]))
        out.created = (entry[0], node)
    for name in sorted(by_field):
        fentries = by_field[name]
        survivors = [
            (node, entry)
            for node, entry in fentries
            if not any(
                other is not entry and other[1].get(node, 0) >= entry[0] for _, other in fentries
            )
        ]
        survivors.sort(key=lambda ne: (ne[1][0], ne[0]), reverse=True)
        node, entry = survivors[0]
        if name == DELETED:
            out.deleted = bool(entry[2])
        else:
            out.values[name] = entry[2]
        out.writers[name] = (node, entry[0])
        # Concurrent writes of the same value agree: no conflict to show.
        differing = [(n, e) for n, e in survivors[1:] if e[2] != entry[2]]
        if differing:
            out.conflicts.append(
                FieldConflict(
                    "concurrent_edit",
                    name,
                    tuple(Competitor(n, e[0], e[2]) for n, e in [(node, entry), *differing]),
                )
            )
    if out.deleted:
        node, hlc = out.writers[DELETED]
        seen = delete_seen[node]
        unseen = [
            Competitor(other, entry[0], {name: entry[2]})
            for name, fentries in sorted(by_field.items())
            if name != DELETED
            # By node, so the conflict does not depend on the order entries came in.
            for other, entry in sorted(fentries, key=lambda ne: ne[0])
            if other != node and seen.get(other, 0) < entry[0]
        ]
        if unseen:
            out.conflicts.append(
                FieldConflict("edit_delete", DELETED, (Competitor(node, hlc, True), *unseen))
            )
    return out


def well_formed(state: Any) -> bool:
    """True for ``{"w": [[int, {str: int}], ...], "f": {str: [valid index, value]}}``."""
    if type(state) is not dict or len(state) != 2:
        return False
    writes, fields = state.get("w"), state.get("f")
    if type(writes) is not list or type(fields) is not dict:
        return False
    for write in writes:
        if type(write) is not list or len(write) != 2 or type(write[0]) is not int:
            return False
        seen = write[1]
        if type(seen) is not dict or (seen and any(type(v) is not int for v in seen.values())):
            return False
    count = len(writes)
    for entry in fields.values():
        if type(entry) is not list or len(entry) != 2:
            return False
        ref = entry[0]
        if type(ref) is not int or not 0 <= ref < count:
            return False
    return True


def _resolve_single(states: dict[str, NodeState], out: Resolved) -> Resolved:
    """Fast path for a record only one node has written: nothing can conflict.
    Checks the entry as it goes, as ``well_formed`` does: a malformed entry
    gives an empty, incomplete record."""
    ((node, state),) = states.items()
    if type(state) is not dict or len(state) != 2:
        return Resolved()
    writes, fields = state.get("w"), state.get("f")
    if type(writes) is not list or type(fields) is not dict:
        return Resolved()
    stamps = []
    for write in writes:
        if type(write) is not list or len(write) != 2:
            return Resolved()
        hlc, seen = write
        if type(hlc) is not int or type(seen) is not dict:
            return Resolved()
        if seen and any(type(v) is not int for v in seen.values()):
            return Resolved()
        stamps.append(hlc)
    # One (node, hlc) per write, shared by its fields: no tuple per field.
    pairs = [(node, hlc) for hlc in stamps]
    count = len(pairs)
    values, writers = out.values, out.writers
    for name, entry in fields.items():
        if type(entry) is not list or len(entry) != 2:
            return Resolved()
        ref, value = entry
        if type(ref) is not int or not 0 <= ref < count:
            return Resolved()
        if name in _SPECIAL:
            if name == CREATED:
                out.created = (stamps[ref], node)
                continue
            if name == JOURNAL:
                out.journal = _union([value])
                continue
            out.deleted = bool(value)
        else:
            values[name] = value
        writers[name] = pairs[ref]
    out.newest = max(stamps, default=0)
    return out


_SPECIAL = frozenset((CREATED, JOURNAL, DELETED))


def _union(lists: Iterable[Any]) -> list[dict[str, Any]]:
    """Journal entries of all nodes, one per id, sorted by id; entries that are
    not objects with a string ``id`` (a faulty peer) are ignored everywhere."""
    found: dict[str, dict[str, Any]] = {}
    for items in lists:
        if type(items) is not list:
            continue
        for item in items:
            if type(item) is dict and type(item.get("id")) is str:
                found.setdefault(item["id"], item)
    return [found[k] for k in sorted(found)]
