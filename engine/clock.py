"""Time and randomness, injected so tests and simulations replay from a seed.

``SystemClock`` and ``SystemRandom`` are the production defaults; tests pass a
``ManualClock`` and a seeded ``random.Random``.
"""

from __future__ import annotations

import random
import time
from typing import Protocol


class Clock(Protocol):
    """Anything that tells wall-clock time in milliseconds since the Unix epoch."""

    def wall_ms(self) -> int: ...


class SystemClock:
    """The machine's clock."""

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when told to; for tests and simulation."""

    def __init__(self, start_ms: int = 1_767_225_600_000) -> None:  # 2026-01-01
        self.now_ms = start_ms

    def wall_ms(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> None:
        self.now_ms += ms


def system_random() -> random.Random:
    """A random source seeded from the OS, for production use."""
    return random.Random(random.SystemRandom().getrandbits(64))


# A hybrid logical clock timestamp is one int: wall milliseconds in the high
# bits, a 16-bit counter in the low bits. It fits easily in 63 bits, so it is
# exact in JSON and in SQLite.
COUNTER_BITS = 16
COUNTER_MASK = (1 << COUNTER_BITS) - 1


def hlc_pack(ms: int, counter: int = 0) -> int:
    return (ms << COUNTER_BITS) | counter


def hlc_wall_ms(hlc: int) -> int:
    return hlc >> COUNTER_BITS


class HybridClock:
    """Hybrid logical clock: monotonic, close to wall time, ahead of all it has seen.

    ``tick(at_least)`` returns a timestamp greater than every timestamp it
    returned before and greater than ``at_least`` (typically the newest
    timestamp observed in the data being overwritten).
    """

    def __init__(self, clock: Clock, last: int = 0) -> None:
        self._clock = clock
        self.last = last

    def tick(self, at_least: int = 0) -> int:
        now = hlc_pack(self._clock.wall_ms())
        self.last = max(now, self.last + 1, at_least + 1)
        return self.last

    def observe(self, hlc: int) -> None:
        """Move past a timestamp seen in replicated data."""
        if hlc > self.last:
            self.last = hlc
