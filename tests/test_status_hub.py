"""The branch server's status cache (engine/server/hub.py) below the HTTP layer."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from engine.server.hub import StatusHub


class _Thread:
    """Stands in for the API thread: runs the status computation at once."""

    async def run(self, fn: Any, *args: Any) -> Any:
        return 1, None, {"pending_total": 0}


def test_a_read_behind_a_finished_computation_is_answered_not_spun() -> None:
    # Seen on a live server: a computation finished, and in the same loop
    # iteration (before its done callback ran) a status read arrived needing a
    # later change. The read awaited the finished job again and again without
    # ever yielding, so the callback never ran and the server spun on one
    # core, answering nothing. The read must start a new computation.
    answered: list[dict[str, Any]] = []

    async def scenario() -> None:
        hub = StatusHub(_Thread(), None, lambda: 0)
        finished = asyncio.get_running_loop().create_future()
        finished.set_result(None)
        hub._job = finished  # its done callback has not run yet
        hub.touch()
        answered.append(await hub.current())

    worker = threading.Thread(target=asyncio.run, args=(scenario(),), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "the status read spun instead of computing"
    assert answered and answered[0]["pending_total"] == 0
