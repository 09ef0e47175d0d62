"""One CRDT document: a flat pycrdt Map of ``"{record_id}|{node}" -> JSON text``.

A node only ever rewrites its own key of a record, so concurrent writers
never collide inside Yjs; merging happens in ``engine.merge`` on top. The
index ``record id -> writing nodes`` is kept current from the Map's events.
Single-threaded: the owner must not share a ``RecordDoc`` between threads.
"""

from __future__ import annotations

from typing import Any

import orjson
from pycrdt import Doc, Map, MapEvent, TransactionEvent, get_state

from ..errors import UpdateError
from ..merge.record import NodeState
from .statevec import decode_state_vector, is_behind

ROOT = "r"
SEP = "|"


class RecordDoc:
    """A loaded document; ``client_id`` must be unique per live instance."""

    def __init__(self, name: str, client_id: int) -> None:
        self.name = name
        self._doc: Doc[Any] = Doc(client_id=client_id)
        self._map: Map[Any] = self._doc.get(ROOT, type=Map)
        self._index: dict[str, set[str]] = {}
        self._updates: list[bytes] = []
        self._changed: set[str] = set()
        self._doc.observe(self._on_transaction)
        self._map.observe(self._on_map)

    def _on_transaction(self, event: TransactionEvent) -> None:
        self._updates.append(event.update)

    def _on_map(self, event: MapEvent) -> None:
        keys: dict[str, dict[str, Any]] = event.keys  # type: ignore[attr-defined]
        for key, change in keys.items():
            rid, _, node = key.partition(SEP)
            if change["action"] == "delete":
                self._index.get(rid, set()).discard(node)
            else:
                self._index.setdefault(rid, set()).add(node)
            self._changed.add(rid)

    def _take(self) -> tuple[set[str], bytes | None]:
        changed, self._changed = self._changed, set()
        updates, self._updates = self._updates, []
        return changed, (updates[0] if len(updates) == 1 else None)

    def apply(self, update: bytes) -> tuple[set[str], bytes | None, bool]:
        """Integrate a remote update.

        Returns (record ids changed, the effective update or None when nothing
        was new, whether part of it waits for missing earlier updates).
        Raises UpdateError for bytes that are not a Yjs update.
        """
        try:
            with self._doc.transaction(origin="remote"):
                self._doc.apply_update(update)
        except Exception as exc:  # pycrdt raises bare exceptions for bad input
            self._take()
            raise UpdateError(f"document {self.name}: not a valid update ({exc})") from None
        changed, effective = self._take()
        try:
            incoming = decode_state_vector(get_state(update))
        except Exception:
            incoming = {}
        pending = is_behind(decode_state_vector(self._doc.get_state()), incoming)
        return changed, effective, pending

    def write(self, record_id: str, node: str, state: NodeState) -> bytes:
        """Replace ``node``'s entry of a record; returns the Yjs update made."""
        with self._doc.transaction(origin="local"):
            self._map[f"{record_id}{SEP}{node}"] = orjson.dumps(state).decode()
        _, update = self._take()
        assert update is not None
        return update

    def states(self, record_id: str) -> dict[str, NodeState]:
        """Each writing node's entry of a record, parsed. Entries that are not
        well-formed (a buggy or hostile peer) are left out, the same way on
        every node, so they cannot break resolution."""
        out = {}
        for node in self._index.get(record_id, ()):
            raw = self._map.get(f"{record_id}{SEP}{node}")
            state = _parse_state(raw)
            if state is not None:
                out[node] = state
        return out

    def record_ids(self) -> list[str]:
        return list(self._index)

    def state_vector(self) -> bytes:
        return self._doc.get_state()

    def diff(self, state_vector: bytes | None = None) -> bytes:
        """The update a replica with ``state_vector`` lacks (everything if None)."""
        try:
            if state_vector is None:
                return self._doc.get_update()
            return self._doc.get_update(state_vector)
        except Exception as exc:
            raise UpdateError(f"document {self.name}: invalid state vector ({exc})") from None


def _parse_state(raw: Any) -> NodeState | None:
    if not isinstance(raw, str):
        return None
    try:
        state = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(state, dict):
        return None
    for entry in state.values():
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and type(entry[0]) is int
            and isinstance(entry[1], dict)
            and all(type(v) is int for v in entry[1].values())
        ):
            return None
    return state
