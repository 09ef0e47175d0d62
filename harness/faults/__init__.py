"""Fault injection for tests and the soak: a loopback TCP proxy that delays,
cuts and resets connections (``harness.faults.proxy``)."""

from __future__ import annotations

from .proxy import FaultProxy, ProxyCounters, ProxyHost

__all__ = ["FaultProxy", "ProxyCounters", "ProxyHost"]
