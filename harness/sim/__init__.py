"""Deterministic simulation: a relay and nodes on one thread, virtual time,
a seeded network and nemesis (``world.py``); ``python -m harness.sim`` runs
seeds and prints a replay command for any that fails (``__main__.py``)."""

from .world import Faults, SimFailure, Stats, World

__all__ = ["Faults", "SimFailure", "Stats", "World"]
