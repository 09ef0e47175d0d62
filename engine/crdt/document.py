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
        self._fresh: dict[str, Any] = {}  # key -> text, from the last transaction
        self._doc.observe(self._on_transaction)
        self._map.observe(self._on_map)

    def _on_transaction(self, event: TransactionEvent) -> None:
        self._updates.append(event.update)

    def _on_map(self, event: MapEvent) -> None:
        keys: dict[str, dict[str, Any]] = event.keys  # type: ignore[attr-defined]
        index, fresh, changed = self._index, self._fresh, self._changed
        for key, change in keys.items():
            rid, _, node = key.partition(SEP)
            changed.add(rid)
            if change["action"] == "delete":
                index.get(rid, set()).discard(node)
                continue
            nodes = index.get(rid)
            if nodes is None:
                index[rid] = {node}
            else:
                nodes.add(node)
            # The event carries the new text: reading it back from the Map
            # would cost a lookup per key on bulk imports.
            fresh[key] = change.get("newValue")

    def _take(self) -> tuple[set[str], bytes | None]:
        changed, self._changed = self._changed, set()
        updates, self._updates = self._updates, []
        return changed, (updates[0] if len(updates) == 1 else None)

    def apply(self, update: bytes) -> tuple[set[str], bytes | None, bool]:
        """Integrate a remote update.

        Returns (record ids changed, the effective update or None when nothing
        was integrated, whether it waits whole for missing earlier updates).
        A partly integrated update may also hold a waiting part: callers that
        log updates keep the raw bytes whenever anything was integrated.
        Raises UpdateError for bytes that are not a Yjs update.
        """
        self._fresh.clear()
        try:
            with self._doc.transaction(origin="remote"):
                self._doc.apply_update(update)
        except Exception as exc:  # pycrdt raises bare exceptions for bad input
            self._take()
            raise UpdateError(f"document {self.name}: not a valid update ({exc})") from None
        changed, effective = self._take()
        pending = False
        if effective is None:
            # Nothing integrated: a duplicate, or an update waiting for earlier
            # ones. Only then is it worth decoding the update's state vector.
            try:
                incoming = decode_state_vector(get_state(update))
            except Exception:
                incoming = {}
            pending = is_behind(decode_state_vector(self._doc.get_state()), incoming)
        return changed, effective, pending

    def write(self, record_id: str, node: str, state: NodeState) -> bytes:
        """Replace ``node``'s entry of a record; returns the Yjs update made."""
        self._fresh.clear()
        with self._doc.transaction(origin="local"):
            self._map[f"{record_id}{SEP}{node}"] = orjson.dumps(state).decode()
        _, update = self._take()
        assert update is not None
        return update

    def release(self) -> None:
        """Drop the entry texts kept from the last transaction (call once the
        changed records are resolved; a bulk import holds megabytes there)."""
        self._fresh = {}

    def states(self, record_id: str) -> dict[str, NodeState]:
        """Each writing node's entry of a record, parsed. Entries that are not
        JSON objects (a buggy or hostile peer) are left out, the same way on
        every node."""
        out = {}
        for node in self._index.get(record_id, ()):
            key = f"{record_id}{SEP}{node}"
            raw = self._fresh[key] if key in self._fresh else self._map.get(key)
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
    """The JSON object of an entry; its fields are checked by ``merge.resolve``."""
    if not isinstance(raw, str):
        return None
    try:
        state = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return state if type(state) is dict else None
