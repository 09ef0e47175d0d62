"""Record ids: ULIDs (26 characters, time-sortable, globally unique)."""

from __future__ import annotations

import random
import re

from .clock import Clock

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ID_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")


def new_id(clock: Clock, rng: random.Random) -> str:
    """A new ULID from the injected clock (48-bit ms) and random source (80 bits)."""
    value = ((clock.wall_ms() & ((1 << 48) - 1)) << 80) | rng.getrandbits(80)
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def is_id(text: str) -> bool:
    return bool(ID_RE.match(text))
