"""Soak with real processes: a relay and several nodes on loopback, through
fault-injecting proxies, under a random workload and a nemesis that kills and
restarts processes; then heal, converge and check (docs/reliability.md).

It lives in the engine package (not only in ``bench/``) so that it is
type-checked with the engine, runs as ``python -m harness.soak`` wherever
Branchline is installed, and its end-of-run checks (``harness.soak.checks``)
can be reused by other harnesses such as a deterministic simulator.
"""

from __future__ import annotations

from .runner import (
    EXIT_CORRECTNESS,
    EXIT_CRASH,
    EXIT_LIVENESS,
    EXIT_OK,
    SoakConfig,
    run_soak,
    schedule,
)

__all__ = [
    "EXIT_CORRECTNESS",
    "EXIT_CRASH",
    "EXIT_LIVENESS",
    "EXIT_OK",
    "SoakConfig",
    "run_soak",
    "schedule",
]
