"""``Outage``: when a store whose server went away tries to reach it again.

While the server is down every call would otherwise try to connect (and,
with a host that does not answer, wait the connect timeout each time, with
the store thread blocked). Instead the first failure starts an outage: calls
fail at once (StoreUnavailable) until the retry time, which backs off from
``first_s`` to ``max_s``; the first connection that works ends it. Sans-I/O:
the caller reports what happened and gives the clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import StoreUnavailable


@dataclass
class Outage:
    """Not thread-safe: the store calls it under its own lock."""

    clock: Callable[[], float]
    first_s: float = 0.1
    max_s: float = 2.0
    since: float | None = None  # clock() at the first failure, while down
    reason: str = ""
    _retry_at: float = field(default=0.0, repr=False)
    _wait_s: float = field(default=0.0, repr=False)

    def check(self, what: str) -> None:
        """Returns when a connection may be tried now; raises StoreUnavailable
        (saying since when and why) while the outage waits for its retry."""
        if self.since is not None and self.clock() < self._retry_at:
            down = self.clock() - self.since
            raise StoreUnavailable(
                f"{what}: PostgreSQL unreachable for {down:.1f} s ({self.reason}); "
                "nothing was done, retrying"
            )

    def failed(self, reason: str, *, retry_now: bool = False) -> bool:
        """A connection failed (or was lost: ``retry_now``, as a server that
        cut one session usually takes the next). True when this starts the
        outage (log it once)."""
        now = self.clock()
        starts = self.since is None
        if starts:
            self.since, self._wait_s = now, self.first_s
        else:
            self._wait_s = min(self.max_s, self._wait_s * 2)
        self.reason = reason
        self._retry_at = now if retry_now else now + self._wait_s
        return starts

    def ended(self) -> float | None:
        """A connection works: the outage's length in seconds, or None when
        there was none."""
        if self.since is None:
            return None
        down, self.since, self.reason = self.clock() - self.since, None, ""
        return down
