"""The merge core: multi-value registers over per-node record entries.

Pure and deterministic: no I/O, no pycrdt. See ``record.py`` and
docs/architecture.md ("Merge semantics").
"""

from .record import (
    CREATED,
    DELETED,
    Competitor,
    FieldConflict,
    Resolved,
    new_state,
    resolve,
    seen_by,
    well_formed,
)

__all__ = [
    "CREATED",
    "DELETED",
    "Competitor",
    "FieldConflict",
    "Resolved",
    "new_state",
    "resolve",
    "seen_by",
    "well_formed",
]
