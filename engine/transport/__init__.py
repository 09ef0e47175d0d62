"""The asyncio edge of node sync: websockets, reconnect, offline mode
(docs/sync.md). ``engine.sync`` holds the sans-I/O logic it drives."""

from .client import (
    STALE_AFTER_MS,
    Backoff,
    LiveSync,
    is_offline,
    node_sync,
    relay_of,
    run_status,
    safe_url,
    set_offline,
)

__all__ = [
    "STALE_AFTER_MS",
    "Backoff",
    "LiveSync",
    "is_offline",
    "node_sync",
    "relay_of",
    "run_status",
    "safe_url",
    "set_offline",
]
