"""The status the branch server keeps and pushes (``GET /api/v1/status``,
``GET /api/v1/events``).

One watcher task looks, every ``WATCH_S``, for anything that changes the
status: a commit by another connection (the sync loop's node thread,
another process: SQLite's ``data_version`` on the API thread's
connection), a write through the API (``touch``), a change of the sync
loop's state or progress, and at least every ``REFRESH_S`` (the heartbeat
of a sync loop in another process ages). It then (``COALESCE_S`` after a
change, so a burst of writes costs one computation) computes the status on the
API thread and, when it differs from the last, sends it to every event
subscriber. Reads of the status between changes cost no thread hop.

Bounds: at most ``MAX_SUBSCRIBERS`` event streams; each subscriber's queue
holds ``QUEUE_SIZE`` statuses and drops the oldest when full (each one is
a whole snapshot, so a slow reader only misses intermediate states).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

from ..jsonio import dumps as jsonio_bytes
from ..node import Node
from ..status import node_status
from ..transport import LiveSync, run_status
from ..transport.client import NodeThread
from ..users import StoredUser, User, check_token, load_users
from .errors import HttpError

log = logging.getLogger("branchline.server")

WATCH_S = 0.2
REFRESH_S = 2.0
#: After a change, the watcher waits this long before computing the status,
#: so a burst of writes costs one computation, not one each (a read that
#: needs the newest status computes it at once; event streams lag by this).
COALESCE_S = 0.05
MAX_SUBSCRIBERS = 64
QUEUE_SIZE = 8


class Subscriber:
    """One event stream's queue of status documents (JSON bytes)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=QUEUE_SIZE)

    def offer(self, data: bytes) -> None:
        if self.queue.full():
            self.queue.get_nowait()  # the newest snapshot supersedes the oldest
        self.queue.put_nowait(data)


class StatusHub:
    """Status cache, users cache and event fan-out of one server (loop side)."""

    def __init__(self, nt: NodeThread, live: LiveSync | None, wall_ms: Callable[[], int]) -> None:
        self._nt = nt
        self.live = live
        self._wall_ms = wall_ms
        self.status: dict[str, Any] | None = None
        self.status_json = b""
        self.users: list[StoredUser] = []
        # Tokens already checked, by their SHA-256: one hash per request
        # instead of one HMAC per user. Emptied whenever the users change,
        # so it never holds more entries than there are users.
        self._known: dict[bytes, User] = {}
        self.progress: dict[str, list[int]] = {}
        # Changes known (API writes, store commits seen by the watcher) and the
        # last of them the published status was computed after: a read waits
        # only while the status is older than what it needs, and concurrent
        # readers share one computation.
        self._changes = 1
        self._published = 0
        self._job: asyncio.Future[None] | None = None
        self._version = -1
        self._live_seen: tuple[Any, ...] = ()
        self._computed_at = 0.0
        self._subscribers: set[Subscriber] = set()
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    # -- the loop side -----------------------------------------------------------

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._watch(), name="branchline-status-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def touch(self) -> None:
        """A write went through the API: the next read computes the status."""
        self._changes += 1
        self._changed.set()

    def on_progress(self, collection: str, done: int, total: int) -> None:
        """The sync loop's progress callback (called on the event loop)."""
        self.progress[collection] = [done, total]
        self._changed.set()

    async def current(self) -> dict[str, Any]:
        """The status, computed again first if the API wrote since it was."""
        await self._fresh(self._changes)
        assert self.status is not None
        return self.status

    async def current_json(self) -> bytes:
        await self.current()
        return self.status_json

    async def refresh(self) -> None:
        """Compute the status again (and reload users if the store changed);
        publish it when it differs."""
        self._changes += 1
        await self._fresh(self._changes)

    async def _fresh(self, needed: int) -> None:
        """Return once the published status was computed after change
        ``needed``. One computation runs at a time; every reader waiting
        shares it, or the next one if it started too early."""
        while self._published < needed:
            job = self._job
            # A job already done (its done callback not run yet) would be
            # awaited without yielding, forever: the callback never got to run
            # and the whole server spun on one status request.
            if job is None or job.done():
                job = self._job = asyncio.ensure_future(self._compute_and_publish())
                job.add_done_callback(self._job_done)
            await asyncio.shield(job)

    def _job_done(self, job: asyncio.Future[None]) -> None:
        if self._job is job:
            self._job = None
        if not job.cancelled():
            job.exception()  # retrieved here: every waiter also gets it raised

    async def _compute_and_publish(self) -> None:
        covers = self._changes
        run = self._run_info()
        version, users, status = await self._nt.run(self._compute, run, self._version)
        if users is not None:
            self.users = users
            self._known = {}
        self._version = version
        status["sync"] = self._sync_info()
        self._computed_at = time.monotonic()
        data = jsonio_bytes(status)
        if data != self.status_json:
            self.status, self.status_json = status, data
            for sub in self._subscribers:
                sub.offer(data)
        self._published = max(self._published, covers)

    def user_for(self, token: str) -> User | None:
        """The user whose token this is (engine.users.check_token), or None."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        user = self._known.get(digest)
        if user is None:
            user = check_token(self.users, token)
            if user is not None:
                self._known[digest] = user
        return user

    def subscribe(self) -> Subscriber:
        """A new event stream. Raises HttpError 503 past ``MAX_SUBSCRIBERS``."""
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            raise HttpError(
                503,
                "too_many_streams",
                f"{MAX_SUBSCRIBERS} event streams are open on this server; close one "
                "(another tab or workstation) and try again",
            )
        sub = Subscriber()
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    # -- internals ---------------------------------------------------------------

    def _compute(
        self, node: Node, run: dict[str, Any] | None, seen: int
    ) -> tuple[int, list[StoredUser] | None, dict[str, Any]]:
        """API thread: (data version, users if the store changed, status)."""
        version = node.store.data_version()
        users = load_users(node) if version != seen else None
        now = self._wall_ms()
        if run is not None:
            run = {**run_status(node, now), **run}
        return version, users, node_status(node, now, run)

    def _run_info(self) -> dict[str, Any] | None:
        if self.live is None:
            return None  # a sync loop of another process, by its heartbeat
        return {"online": self.live.online, "state": self.live.state}

    def _sync_info(self) -> dict[str, Any]:
        live = self.live
        running = live is not None and (
            live.state == "connecting" or (live.online and not live.synced)
        )
        return {"running": running, "progress": dict(sorted(self.progress.items()))}

    def _live_key(self) -> tuple[Any, ...]:
        live = self.live
        if live is None:
            return ()
        return (live.state, live.online, live.synced)

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=WATCH_S)
                await asyncio.sleep(COALESCE_S)
            self._changed.clear()
            try:
                version = await self._nt.run(_data_version)
                key = self._live_key()
                due = time.monotonic() - self._computed_at >= REFRESH_S
                if (
                    self._published < self._changes
                    or version != self._version
                    or key != self._live_seen
                    or self.progress != (self.status or {}).get("sync", {}).get("progress")
                    or due
                ):
                    self._live_seen = key
                    await self.refresh()
            except Exception:  # keep watching: a busy store now is not a dead server
                log.exception("status refresh failed")
                await asyncio.sleep(WATCH_S)


def _data_version(node: Node) -> int:
    return node.store.data_version()
