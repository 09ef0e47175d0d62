"""Named hard limits of the sync protocol and the negotiated ``Limits``.

Fixed limits hold for every connection. ``Limits`` are the tunable ones: each
side starts with its own, the client sends them in ``hello``, the relay takes
the smaller value of each field and announces the result in ``welcome``; both
sides then enforce exactly those.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

#: Protocol versions this implementation speaks.
PROTOCOL_VERSIONS: tuple[int, ...] = (1,)

# -- fixed limits -------------------------------------------------------------
HEADER_LENGTH_BYTES = 4  # big-endian u32 before the header
MAX_HEADER_BYTES = 32 << 10  # a header is a small JSON object; docs lists are split
MIN_FRAME_BYTES = 64 << 10  # below this a chunk header plus some payload would not fit
MAX_FRAME_BYTES = 64 << 20
MAX_VERSIONS = 16  # entries of hello.versions
MAX_VERSION = 65_535
MAX_REF = (1 << 53) - 1  # refs, pass and transfer ids stay exact in JavaScript
MAX_TOKEN_CHARS = 512
MAX_MESSAGE_CHARS = 1000  # error messages are truncated to this on encoding
MAX_SERIES_CHARS = 128
MAX_LEASE_COUNT = 1_000_000
MAX_DOCS_PER_FRAME = 256  # names per docs frame (256 * 75 bytes < MAX_HEADER_BYTES)
MAX_BATCH_ITEMS = 1024  # updates per ``updates`` frame (its header must fit MAX_HEADER_BYTES too)
MAX_DOCUMENTS = 100_000  # documents a relay may list for one dataset
MIN_HEARTBEAT_MS = 100
MAX_HEARTBEAT_MS = 600_000
DEFAULT_HEARTBEAT_MS = 1_500
DEAD_AFTER_INTERVALS = 3  # silence of 3 heartbeat intervals = dead link


@dataclass(frozen=True)
class Limits:
    """Tunable per-connection limits (negotiated, see module docstring).

    ``max_frame``: bytes of one websocket message. ``max_transfer``: bytes of
    one reassembled chunked payload. ``max_chunks``: chunks of one transfer.
    ``max_transfers``: chunked transfers being received at once, per direction.
    ``max_inflight``: client updates sent and not yet acknowledged.
    ``max_syncs``: sync1 requests the relay has not answered yet.
    ``max_leases``: lease requests not yet answered.
    """

    max_frame: int = 1 << 20
    max_transfer: int = 256 << 20
    max_chunks: int = 1 << 16
    max_transfers: int = 4
    max_inflight: int = 1024
    max_syncs: int = 64
    max_leases: int = 16

    def __post_init__(self) -> None:
        for name, (low, high) in LIMIT_RANGES.items():
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                raise ValueError(f"Limits.{name} must be an int in [{low}, {high}], got {value!r}")

    def merge(self, other: Limits) -> Limits:
        """The smaller value of each field: what both sides can live with."""
        return Limits(
            **{f.name: min(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)}
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


#: Allowed range of each ``Limits`` field (inclusive), on the wire and in code.
LIMIT_RANGES: dict[str, tuple[int, int]] = {
    "max_frame": (MIN_FRAME_BYTES, MAX_FRAME_BYTES),
    "max_transfer": (MIN_FRAME_BYTES, 4 << 30),
    "max_chunks": (1, 1 << 20),
    "max_transfers": (1, 64),
    "max_inflight": (1, 1 << 16),
    "max_syncs": (1, 4096),
    "max_leases": (1, 1024),
}
