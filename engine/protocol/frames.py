"""Frame codec: one websocket binary message is one frame.

    u32 big-endian  header length H (1 <= H <= MAX_HEADER_BYTES)
    H bytes         header: a UTF-8 JSON object with a string field "t"
    rest            payload: opaque bytes (a Yjs update, a state vector, a chunk)

This module knows nothing about message types; ``messages`` gives the header
meaning. ``decode_frame`` never raises anything but ``RemoteProtocolError``
(codes ``bad_frame`` and ``frame_too_large``), whatever the input.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson

from ..errors import LocalProtocolError, RemoteProtocolError
from . import codes
from .limits import HEADER_LENGTH_BYTES, MAX_HEADER_BYTES

_LEN = struct.Struct(">I")


def encode_frame(header: dict[str, Any], payload: bytes = b"", *, max_frame: int) -> bytes:
    """The bytes of one frame. Raises LocalProtocolError (``frame_too_large``)
    when the header or the whole frame would exceed the limits, and
    (``bad_frame``) when the header cannot be encoded as JSON."""
    try:
        raw = orjson.dumps(header)
    except TypeError as exc:
        raise LocalProtocolError(codes.BAD_FRAME, f"header is not JSON-encodable: {exc}") from None
    if len(raw) > MAX_HEADER_BYTES:
        raise LocalProtocolError(
            codes.FRAME_TOO_LARGE, f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}"
        )
    size = HEADER_LENGTH_BYTES + len(raw) + len(payload)
    if size > max_frame:
        raise LocalProtocolError(
            codes.FRAME_TOO_LARGE, f"frame of {size} bytes exceeds the {max_frame}-byte limit"
        )
    return b"".join((_LEN.pack(len(raw)), raw, payload))


def decode_frame(data: bytes, *, max_frame: int) -> tuple[dict[str, Any], bytes]:
    """(header object, payload) of one received frame.

    Checks the size limits before parsing anything, so a hostile peer cannot
    make us parse a huge header. Raises RemoteProtocolError only.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise RemoteProtocolError(codes.BAD_FRAME, "a frame must be a binary message")
    data = bytes(data)
    if len(data) > max_frame:
        raise RemoteProtocolError(
            codes.FRAME_TOO_LARGE, f"frame of {len(data)} bytes exceeds the {max_frame}-byte limit"
        )
    if len(data) < HEADER_LENGTH_BYTES:
        raise RemoteProtocolError(codes.BAD_FRAME, f"frame of {len(data)} bytes has no header")
    (length,) = _LEN.unpack_from(data)
    if length > MAX_HEADER_BYTES:
        raise RemoteProtocolError(
            codes.FRAME_TOO_LARGE, f"header length {length} exceeds {MAX_HEADER_BYTES}"
        )
    if length == 0 or HEADER_LENGTH_BYTES + length > len(data):
        raise RemoteProtocolError(
            codes.BAD_FRAME, f"header length {length} does not fit a {len(data)}-byte frame"
        )
    end = HEADER_LENGTH_BYTES + length
    try:
        header = orjson.loads(data[HEADER_LENGTH_BYTES:end])
    except orjson.JSONDecodeError:
        raise RemoteProtocolError(codes.BAD_FRAME, "header is not valid UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise RemoteProtocolError(codes.BAD_FRAME, "header is not a JSON object")
    if not isinstance(header.get("t"), str):
        raise RemoteProtocolError(codes.BAD_FRAME, 'header has no string type field "t"')
    return header, data[end:]
