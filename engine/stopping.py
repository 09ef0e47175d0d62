"""Stopping a long-running command (``node run``, ``node serve``) on Ctrl-C
within ``STOP_GRACE_S``, with the shell's exit code for SIGINT (130).

A clean stop ends the sync session and closes the store. When something
cannot be interrupted in time (the node thread importing a batch, a
connection attempt), the process ends anyway once the grace is over: every
commit is durable when it returns (WAL, ``synchronous=FULL``), a transaction
in flight rolls back at the next open, and what it was receiving was not yet
acknowledged, so the relay sends it again. Nothing is lost; it is the same
as the crash the crash tests cover, but with the logs flushed first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading

#: Ctrl-C is answered within this (plus the interpreter's reaction time).
STOP_GRACE_S = 0.1
#: What a shell reports for a process ended by SIGINT (128 + 2).
SIGINT_EXIT = 128 + signal.SIGINT


def exit_soon(code: int, grace_s: float = STOP_GRACE_S) -> threading.Timer:
    """End the process with ``code`` after ``grace_s`` seconds unless it has
    ended by then; log handlers and stdio are flushed first. Returns the
    (daemon) timer."""

    def fire() -> None:
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)

    timer = threading.Timer(grace_s, fire)
    timer.daemon = True
    timer.start()
    return timer
