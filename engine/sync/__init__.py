"""Sans-I/O sync glue between a ``Node`` and a protocol ``ClientSession``
(docs/sync.md). No asyncio here; ``engine.transport`` drives it."""

from ..errors import (
    RelayRefused,
    RelayUnreachable,
    SyncError,
    SyncIncomplete,
    SyncTimeout,
    UpdatesRefused,
)
from .driver import MAX_LIVE_BATCH, Progress, ProgressCallback, SyncDriver, upload_order
from .failures import Failure, failure_counts, list_failures, record_failure, retry

__all__ = [
    "MAX_LIVE_BATCH",
    "Failure",
    "Progress",
    "ProgressCallback",
    "RelayRefused",
    "RelayUnreachable",
    "SyncDriver",
    "SyncError",
    "SyncIncomplete",
    "SyncTimeout",
    "UpdatesRefused",
    "failure_counts",
    "list_failures",
    "record_failure",
    "retry",
    "upload_order",
]
