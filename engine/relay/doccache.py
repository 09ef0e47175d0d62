"""What every relay store keeps in memory: its limits, the pycrdt document
of each dataset document it serves (``Loaded``, in a ``DocCache`` bounded by
a memory budget) and how an offered update is integrated into one
(``integrate``: duplicates, waiting parts, authorship)."""

from __future__ import annotations

import random
import secrets
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pycrdt import Doc, Map, TransactionEvent, get_update

from ..crdt.document import ROOT
from ..errors import UpdateError
from . import authorship


@dataclass(frozen=True)
class RelayLimits:
    """Bounds on everything that grows with input."""

    max_update_bytes: int = 128 << 20  # a 100k-record catalog is ~42 MB as one update
    max_batch: int = 10_000  # updates per append_updates call
    memory_budget_bytes: int = 256 << 20  # documents in memory (estimated)
    max_loaded_docs: int = 4096
    max_documents_per_dataset: int = 100_000
    max_lease: int = 1_000_000  # numbers per lease
    # A document's log is folded into its snapshot once it has ``compact_after``
    # rows and its bytes reach ``compact_ratio`` of the snapshot's, or once it
    # has ``compact_max`` rows whatever their bytes. Rewriting a big snapshot
    # every 1000 small updates cost more than storing them; with the ratio the
    # bytes rewritten stay proportional to the bytes logged, and
    # ``compact_max`` bounds how many rows a reload replays.
    compact_after: int = 1000
    compact_ratio: float = 0.25
    compact_max: int = 50_000
    # A compaction deletes a folded log row only once it is this many
    # positions behind the dataset's head: a reader of ``logged_after`` (the
    # other relays on the store) that follows the head within this distance
    # never meets a gap.
    keep_positions: int = 10_000
    logged_after_max: int = 10_000  # rows per ``logged_after`` call


@dataclass
class Loaded:
    doc: Doc[Any]
    applied: int  # highest log seq integrated
    tail: int  # log rows of the document (after the snapshot, or waiting)
    size: int  # bytes of the snapshot and rows it was built from: a memory estimate
    changes: int = 0  # transactions that changed the document, counted by its observer
    snapshot_bytes: int = 0  # bytes of its snapshot row
    tail_bytes: int = 0  # bytes of its log rows
    # Entries changed by the transaction being integrated (key -> yrs action),
    # read only while ``watching``: the authorship check of a non-carrier.
    watching: bool = False
    entries_changed: dict[str, str] = field(default_factory=dict)
    # The root Map and the subscription of ``on_entries`` to it: both must stay
    # referenced, or the observer goes.
    entries: Map[Any] | None = None
    subscription: Any = None
    failed: str = ""  # why reading the entries' event failed (yrs panics)

    def on_change(self, _event: TransactionEvent) -> None:
        # yrs calls the observer once per transaction that changed the
        # document (new items or new deletions), and not for a duplicate.
        self.changes += 1

    def on_entries(self, event: Any) -> None:
        # Subscribed to the Map's integrated (Rust) type, not through
        # ``Map.observe``: pycrdt's wrapper converts every field of every
        # event, a third of the relay's integration time; only ``keys`` is
        # needed, and only for a non-carrier.
        if not self.watching:
            return
        try:
            keys: dict[str, dict[str, Any]] = event.keys
            for key, change in keys.items():
                self.entries_changed[key] = str(change["action"])
        except BaseException as exc:
            # yrs 0.28 panics on some valid update sequences while building
            # the keys (pyo3 raises a BaseException); see RecordDoc.apply.
            if type(exc).__name__ != "PanicException":
                raise
            self.failed = str(exc).splitlines()[0] if str(exc) else "panic"


class DocCache:
    """Loaded documents by (dataset id, document name), least recently used
    first, evicted under ``limits`` (memory budget and count)."""

    def __init__(self, limits: RelayLimits) -> None:
        self.limits = limits
        self.docs: OrderedDict[tuple[int, str], Loaded] = OrderedDict()
        self.memory = 0
        self._rng = random.Random(secrets.randbits(64))

    def get(self, key: tuple[int, str]) -> Loaded | None:
        """The loaded document, marked as just used, or None."""
        loaded = self.docs.get(key)
        if loaded is not None:
            self.docs.move_to_end(key)
        return loaded

    def build(
        self,
        key: tuple[int, str],
        snapshot: tuple[int, bytes] | None,
        rows: Iterable[tuple[int, bytes]],
    ) -> Loaded:
        """Load a document from its snapshot ``(upto, data)`` and log rows
        ``(seq, data)`` (applying one twice is harmless) and keep it."""
        doc: Doc[Any] = Doc(client_id=self._rng.getrandbits(52) + 1)
        applied = tail = size = snapshot_bytes = 0
        if snapshot is not None:
            doc.apply_update(snapshot[1])
            applied, size = snapshot[0], len(snapshot[1])
            snapshot_bytes = size
        for seq, data in rows:
            doc.apply_update(data)
            applied = max(applied, seq)
            tail += 1
            size += len(data)
        loaded = Loaded(doc, applied, tail, 0)
        loaded.snapshot_bytes, loaded.tail_bytes = snapshot_bytes, size - snapshot_bytes
        doc.observe(loaded.on_change)
        loaded.entries = doc.get(ROOT, type=Map)
        loaded.subscription = loaded.entries.integrated.observe(loaded.on_entries)
        self.docs[key] = loaded
        self.grow(loaded, size)
        return loaded

    def grow(self, loaded: Loaded, nbytes: int) -> None:
        loaded.size += nbytes
        self.memory += nbytes

    def resize(self, loaded: Loaded, nbytes: int) -> None:
        """Set the memory estimate of ``loaded`` (after a compaction)."""
        self.memory -= loaded.size
        loaded.size = 0
        self.grow(loaded, nbytes)

    def logged(self, loaded: Loaded, at: int, nbytes: int) -> None:
        """Count a log row (seq or position ``at``, ``nbytes``) integrated
        into ``loaded``."""
        loaded.applied = at
        loaded.tail += 1
        loaded.tail_bytes += nbytes
        self.grow(loaded, nbytes)

    def compacted(self, loaded: Loaded, snapshot_bytes: int, kept: int, kept_bytes: int) -> int:
        """Record that ``loaded``'s log was folded into a snapshot of
        ``snapshot_bytes``, ``kept`` waiting rows (``kept_bytes``) left
        unfolded; returns the rows folded."""
        folded = loaded.tail - kept
        self.resize(loaded, snapshot_bytes)
        loaded.tail = kept
        loaded.snapshot_bytes, loaded.tail_bytes = snapshot_bytes, kept_bytes
        return folded

    def drop(self, key: tuple[int, str]) -> None:
        loaded = self.docs.pop(key, None)
        if loaded is not None:
            self.memory -= loaded.size

    def drop_dataset(self, ds_id: int) -> None:
        for key in [k for k in self.docs if k[0] == ds_id]:
            self.drop(key)

    def clear(self) -> None:
        self.docs.clear()
        self.memory = 0

    def evict(self) -> None:
        """Drop least recently used documents until under the budget; the most
        recently used one stays even when it alone is over it."""
        while len(self.docs) > 1 and (
            self.memory > self.limits.memory_budget_bytes
            or len(self.docs) > self.limits.max_loaded_docs
        ):
            _, loaded = self.docs.popitem(last=False)
            self.memory -= loaded.size

    def compaction_due(self, loaded: Loaded) -> bool:
        """The log of ``loaded`` should be folded now (see RelayLimits)."""
        limits = self.limits
        return loaded.tail >= limits.compact_max or (
            loaded.tail >= limits.compact_after
            and loaded.tail_bytes >= limits.compact_ratio * loaded.snapshot_bytes
        )


def diff_of(loaded: Loaded, doc: str, state_vector: bytes | None) -> bytes:
    """The update a replica in ``state_vector`` lacks of ``loaded`` (all of
    it when None). Raises UpdateError for an invalid state vector."""
    try:
        if state_vector is None:
            return loaded.doc.get_update()
        return loaded.doc.get_update(bytes(state_vector))
    except Exception as exc:  # pycrdt raises bare exceptions for bad input
        raise UpdateError(f"document {doc!r}: invalid state vector ({exc})") from None


def still_waiting(data: bytes, state_vector: bytes) -> bool:
    """True when the waiting update ``data`` carries items beyond
    ``state_vector`` (a compaction must keep its row)."""
    return get_update(data, state_vector)[:1] != b"\x00"


def integrate(
    loaded: Loaded, update: bytes, author: str | None = None, name: str = ""
) -> tuple[bool, bool]:
    """Apply ``update``; returns (changed the document, part of it waits for
    updates not seen yet). With ``author`` (a node that is not a carrier),
    check that it may publish the update (``authorship.check``). Raises
    UpdateError for bytes that are not an update, NotAuthor; after either,
    the document may hold part of the update: drop it."""
    before = loaded.changes
    doc = loaded.doc
    loaded.watching = author is not None
    loaded.entries_changed = {}
    loaded.failed = ""
    try:
        # Apply and read the state vector in ONE transaction: yrs integrates
        # (and retries waiting parts) inside apply_update, so the state is
        # the same as after the commit, and the observer still fires once at
        # the commit. Two pycrdt transactions per update were a fifth of the
        # relay's integration time. pycrdt's ``Doc._doc`` / ``Transaction._txn``
        # are what its own ``apply_update`` and ``get_state`` use (pycrdt is
        # pinned in pyproject.toml).
        with doc.transaction() as txn:
            raw = txn._txn
            assert raw is not None  # set by entering the transaction, as pycrdt asserts
            doc._doc.apply_update(raw, update)
            state = doc._doc.get_state(raw)
        # What lies beyond the document's state holds items (a non-zero
        # client count) only when part of the update waits for earlier ones.
        # (``pycrdt.get_state(update)`` cannot tell: it omits every client
        # whose items do not start at clock 0.)
        beyond = get_update(update, state)
    except Exception as exc:  # pycrdt raises bare exceptions for bad input
        raise UpdateError(f"not a valid update ({exc})") from None
    finally:
        loaded.watching = False
    if loaded.failed:
        raise UpdateError(f"the CRDT library failed on this update ({loaded.failed})")
    if author is not None:
        refusal = authorship.check(author, name, loaded.entries_changed, state, beyond)
        if refusal is not None:
            raise refusal
    return loaded.changes != before, beyond[:1] != b"\x00"
