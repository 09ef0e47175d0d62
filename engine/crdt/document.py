"""One CRDT document: a flat pycrdt Map of ``"{record_id}|{node}" -> JSON text``.

A node only ever rewrites its own key of a record, so concurrent writers
never collide inside Yjs; merging happens in ``engine.merge`` on top. The
index ``record id -> writing nodes`` is kept current from the Map's events.
``trim_heap`` hands memory freed after a large load back to the system.
Single-threaded: the owner must not share a ``RecordDoc`` between threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterable
from sys import intern
from typing import Any

import orjson
from pycrdt import Doc, Map, TransactionEvent, merge_updates

from ..errors import UpdateError
from ..merge.record import NodeState
from .split import reach
from .statevec import decode_state_vector

ROOT = "r"
SEP = "|"
#: Updates kept for another try because part of them waits for missing
#: earlier updates (see ``RecordDoc.apply``); beyond this, the oldest are
#: dropped from the retry list (their bytes stay in the caller's log, and
#: the next load of the document tries them again).
MAX_WAITING = 256
_ABSENT = object()


class RecordDoc:
    """A loaded document; ``client_id`` must be unique per live instance.

    ``initial`` updates (a snapshot and the log after it) are applied before
    any observer is attached, and the index is built from the Map's keys:
    loading a large document then costs no per-key events. Raises
    UpdateError for bytes that are not a Yjs update.
    """

    def __init__(self, name: str, client_id: int, initial: Iterable[bytes] = ()) -> None:
        self.name = name
        self._doc: Doc[Any] = Doc(client_id=client_id)
        self._map: Map[Any] = self._doc.get(ROOT, type=Map)
        # record id -> the node that wrote it, or a set when several did (rare;
        # one set per record would cost ~200 bytes each).
        self._index: dict[str, str | set[str]] = {}
        self._changed: set[str] = set()
        self._fresh: dict[str, Any] = {}  # key -> text, from the last transaction
        self._capture = False
        self._update: bytes | None = None
        self._waiting: list[bytes] = []
        # Updates are read as applied; only one that waits right after it is
        # applied is kept (the state only grows: one that does not wait then
        # never will), so a caller streaming them holds one at a time.
        waiting: list[bytes] = []
        for update in initial:
            try:
                self._doc.apply_update(update)
            except Exception as exc:  # pycrdt raises bare exceptions for bad input
                raise UpdateError(f"document {name}: not a valid update ({exc})") from None
            if _waits(update, self._doc.get_state()):
                waiting.append(update)
        state = self._doc.get_state()
        self._waiting = [u for u in waiting if _waits(u, state)][-MAX_WAITING:]
        del waiting
        if self._waiting:
            self._retry_waiting()
        for key in self._map:
            rid, _, node = key.partition(SEP)
            # One string per writing node, not one per record (about 5 MB
            # at 100k records).
            self._add(rid, intern(node))
        self._doc.observe(self._on_transaction)
        # Through the integrated (Rust) type, not ``Map.observe``: pycrdt's
        # wrapper converts every field of every event (target, path, each
        # value) before the callback; only ``keys`` is read here. The
        # subscription must stay referenced.
        self._subscription = self._map.integrated.observe(self._on_map)

    def _add(self, rid: str, node: str) -> None:
        have = self._index.get(rid)
        if have is None:
            self._index[rid] = node
        elif isinstance(have, str):
            if have != node:
                self._index[rid] = {have, node}
        else:
            have.add(node)

    def _discard(self, rid: str, node: str) -> None:
        have = self._index.get(rid)
        if isinstance(have, str):
            if have == node:
                del self._index[rid]
        elif have is not None:
            have.discard(node)
            if not have:
                del self._index[rid]

    def _nodes(self, rid: str) -> tuple[str, ...] | set[str]:
        have = self._index.get(rid)
        if have is None:
            return ()
        return (have,) if isinstance(have, str) else have

    def _on_transaction(self, event: TransactionEvent) -> None:
        # Reading ``event.update`` copies the whole update: only local writes,
        # whose update is logged, need it.
        if self._capture:
            self._update = event.update

    def _on_map(self, event: Any) -> None:
        keys: dict[str, dict[str, Any]] = event.keys
        fresh, changed = self._fresh, self._changed
        index = self._index
        for key, change in keys.items():
            rid, _, node = key.partition(SEP)
            changed.add(rid)
            if change["action"] == "delete":
                self._discard(rid, node)
                continue
            # ``_add`` inlined for its common case (a new record): this loop
            # runs once per key of a bulk import.
            have = index.get(rid)
            if have is None:
                index[rid] = intern(node)
            elif have != node:
                self._add(rid, intern(node))
            # The event carries the new text: reading it back from the Map
            # would cost a lookup per key on bulk imports.
            fresh[key] = change.get("newValue")

    def apply(self, update: bytes) -> tuple[set[str], bool, bool]:
        """Integrate a remote update.

        Returns (record ids changed, whether anything was integrated, whether
        it waits whole for missing earlier updates). A partly integrated
        update may also hold a waiting part: callers that log updates keep
        the raw bytes whenever anything was integrated.
        Raises UpdateError for bytes that are not a Yjs update.
        """
        self._fresh.clear()
        self._changed = set()
        before = self._doc.get_state()
        try:
            with self._doc.transaction(origin="remote"):
                self._doc.apply_update(update)
        except Exception as exc:  # pycrdt raises bare exceptions for bad input
            raise UpdateError(f"document {self.name}: not a valid update ({exc})") from None
        except BaseException as exc:
            # yrs 0.28 panics on some valid update sequences while building
            # the Map event; pyo3 raises that as a BaseException. The Doc may
            # be half-changed: callers must drop this RecordDoc (Node does on
            # any error) and the update is refused, not stored.
            if type(exc).__name__ != "PanicException":
                raise
            raise UpdateError(
                f"document {self.name}: the CRDT library failed on this update "
                f"({str(exc).splitlines()[0]}); it was not stored"
            ) from None
        after = self._doc.get_state()
        waits = _waits(update, after)
        if after != before and self._waiting:
            after = self._retry_waiting()
        if waits:
            self._waiting = [*self._waiting, update][-MAX_WAITING:]
        changed, self._changed = self._changed, set()
        integrated = bool(changed) or after != before
        return changed, integrated, waits and not integrated

    def _retry_waiting(self) -> bytes:
        """Apply again the updates that had a waiting part, until no more of
        them integrates; returns the state then. yrs does not always
        integrate a waiting part once what it waited for arrives (the same
        updates in another order would have): applying its bytes again does,
        and is harmless for what is already here."""
        state = self._doc.get_state()
        while self._waiting:
            with self._doc.transaction(origin="remote"):
                for update in self._waiting:
                    self._doc.apply_update(update)
            now = self._doc.get_state()
            self._waiting = [u for u in self._waiting if _waits(u, now)]
            if now == state:
                break
            state = now
        return state

    def write(self, record_id: str, node: str, state: NodeState) -> bytes:
        """Replace ``node``'s entry of a record; returns the Yjs update made."""
        self._fresh.clear()
        self._capture = True
        try:
            with self._doc.transaction(origin="local"):
                self._map[f"{record_id}{SEP}{node}"] = orjson.dumps(state).decode()
        finally:
            self._capture = False
        self._changed = set()
        update, self._update = self._update, None
        assert update is not None
        return update

    def set_keys(self) -> list[str]:
        """Entry keys the last ``apply`` set (valid until ``release``)."""
        return list(self._fresh)

    def release(self, record_ids: Iterable[str] | None = None) -> None:
        """Drop the entry texts kept from the last transaction, of
        ``record_ids`` or all (call once those records are resolved; a bulk
        import holds megabytes there)."""
        if record_ids is None:
            self._fresh = {}
            return
        fresh = self._fresh
        for rid in record_ids:
            for node in self._nodes(rid):
                fresh.pop(rid + SEP + node, None)

    def states(self, record_id: str) -> dict[str, NodeState]:
        """Each writing node's entry of a record, parsed. Entries that are not
        JSON objects (a buggy or hostile peer) are left out, the same way on
        every node."""
        have = self._index.get(record_id)
        if type(have) is str:  # one writer: most records, every bulk import
            raw = self._fresh.get(record_id + SEP + have, _ABSENT)
            if raw is _ABSENT:
                raw = self._map.get(record_id + SEP + have)
            state = _parse_state(raw)
            return {} if state is None else {have: state}
        out = {}
        for node in self._nodes(record_id):
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


MAX_MERGE = 1000  # updates merged at once: pycrdt's merge is quadratic in their number


def _waits(update: bytes, state: bytes) -> bool:
    """Part of ``update`` lies beyond ``state`` and holds items: it waits for
    missing earlier updates. (``pycrdt.get_state(update)`` cannot tell: it
    omits every client whose items do not start at clock 0.) Read from the
    struct headers (``split.reach``): ``get_update(update, state)`` would
    tell too, but decodes all of it, about 70 MB more at the peak for a
    100k-record snapshot, and slower. Never raises."""
    try:
        ends = reach(update)
        have = decode_state_vector(state)
    except UpdateError:
        return False
    return any(end > have.get(client, 0) for client, end in ends.items())


def merge(updates: list[bytes]) -> bytes:
    """One update holding all of ``updates`` (at most ``MAX_MERGE``).
    Raises UpdateError for bytes that are not updates."""
    if len(updates) > MAX_MERGE:
        raise ValueError(f"merge of {len(updates)} updates; merge at most {MAX_MERGE} at once")
    try:
        return bytes(merge_updates(*updates))
    except Exception as exc:  # pycrdt raises bare exceptions for bad input
        raise UpdateError(f"cannot merge updates ({exc})") from None


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc only; a no-op elsewhere).
    Loading a large document frees hundreds of MB that malloc would keep."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc: Any = None


def _parse_state(raw: Any) -> NodeState | None:
    """The JSON object of an entry; its fields are checked by ``merge.resolve``."""
    if not isinstance(raw, str):
        return None
    try:
        state = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return state if type(state) is dict else None
