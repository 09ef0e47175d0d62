"""The capture pump: while a node runs (``node run``, ``node serve``), what
its captured tables queue is written within ``POLL_S``, online or not.

``async with CapturePump(nt): ...`` drains on the node thread ``nt``, one
batch per call (``Node.drain_captured``), so other calls of that thread
(a sync step, an API request) take turns with a long drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..errors import BranchlineError
from ..node import Node
from .client import NodeThread

log = logging.getLogger("branchline.capture")

#: How often an idle pump looks at the queue (one indexed read per look).
POLL_S = 0.05
#: After a failed drain (the store busy for long, a damaged file): wait this long.
ERROR_WAIT_S = 5.0


class CapturePump:
    """Drains ``nt``'s node's capture queue while the context is open."""

    def __init__(self, nt: NodeThread, poll_s: float = POLL_S) -> None:
        self._nt = nt
        self._poll_s = poll_s
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Changes written and quarantined since the pump started.
        self.written = 0
        self.quarantined = 0

    async def __aenter__(self) -> CapturePump:
        self._task = asyncio.create_task(self._run(), name="branchline-capture-pump")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while not self._stop.is_set():
            wait = self._poll_s
            try:
                done = await self._nt.run(Node.drain_captured)
            except BranchlineError as exc:
                log.warning("cannot write captured changes now: %s", exc)
                wait = ERROR_WAIT_S
            else:
                self.written += done.written
                self.quarantined += done.quarantined
                if done.quarantined:
                    log.warning(
                        "%d captured change(s) quarantined: see 'branchline failures'",
                        done.quarantined,
                    )
                if done.changes:
                    wait = 0  # more may be queued
            if wait:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), wait)
            else:
                await asyncio.sleep(0)
