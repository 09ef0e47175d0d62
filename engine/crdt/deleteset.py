"""Yjs v1 delete sets, decoded and encoded without pycrdt.

A v1 update is its structs (grouped by client) followed by its delete set:
``count, (client, ranges, (clock, length) * ranges) * count``, every number a
lib0 var-uint. ``get_update(update, state)`` of pycrdt keeps an update's whole
delete set and drops the structs the state covers, so the delete set of any
update is ``delete_set_only(get_update(update, state_covering_it))``.

Used by the relay to see which deletions an update carries (docs/reliability.md
"Authorship") and by a node to leave other nodes' deletions out of its diffs.
Decoding never crashes: bad input raises ``UpdateError``.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import UpdateError
from .statevec import read_uint, write_uint

#: client id -> [(clock, length), ...]
DeleteSet = dict[int, list[tuple[int, int]]]

MAX_RANGES = 10_000_000  # more ranges than any real delete set: a corrupt count


def delete_set_only(update: bytes) -> DeleteSet:
    """The delete set of an update that holds no structs (its first byte is
    the zero struct-group count), as ``get_update(update, state)`` returns
    when ``state`` covers all its structs. Raises UpdateError when the update
    holds structs or is malformed."""
    if update[:1] != b"\x00":
        raise UpdateError("update holds structs; only its delete set was expected")
    ds, pos = decode_delete_set(update, 1)
    if pos != len(update):
        raise UpdateError("update has trailing bytes after its delete set")
    return ds


def decode_delete_set(data: bytes, pos: int = 0) -> tuple[DeleteSet, int]:
    """Decode a delete set starting at ``pos``; returns it and the position
    after it. Raises UpdateError on malformed input."""
    out: DeleteSet = {}
    clients, pos = read_uint(data, pos)
    total = 0
    for _ in range(clients):
        client, pos = read_uint(data, pos)
        count, pos = read_uint(data, pos)
        total += count
        if total > MAX_RANGES:
            raise UpdateError(f"delete set claims more than {MAX_RANGES} ranges")
        ranges = out.setdefault(client, [])
        for _ in range(count):
            clock, pos = read_uint(data, pos)
            length, pos = read_uint(data, pos)
            ranges.append((clock, length))
    return out, pos


def encode_delete_set(ds: DeleteSet) -> bytes:
    """The v1 encoding of ``ds`` (clients with no range are left out)."""
    out = bytearray()
    kept = [(client, ranges) for client, ranges in ds.items() if ranges]
    write_uint(out, len(kept))
    for client, ranges in kept:
        write_uint(out, client)
        write_uint(out, len(ranges))
        for clock, length in ranges:
            write_uint(out, clock)
            write_uint(out, length)
    return bytes(out)


def keep_clients(ds: DeleteSet, keep: Callable[[int], bool]) -> DeleteSet:
    """The ranges of the clients ``keep`` accepts."""
    return {client: ranges for client, ranges in ds.items() if keep(client)}


def beyond(ds: DeleteSet, state: dict[int, int]) -> list[tuple[int, int, int]]:
    """Ranges (client, clock, length) that reach past ``state``: deletions of
    items a document in that state has not seen."""
    return [
        (client, clock, length)
        for client, ranges in ds.items()
        for clock, length in ranges
        if clock + length > state.get(client, 0)
    ]
