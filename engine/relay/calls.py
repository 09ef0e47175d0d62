"""The relay core's store calls and their answers, as data.

``RelayHub`` (``hub.py``) never touches the store: it hands out these calls
and takes their answers back. ``StoreRunner`` (``runner.py``) executes them
against a ``RelayStore``; the asyncio server runs it in its store thread, the
simulator and test relays call it inline. Answers carry failures as data, so
the same core sees the same thing whoever ran the call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .store import Appended, Logged, NodeGrant


@dataclass(frozen=True)
class Authenticate:
    """Check a hello: the node's token for ``dataset``, and the dataset's documents."""

    conn: int
    dataset: str
    node: str
    token: str = field(repr=False)


@dataclass(frozen=True)
class HelloAnswer:
    """``grant`` and the dataset's ``documents``, or (grant None) the error
    ``code`` and ``message`` that refuse the hello."""

    grant: NodeGrant | None
    documents: tuple[str, ...] = ()
    code: str = ""
    message: str = ""
    #: The dataset's position, read before the documents (and so before any
    #: diff of the connection): where following other relays' commits starts.
    head: int | None = None


@dataclass(frozen=True)
class Diff:
    """What ``dataset``'s ``doc`` holds beyond ``state_vector``, and the relay's state vector."""

    conn: int
    dataset: str
    doc: str
    state_vector: bytes


@dataclass(frozen=True)
class DiffAnswer:
    """The diff and state vector; or ``code`` and ``message`` of the error
    that ends the session (the store could not answer)."""

    diff: bytes = b""
    state_vector: bytes = b""
    code: str = ""
    message: str = ""


@dataclass(frozen=True)
class Lease:
    """Lease ``count`` numbers of the blocks series ``series`` for ``node``."""

    conn: int
    ref: int
    dataset: str
    series: str
    count: int
    node: str


@dataclass(frozen=True)
class LeaseAnswer:
    """The range ``first``..``last``, or (``denied`` not empty) why not."""

    first: int = 0
    last: int = 0
    denied: str = ""


class QueuedUpdate(Protocol):
    """An update the core holds for a commit: what ``UpdateIn`` carries."""

    @property
    def doc(self) -> str: ...
    @property
    def data(self) -> bytes: ...
    @property
    def node(self) -> str: ...


@dataclass(frozen=True)
class Append:
    """One group commit of ``dataset``: ``append_updates`` of ``updates``
    (document, bytes and sending node of each, in arrival order). The
    runner makes the store's ``UpdateIn``s of them, off the event loop."""

    dataset: str
    updates: tuple[QueuedUpdate, ...]


@dataclass(frozen=True)
class Batch:
    """A group commit over datasets: one ``Append`` each, in queue order.
    ``id`` orders batches: they are settled in the order they were taken."""

    id: int
    appends: tuple[Append, ...]


@dataclass(frozen=True)
class BatchOutcome:
    """Per dataset of a batch: the results of its ``Append``, or the error
    that kept all of it out of the store; and the seconds each successful
    commit took (for the metrics)."""

    results: dict[str, list[Appended] | BaseException]
    seconds: tuple[float, ...] = ()


@dataclass(frozen=True)
class Follow:
    """Read what ``dataset`` logged after ``after`` (``logged_after``, at most
    ``limit``): commits of other relays on the same store to fan out.
    ``barrier`` is the id of the last batch taken when it was asked: the core
    holds the answer until that batch is settled (its own rows are then known)."""

    dataset: str
    after: int
    limit: int
    barrier: int


#: The answer of a ``Follow``: the rows, or None when compaction folded some away.
FollowAnswer = list[Logged] | None

StoreCall = Authenticate | Diff | Lease | Batch | Follow
