"""The pycrdt edge: one flat Yjs Map per document, records as per-node entries."""

from .document import MAX_MERGE, RecordDoc, merge, trim_heap
from .statevec import decode_state_vector, encode_state_vector, is_behind

__all__ = [
    "MAX_MERGE",
    "RecordDoc",
    "decode_state_vector",
    "encode_state_vector",
    "is_behind",
    "merge",
    "trim_heap",
]
