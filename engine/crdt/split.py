"""Splitting a Yjs v1 update into smaller updates at struct boundaries.

A catch-up diff of a large document is one update of tens of megabytes:
applied whole, it is one long pycrdt call and one long write transaction on
every node that receives it. ``split_update`` cuts it into parts of at most
``max_bytes`` (a single struct larger than that is a part of its own); the
parts, applied in order, integrate exactly what the whole update does. Every
struct is copied byte for byte: a v1 struct names its origins and parent
itself, so it decodes the same in any update that starts at its clock. The
delete set goes with the last part, after every struct it may refer to.

Layout (lib0 var-uints, as ``deleteset`` and ``statevec`` read them): the
count of client groups, then per group its struct count, client id and first
clock, then the structs; then the delete set. Decoding never crashes: bad
input raises ``UpdateError``.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import UpdateError
from .deleteset import decode_delete_set
from .statevec import read_uint, write_uint

#: More structs or nesting than any real update holds: a corrupt count.
MAX_STRUCTS = 50_000_000
MAX_DEPTH = 64

_BIT8, _BIT7, _BIT6, _BITS5 = 0x80, 0x40, 0x20, 0x1F
_XML_NAMED = (3, 5)  # YXmlElement, YXmlHook: their type content carries a name


class _Reader:
    """A cursor over update bytes; every read raises UpdateError past the end."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)

    def uint(self) -> int:
        data, pos = self.data, self.pos
        if pos < self.end and data[pos] < 0x80:  # the common one-byte case
            self.pos = pos + 1
            return data[pos]
        value, self.pos = read_uint(data, pos)
        return value

    def skip(self, n: int) -> None:
        if self.pos + n > self.end:
            raise UpdateError("update is truncated")
        self.pos += n

    def skip_string(self) -> int:
        """Skip a var-string; returns its start (after the length)."""
        n = self.uint()
        start = self.pos
        self.skip(n)
        return start

    def skip_int(self) -> None:
        """Skip a lib0 signed var-int."""
        data = self.data
        while True:
            if self.pos >= self.end:
                raise UpdateError("update is truncated")
            byte = data[self.pos]
            self.pos += 1
            if byte < 0x80:
                return

    def skip_any(self, depth: int = 0) -> None:
        if depth > MAX_DEPTH:
            raise UpdateError("update nests values too deeply")
        if self.pos >= self.end:
            raise UpdateError("update is truncated")
        kind = self.data[self.pos]
        self.pos += 1
        if kind == 119:  # string
            self.skip_string()
        elif kind in (127, 126, 121, 120):  # undefined, null, false, true
            return
        elif kind == 125:  # integer
            self.skip_int()
        elif kind == 123 or kind == 122:  # float64, bigint64
            self.skip(8)
        elif kind == 124:  # float32
            self.skip(4)
        elif kind == 118:  # object
            for _ in range(self._count()):
                self.skip_string()
                self.skip_any(depth + 1)
        elif kind == 117:  # array
            for _ in range(self._count()):
                self.skip_any(depth + 1)
        elif kind == 116:  # bytes
            self.skip(self.uint())
        else:
            raise UpdateError(f"update holds a value of unknown type {kind}")

    def _count(self) -> int:
        n = self.uint()
        if n > self.end - self.pos:  # every element takes at least one byte
            raise UpdateError("update claims more values than it holds")
        return n

    def struct(self) -> int:
        """Skip one struct; returns its length in clock units."""
        if self.pos >= self.end:
            raise UpdateError("update is truncated")
        info = self.data[self.pos]
        self.pos += 1
        ref = info & _BITS5
        if ref == 0 or ref == 10:  # GC, Skip
            return self.uint()
        if info & _BIT8:
            self.uint(), self.uint()  # origin
        if info & _BIT7:
            self.uint(), self.uint()  # right origin
        if not info & (_BIT8 | _BIT7):
            if self.uint() == 1:
                self.skip_string()  # a root type's name
            else:
                self.uint(), self.uint()  # the parent item's id
            if info & _BIT6:
                self.skip_string()  # the Map key
        return self._content(ref)

    def _content(self, ref: int) -> int:
        if ref == 8 or ref == 2:  # Any, JSON: a count of values
            n = self._count()
            skip = self.skip_any if ref == 8 else self.skip_string
            for _ in range(n):
                skip()
            return n
        if ref == 1:  # Deleted
            return self.uint()
        if ref == 4:  # String: its length counts UTF-16 units, as in JavaScript
            start = self.skip_string()
            text = self.data[start : self.pos]
            try:
                chars = text.decode("utf-8")
            except UnicodeDecodeError:
                raise UpdateError("update holds a string that is not UTF-8") from None
            return len(chars.encode("utf-16-le")) // 2
        if ref == 3:  # Binary
            self.skip(self.uint())
        elif ref == 5:  # Embed
            self.skip_string()
        elif ref == 6:  # Format
            self.skip_string()
            self.skip_string()
        elif ref == 7:  # Type
            if self.uint() in _XML_NAMED:
                self.skip_string()
        elif ref == 9:  # Doc
            self.skip_string()
            self.skip_any()
        else:
            raise UpdateError(f"update holds a struct of unknown kind {ref}")
        return 1


def reach(update: bytes) -> dict[int, int]:
    """Per client of ``update``, the clock just past its last struct that is
    not a Skip: a document whose state vector is below it for some client
    cannot have integrated all of the update (that part waits for earlier
    updates). Reads struct headers only, copying nothing. Raises UpdateError
    for bytes that are not a v1 update (the delete set is not read)."""
    r = _Reader(update)
    out: dict[int, int] = {}
    total = 0
    for _ in range(r.uint()):
        count, client, clock = r.uint(), r.uint(), r.uint()
        total += count
        if total > MAX_STRUCTS:
            raise UpdateError(f"update claims more than {MAX_STRUCTS} structs")
        end = None
        for _ in range(count):
            skip = r.pos < r.end and r.data[r.pos] & _BITS5 == 10
            clock += r.struct()
            if not skip:
                end = clock
        if end is not None and end > out.get(client, 0):
            out[client] = end
    return out


def split_update(update: bytes, max_bytes: int) -> list[bytes]:
    """``update`` as updates to apply in the order given, the structs of
    each taking at most ``max_bytes`` (bar a single struct larger than that;
    a few bytes of group headers, and in the last part the delete set, come
    on top); an update that fits is returned as the only element, unchanged.
    Raises UpdateError for bytes that are not a v1 update and ValueError for
    ``max_bytes`` < 1."""
    return list(iter_parts(update, max_bytes))


def iter_parts(update: bytes, max_bytes: int) -> Iterator[bytes]:
    """``split_update`` one part at a time, so a caller that applies and
    drops each holds one part, not all of them. Raises as ``split_update``,
    but only when it reaches the bad bytes: the parts before are valid."""
    if max_bytes < 1:
        raise ValueError("max_bytes must be at least 1")
    if len(update) <= max_bytes:
        yield update
        return
    r = _Reader(update)
    # (client, first clock, start, end, struct count) of the current part's
    # runs of structs, in update order.
    runs: list[tuple[int, int, int, int, int]] = []
    size = 0
    total = 0
    for _ in range(r.uint()):
        count, client, clock = r.uint(), r.uint(), r.uint()
        total += count
        if total > MAX_STRUCTS:
            raise UpdateError(f"update claims more than {MAX_STRUCTS} structs")
        start, first, n = r.pos, clock, 0
        for _ in range(count):
            at = r.pos
            length = r.struct()
            if (n or runs) and size + (r.pos - start) > max_bytes:
                if n:
                    runs.append((client, first, start, at, n))
                yield _encode(update, runs, b"\x00")
                runs, size, start, first, n = [], 0, at, clock, 0
            clock += length
            n += 1
        if n:
            runs.append((client, first, start, r.pos, n))
            size += r.pos - start
    _, end = decode_delete_set(update, r.pos)
    if end != len(update):
        raise UpdateError("update has trailing bytes after its delete set")
    yield _encode(update, runs, update[r.pos :])


def _encode(update: bytes, runs: list[tuple[int, int, int, int, int]], deletes: bytes) -> bytes:
    out = bytearray()
    write_uint(out, len(runs))
    for client, clock, start, end, count in runs:
        write_uint(out, count)
        write_uint(out, client)
        write_uint(out, clock)
        out += update[start:end]
    out += deletes
    return bytes(out)
