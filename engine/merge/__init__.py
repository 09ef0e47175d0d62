"""The merge core: multi-value registers over per-node record entries.

Pure and deterministic: no I/O, no pycrdt. See ``record.py`` and
docs/architecture.md ("Merge semantics").
"""

from .record import (
    ALIAS,
    CREATED,
    DELETED,
    JOURNAL,
    Competitor,
    FieldConflict,
    Resolved,
    new_state,
    resolve,
    seen_by,
    well_formed,
)

__all__ = [
    "ALIAS",
    "CREATED",
    "DELETED",
    "JOURNAL",
    "Competitor",
    "FieldConflict",
    "Resolved",
    "new_state",
    "resolve",
    "seen_by",
    "well_formed",
]
