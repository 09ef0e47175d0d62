"""The pycrdt edge: one flat Yjs Map per document, records as per-node entries."""

from .document import RecordDoc, trim_heap
from .statevec import decode_state_vector, encode_state_vector, is_behind

__all__ = ["RecordDoc", "decode_state_vector", "encode_state_vector", "is_behind", "trim_heap"]
