"""The relay: durable store (``store``, ``sqlite_store``) and admin CLI (``cli``)."""

from .sqlite_store import RelayLimits, SqliteRelayStore
from .store import (
    EMPTY_STATE_VECTOR,
    EMPTY_UPDATE,
    Appended,
    DatasetInfo,
    DocumentInfo,
    Enrollment,
    NodeGrant,
    NodeInfo,
    RelayStore,
    UpdateIn,
)

__all__ = [
    "EMPTY_STATE_VECTOR",
    "EMPTY_UPDATE",
    "Appended",
    "DatasetInfo",
    "DocumentInfo",
    "Enrollment",
    "NodeGrant",
    "NodeInfo",
    "RelayLimits",
    "RelayStore",
    "SqliteRelayStore",
    "UpdateIn",
]
