"""Turns at a store file's write lock, in arrival order, for the threads of
one process.

SQLite serializes writers, but not fairly: a waiting writer polls the lock
with sleeps of up to 100 ms, so a thread that commits and begins again at
once (a catch-up imported slice by slice) keeps it nearly all the time, and
a branch server's ``put`` on another thread waits for the whole catch-up.
Every ``NodeStore`` of one file in this process takes a turn here before
``BEGIN IMMEDIATE``: whoever waits longest writes next. Other processes
still meet at SQLite's lock alone.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import deque
from pathlib import Path


class WriteTurns:
    """A first-come, first-served lock that gives up after a timeout."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()  # the holder first, then the waiting

    def take(self, timeout_s: float) -> bool:
        """Wait for this thread's turn; False (and no turn) after ``timeout_s``."""
        me = object()
        with self._cond:
            self._queue.append(me)
            if self._cond.wait_for(lambda: self._queue[0] is me, timeout_s):
                return True
            self._queue.remove(me)
            self._cond.notify_all()
            return False

    def give(self) -> None:
        """End the turn ``take`` gave; the longest waiting thread goes next."""
        with self._cond:
            self._queue.popleft()
            self._cond.notify_all()

    def waiting(self) -> int:
        """Threads waiting for a turn (not counting the one holding it)."""
        with self._cond:
            return max(0, len(self._queue) - 1)


_turns: weakref.WeakValueDictionary[str, WriteTurns] = weakref.WeakValueDictionary()
_registry = threading.Lock()


def turns_of(path: Path) -> WriteTurns:
    """The turns of the store file at ``path`` (shared by every store of this
    process that keeps a reference; forgotten when none does)."""
    key = os.path.realpath(path)
    with _registry:
        turns = _turns.get(key)
        if turns is None:
            turns = _turns[key] = WriteTurns()
        return turns
