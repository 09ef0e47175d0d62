"""Yjs state vectors (lib0 var-uint encoding), decoded without pycrdt.

A state vector maps a Yjs client id to the number of items of that client a
document holds. Decoding never crashes: bad input raises ``UpdateError``.
"""

from __future__ import annotations

from ..errors import UpdateError

MAX_CLIENTS = 1_000_000


def read_uint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise UpdateError("state vector is truncated")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise UpdateError("state vector has an integer longer than 64 bits")


def write_uint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)


def decode_state_vector(data: bytes) -> dict[int, int]:
    """client id -> clock. Raises UpdateError on malformed input."""
    count, pos = read_uint(data, 0)
    if count > MAX_CLIENTS:
        raise UpdateError(f"state vector claims {count} clients")
    out = {}
    for _ in range(count):
        client, pos = read_uint(data, pos)
        clock, pos = read_uint(data, pos)
        out[client] = clock
    if pos != len(data):
        raise UpdateError("state vector has trailing bytes")
    return out


def encode_state_vector(sv: dict[int, int]) -> bytes:
    out = bytearray()
    write_uint(out, len(sv))
    for client, clock in sorted(sv.items()):
        write_uint(out, client)
        write_uint(out, clock)
    return bytes(out)


def is_behind(mine: dict[int, int], theirs: dict[int, int]) -> bool:
    """True when ``theirs`` holds items ``mine`` lacks."""
    return any(clock > mine.get(client, 0) for client, clock in theirs.items())
