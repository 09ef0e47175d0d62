"""Write-back capture (docs/capture.md): an app keeps writing its own SQLite
table in the node store; triggers queue its changes in the app's own
transaction (``engine.store.capture``), the node turns them into replicated writes
(``drain``), and changes from other nodes are written back into the table
without being captured again (``writeback``)."""

from ..store.capture import FailureRow
from .drain import DRAIN_BATCH, Capture, Drained
from .spec import META_KEY, CaptureSpec, plan, specs_of, specs_to_meta

__all__ = [
    "DRAIN_BATCH",
    "META_KEY",
    "Capture",
    "CaptureSpec",
    "Drained",
    "FailureRow",
    "plan",
    "specs_of",
    "specs_to_meta",
]
