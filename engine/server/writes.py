"""Group commit for the API's writes.

Writes that arrive while the API thread is busy wait here and then run
together on it in one transaction (``Node.batch``: each in a savepoint of
its own, one commit for all), so ten workstations posting at once pay for
one durable commit rather than ten in a row. A write is answered only after
the commit that holds it. At most ``MAX_BATCH`` writes share a commit.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, TypeVar

from ..node import Node
from ..transport.client import NodeThread

T = TypeVar("T")

MAX_BATCH = 64


class WriteGroup:
    """The queue of writes of one server (loop side)."""

    def __init__(self, nt: NodeThread) -> None:
        self._nt = nt
        self._queue: list[tuple[Callable[[Node], Any], asyncio.Future[Any]]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(node, *args)`` on the API thread, durable on return; raises
        what ``fn`` raises (its changes undone, the other writes kept)."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.append((functools.partial(_call, fn, args), fut))
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain(), name="branchline-api-writes")
        return await fut

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                try:
                    results = await self._nt.run(Node.batch, [call for call, _ in batch])
                except Exception as exc:  # the commit itself failed: none is durable
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), (ok, value) in zip(batch, results, strict=True):
                    if fut.done():
                        continue  # its request went away; the write stands
                    if ok:
                        fut.set_result(value)
                    else:
                        fut.set_exception(value)
        finally:
            self._drainer = None


def _call(fn: Callable[..., Any], args: tuple[Any, ...], node: Node) -> Any:
    return fn(node, *args)
