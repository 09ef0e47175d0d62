"""The relay: durable store (``store``, ``sqlite_store``) and admin CLI (``cli``)."""

from .doccache import RelayLimits
from .sqlite_store import SqliteRelayStore
from .store import (
    EMPTY_STATE_VECTOR,
    EMPTY_UPDATE,
    Appended,
    DatasetInfo,
    DocumentInfo,
    Enrollment,
    Logged,
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
    "Logged",
    "NodeGrant",
    "NodeInfo",
    "RelayLimits",
    "RelayStore",
    "SqliteRelayStore",
    "UpdateIn",
]
