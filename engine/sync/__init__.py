"""Sans-I/O sync glue between a ``Node`` and a protocol ``ClientSession``
(docs/sync.md). No asyncio here; ``engine.transport`` drives it."""

from .driver import (
    MAX_LIVE_BATCH,
    Progress,
    ProgressCallback,
    RelayRefused,
    RelayUnreachable,
    SyncDriver,
    SyncError,
    SyncTimeout,
    failure_counts,
    record_failure,
    upload_order,
)

__all__ = [
    "MAX_LIVE_BATCH",
    "Progress",
    "ProgressCallback",
    "RelayRefused",
    "RelayUnreachable",
    "SyncDriver",
    "SyncError",
    "SyncTimeout",
    "failure_counts",
    "record_failure",
    "upload_order",
]
