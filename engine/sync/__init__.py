"""Sans-I/O sync glue between a ``Node`` and a protocol ``ClientSession``
(docs/sync.md). No asyncio here; ``engine.transport`` drives it."""

from ..errors import RelayRefused, RelayUnreachable, SyncError, SyncTimeout
from .driver import (
    MAX_LIVE_BATCH,
    Progress,
    ProgressCallback,
    SyncDriver,
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
