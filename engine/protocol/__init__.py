"""Sans-I/O sync protocol (docs/protocol.md): frames, messages, and the client
and relay session state machines. No asyncio, sockets, SQLite or clocks here:
drivers feed received frames and the time in, and send what comes out."""

from . import codes
from .client import EMPTY_STATE_VECTOR, ClientSession
from .events import (
    Acked,
    DiffReceived,
    ErrorReceived,
    Event,
    HeartbeatTimeout,
    HelloReceived,
    LeaseDenied,
    LeaseGranted,
    LeaseRequested,
    Opened,
    RemoteState,
    SyncComplete,
    SyncRequested,
    UpdateReceived,
    UpdateRefused,
)
from .frames import decode_frame, encode_frame
from .limits import DEAD_AFTER_INTERVALS, DEFAULT_HEARTBEAT_MS, PROTOCOL_VERSIONS, Limits
from .messages import Message, decode_message, encode_message
from .relay import EncodedUpdates, RelaySession, encode_updates
from .session import TIMEOUT, Session, SessionState

__all__ = [
    "DEAD_AFTER_INTERVALS",
    "DEFAULT_HEARTBEAT_MS",
    "EMPTY_STATE_VECTOR",
    "PROTOCOL_VERSIONS",
    "TIMEOUT",
    "Acked",
    "ClientSession",
    "DiffReceived",
    "EncodedUpdates",
    "ErrorReceived",
    "Event",
    "HeartbeatTimeout",
    "HelloReceived",
    "LeaseDenied",
    "LeaseGranted",
    "LeaseRequested",
    "Limits",
    "Message",
    "Opened",
    "RelaySession",
    "RemoteState",
    "Session",
    "SessionState",
    "SyncComplete",
    "SyncRequested",
    "UpdateReceived",
    "UpdateRefused",
    "codes",
    "decode_frame",
    "decode_message",
    "encode_frame",
    "encode_message",
    "encode_updates",
]
