"""What the sync loop logs about reaching the relay: each change of state
once, and a periodic summary while a state repeats (docs/operations.md,
"Logs of node run and node serve").

With the relay down, the loop tries again every few seconds forever; one
line per attempt is ~57,000 lines a day. ``ReachLog`` logs the first failure
("offline: why"), a new reason when the reason changes, "online again" with
how many attempts it took, and every ``summary_every_ms`` a summary (how long
offline, attempts since the last success, what waits to go up). It is pure:
time comes from ``monotonic_ms``, what is pending from the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

#: While offline, a summary line this often.
SUMMARY_EVERY_MS = 300_000


class ReachLog:
    """Decides which of the sync loop's connection events are logged.

    Every line goes to ``log`` with ``extra={"event": ...}`` (``offline``,
    ``still_offline``, ``online``, ``summary``) for structured handlers.
    """

    def __init__(
        self,
        log: logging.Logger,
        monotonic_ms: Callable[[], int],
        *,
        summary_every_ms: int = SUMMARY_EVERY_MS,
    ) -> None:
        self._log = log
        self._now = monotonic_ms
        self._every = summary_every_ms
        self.offline_since: int | None = None  # monotonic ms of the first failure
        self.attempts = 0  # failed attempts since the last success
        self._reason: str | None = None
        self._summary_at = 0
        self._ever_online = False

    def failed(self, reason: str, level: int = logging.WARNING) -> None:
        """A connection attempt failed (or a session broke) because of ``reason``."""
        now = self._now()
        self.attempts += 1
        if self.offline_since is None:
            self.offline_since = now
            self._summary_at = now
            self._reason = reason
            self._log.log(level, "offline: %s", reason, extra={"event": "offline"})
        elif reason != self._reason:
            self._reason = reason
            self._log.log(level, "still offline: %s", reason, extra={"event": "still_offline"})

    def due(self) -> bool:
        """Whether a summary is due (offline for another ``summary_every_ms``)."""
        return self.offline_since is not None and self._now() - self._summary_at >= self._every

    def summary(self, pending: dict[str, int]) -> None:
        """Log the summary of this offline spell; ``pending`` counts records
        per collection waiting to go up."""
        if self.offline_since is None:
            return
        now = self._now()
        self._summary_at = now
        total = sum(pending.values())
        waiting = ", ".join(f"{c} {n}" for c, n in sorted(pending.items()) if n)
        self._log.info(
            "offline for %s: %d attempts since the last success, %d records waiting to go up%s; "
            "last error: %s",
            _duration(now - self.offline_since),
            self.attempts,
            total,
            f" ({waiting})" if waiting else "",
            self._reason,
            extra={"event": "summary", "attempts": self.attempts, "pending_total": total},
        )

    def online(self, url: str) -> None:
        """A session with the relay is open."""
        if self.offline_since is not None:
            self._log.info(
                "online again (%s) after %d failed attempts in %s",
                url,
                self.attempts,
                _duration(self._now() - self.offline_since),
                extra={"event": "online", "attempts": self.attempts},
            )
        elif not self._ever_online:
            self._log.info("online (%s)", url, extra={"event": "online"})
        self._ever_online = True
        self.offline_since = None
        self.attempts = 0
        self._reason = None


def _duration(ms: int) -> str:
    seconds = max(ms, 0) // 1000
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
