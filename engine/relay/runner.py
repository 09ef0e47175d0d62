"""Executes the relay core's store calls (``calls.py``) against a ``RelayStore``.

The only part of the relay core's loop that touches the store; synchronous
(the asyncio server runs it in its store thread, the simulator and test
relays inline). Every failure comes back as data in the answer: ``run``
raises nothing but a bug of its own.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

from ..errors import (
    AuthError,
    BranchlineError,
    NodeRevoked,
    StoreError,
    StoreUnavailable,
    UnknownDataset,
    UpdateError,
)
from ..protocol import codes
from .calls import (
    Append,
    Authenticate,
    Batch,
    BatchOutcome,
    Diff,
    DiffAnswer,
    Follow,
    FollowAnswer,
    HelloAnswer,
    Lease,
    LeaseAnswer,
)
from .store import Appended, NodeGrant, RelayStore, UpdateIn

log = logging.getLogger("branchline.relay")

#: How long a failed-auth lookup of "which dataset is this node in" may reuse
#: the node list it read from the store (bounds the cost of bad hellos).
HOMES_TTL_S = 30.0
#: Other datasets tried per failed hello (bounds the cost of one bad hello).
MAX_HOMES_TRIED = 64
UNREACHABLE = "the relay cannot reach its store now (nothing was kept); retry later"


class StoreRunner:
    """Runs store calls on ``store``. ``now_s`` (monotonic seconds) dates the
    failed-auth node list; ``timer`` (seconds) times commits for the metrics;
    ``wall_ms`` dates when nodes were last seen."""

    def __init__(
        self,
        store: RelayStore,
        *,
        now_s: Callable[[], float] = time.monotonic,
        timer: Callable[[], float] = time.perf_counter,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self.store = store
        self._wall_ms = wall_ms
        self._now_s = now_s
        self._timer = timer
        self._homes: dict[str, list[str]] = {}  # node name -> datasets
        self._homes_read: float | None = None

    def run(self, call: Authenticate | Lease | Diff) -> HelloAnswer | LeaseAnswer | DiffAnswer:
        """The answer of one call of a connection (``RelayHub.answer`` takes it)."""
        if isinstance(call, Authenticate):
            return self.authenticate(call)
        if isinstance(call, Lease):
            return self.lease(call)
        return self.diff(call)

    def authenticate(self, call: Authenticate) -> HelloAnswer:
        """The grant and documents of a hello, or why it is refused
        (``auth_failed``, ``wrong_dataset``, ``internal``)."""
        try:
            grant = self.store.authenticate(call.dataset, call.node, call.token)
            self.note_seen(grant)
            head = self.store.head(call.dataset)  # before the documents: see HelloAnswer
            return HelloAnswer(grant, tuple(self.store.documents(call.dataset)), head=head)
        except NodeRevoked as exc:
            return HelloAnswer(None, (), codes.AUTH_FAILED, str(exc))
        except AuthError as exc:
            home = self._home_of(call.dataset, call.node, call.token)
            if home is not None:
                # Safe to name it: the token proves the caller is that node.
                return HelloAnswer(
                    None,
                    (),
                    codes.WRONG_DATASET,
                    f"node {call.node!r} is enrolled in dataset {home!r}, not "
                    f"{call.dataset!r}; configure the node with its own dataset",
                )
            return HelloAnswer(None, (), codes.AUTH_FAILED, str(exc))
        except UnknownDataset as exc:
            return HelloAnswer(None, (), codes.WRONG_DATASET, str(exc))
        except StoreUnavailable:  # the store logged the outage once
            return HelloAnswer(None, (), codes.UNAVAILABLE, UNREACHABLE)
        except Exception:
            log.exception("authentication of node %r failed internally", call.node)
            return HelloAnswer(None, (), codes.INTERNAL, "the relay store failed; retry later")

    def note_seen(self, grant: NodeGrant) -> None:
        """Record now as the node's last-seen time (``relay status``); a store
        that cannot write it does not stop the session."""
        try:
            self.store.note_seen(grant.dataset, grant.node, self._wall_ms())
        except StoreError as exc:
            log.warning("cannot record when node %r was last seen: %s", grant.node, exc)

    def _home_of(self, dataset: str, node: str, token: str) -> str | None:
        """The other dataset whose ``node`` this token opens, if any."""
        now = self._now_s()
        if self._homes_read is None or now - self._homes_read >= HOMES_TTL_S:
            homes: dict[str, list[str]] = {}
            for info in self.store.status():
                for n in info.nodes:
                    homes.setdefault(n.name, []).append(info.name)
            self._homes, self._homes_read = homes, now
        for other in self._homes.get(node, [])[:MAX_HOMES_TRIED]:
            if other == dataset:
                continue
            with contextlib.suppress(AuthError, UnknownDataset):
                self.store.authenticate(other, node, token)
                return other
        return None

    def diff(self, call: Diff) -> DiffAnswer:
        """The diff then the state vector (read after it, so it covers at
        least the diff: the client never asks for less than it was sent)."""
        try:
            diff = self.store.diff(call.dataset, call.doc, call.state_vector)
            return DiffAnswer(diff, self.store.state_vector(call.dataset, call.doc))
        except UpdateError as exc:
            return DiffAnswer(code=codes.BAD_UPDATE, message=str(exc))
        except StoreUnavailable:
            return DiffAnswer(code=codes.UNAVAILABLE, message=UNREACHABLE)
        except Exception:
            log.exception("sync of %r failed", call.doc)
            return DiffAnswer(
                code=codes.INTERNAL, message="the relay store failed; reconnect later"
            )

    def follow(self, call: Follow) -> FollowAnswer:
        """The rows ``call`` asks for. Raises what ``logged_after`` raises
        (StoreError while the store is unreachable: the driver retries)."""
        return self.store.logged_after(call.dataset, call.after, call.limit)

    def lease(self, call: Lease) -> LeaseAnswer:
        """The leased range, or why it was denied."""
        try:
            first, last = self.store.lease(call.dataset, call.series, call.count, node=call.node)
        except StoreUnavailable:
            return LeaseAnswer(denied=UNREACHABLE)
        except BranchlineError as exc:
            return LeaseAnswer(denied=str(exc))
        except Exception:
            log.exception("lease of %r failed", call.series)
            return LeaseAnswer(denied="the relay store failed; retry later")
        return LeaseAnswer(first, last)

    def commit(self, batch: Batch) -> BatchOutcome:
        """One ``append_updates`` per dataset of the batch; a dataset whose
        commit raised is reported as such, the others go on."""
        results: dict[str, list[Appended] | BaseException] = {}
        seconds: list[float] = []
        for append in batch.appends:
            results[append.dataset] = self._append(append, seconds)
        return BatchOutcome(results, tuple(seconds))

    def _append(self, append: Append, seconds: list[float]) -> list[Appended] | BaseException:
        started = self._timer()
        try:
            out = self.store.append_updates(
                append.dataset, [UpdateIn(u.doc, u.data, u.node) for u in append.updates]
            )
        except Exception as exc:  # reported per dataset; others go on
            return exc
        seconds.append(self._timer() - started)
        return out
