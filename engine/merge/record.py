"""Resolving one record from what each node has written to it.

A record lives in the CRDT as one entry per writing node: ``NodeState`` maps
a field to ``[hlc, seen, value]``, where ``seen`` is, per other node, the
newest timestamp of that node's entry the writer had observed when it wrote
(a node's entry is replaced atomically, so that one number says exactly which
of its field values the writer knew). Every node computes the same result
from the same entries, whatever order they arrived in:

* an entry another entry has seen (``other.seen[node] >= hlc``) is
  superseded; the survivors of a field are concurrent writes;
* the value in force is the survivor with the highest (hlc, node); the others
  are kept and reported as a ``concurrent_edit`` conflict unless they hold
  the same value;
* ``_deleted`` is a field like any other, so delete vs restore is a register;
  a live delete that had not seen another node's later field write is an
  ``edit_delete`` conflict;
* ``_created`` is written once by the creating node; a record whose creation
  has not arrived yet is incomplete and not shown.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

DELETED = "_deleted"
CREATED = "_created"

Entry = list[Any]  # [hlc: int, seen: dict[str, int], value]; see ``well_formed``
NodeState = dict[str, Entry]


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

    @property
    def complete(self) -> bool:
        return self.created is not None


def seen_by(states: dict[str, NodeState], writer: str) -> dict[str, int]:
    """What ``writer`` has observed of the other nodes' entries: node -> newest hlc."""
    out = {}
    for node, state in states.items():
        if node != writer and state and well_formed(state):
            out[node] = max(entry[0] for entry in state.values())
    return out


def new_state(
    current: NodeState | None, values: dict[str, Any], hlc: int, seen: dict[str, int]
) -> NodeState:
    """The writer's replacement entry: its earlier fields plus ``values`` at ``hlc``."""
    state = dict(current or {})
    for name, value in values.items():
        state[name] = [hlc, seen, value]
    return state


def resolve(states: dict[str, NodeState]) -> Resolved:
    """Resolve a record from each node's entry (see module docstring)."""
    out = Resolved()
    if len(states) == 1:
        return _resolve_single(states, out)
    states = {node: state for node, state in states.items() if well_formed(state)}
    by_field: dict[str, list[tuple[str, Entry]]] = {}
    for node, state in states.items():
        for name, entry in state.items():
            by_field.setdefault(name, []).append((node, entry))
            if entry[0] > out.newest:
                out.newest = entry[0]
    created = by_field.pop(CREATED, None)
    if created:
        node, entry = min(created, key=lambda ne: (ne[1][0], ne[0]))
        out.created = (entry[0], node)
    for name in sorted(by_field):
        entries = by_field[name]
        survivors = [
            (node, entry)
            for node, entry in entries
            if not any(
                other is not entry and other[1].get(node, 0) >= entry[0] for _, other in entries
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
        delete_seen = states[node][DELETED][1]
        unseen = [
            Competitor(other, entry[0], {name: entry[2]})
            for name, entries in sorted(by_field.items())
            if name != DELETED
            # By node, so the conflict does not depend on the order entries came in.
            for other, entry in sorted(entries, key=lambda ne: ne[0])
            if other != node and delete_seen.get(other, 0) < entry[0]
        ]
        if unseen:
            out.conflicts.append(
                FieldConflict("edit_delete", DELETED, (Competitor(node, hlc, True), *unseen))
            )
    return out


def well_formed(state: Any) -> bool:
    """True when every entry is ``[int hlc, {node: int hlc}, value]``. Entries
    from a faulty peer that are not are ignored, the same way on every node."""
    if type(state) is not dict:
        return False
    for entry in state.values():
        if type(entry) is not list or len(entry) != 3 or type(entry[0]) is not int:
            return False
        seen = entry[1]
        if type(seen) is not dict or (seen and any(type(v) is not int for v in seen.values())):
            return False
    return True


def _resolve_single(states: dict[str, NodeState], out: Resolved) -> Resolved:
    """Fast path for a record only one node has written: nothing can conflict.
    Checks entries as it goes (see ``well_formed``); a malformed one leaves the
    record empty and incomplete."""
    ((node, state),) = states.items()
    values, writers = out.values, out.writers
    newest = 0
    for name, entry in state.items():
        if type(entry) is not list or len(entry) != 3:
            return Resolved()
        hlc, seen, value = entry
        if type(hlc) is not int or type(seen) is not dict:
            return Resolved()
        if seen and any(type(v) is not int for v in seen.values()):
            return Resolved()
        if hlc > newest:
            newest = hlc
        if name == CREATED:
            out.created = (hlc, node)
            continue
        if name == DELETED:
            out.deleted = bool(value)
        else:
            values[name] = value
        writers[name] = (node, hlc)
    out.newest = newest
    return out
