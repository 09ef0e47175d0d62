"""Record ids: ULIDs (26 characters of Crockford base32, time-sortable).

Uniqueness does not rest on the random source alone (a simulation may
restart a node with the same seed): the first 64 bits are the node's hybrid
logical clock timestamp, which never repeats within a node, and the other 64
mix random bits with a hash of the node name, which separates nodes.
"""

from __future__ import annotations

import hashlib
import random
import re

from .clock import COUNTER_BITS

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ID_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}\Z")
_MASK64 = (1 << 64) - 1


def node_salt(node: str) -> int:
    """64 bits derived from the node name."""
    return int.from_bytes(hashlib.blake2b(node.encode(), digest_size=8).digest(), "big")


def new_id(hlc: int, salt: int, rng: random.Random) -> str:
    """A ULID from a fresh hybrid-clock timestamp of this node (48-bit ms and
    16-bit counter), ``salt`` from ``node_salt`` and 64 random bits."""
    ms, counter = hlc >> COUNTER_BITS, hlc & ((1 << COUNTER_BITS) - 1)
    value = (
        ((ms & ((1 << 48) - 1)) << 80) | (counter << 64) | ((rng.getrandbits(64) ^ salt) & _MASK64)
    )
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def is_id(text: str) -> bool:
    return bool(ID_RE.match(text))
