"""The pre-open check of a node store: is ``branchline.db`` a readable
Branchline store, decided without writing a byte to it.

Opening a damaged file the normal way is harmful: SQLite takes a 0-byte file
for a new database and switching it to WAL writes a header into it, so the
evidence is changed and ``node init`` then refuses the home. ``check_store``
looks at the file's size, opens it read-only (``mode=ro`` URI), runs
``PRAGMA quick_check`` and reads the store's meta; for a file that fails, the
SQLite header and the size it gives say what happened (empty, truncated,
overwritten). Only a store that passed is opened for writing
(``NodeStore.open``).

``quick_check`` reads every page (about 6 ms per MB measured, so seconds for
a large store), so a process runs it once per file (keyed by device and
inode), later opens in the same process do the cheap checks, and a store
larger than ``QUICK_CHECK_MAX_BYTES`` gets only the cheap checks when it is
opened (``sqlite3 FILE "PRAGMA quick_check"`` checks it in full).
Damage that happens while a process has the store open shows as SQLite
errors of the writes themselves.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from urllib.parse import quote

from ..errors import StoreDamaged

SQLITE_MAGIC = b"SQLite format 3\x00"
HEADER_BYTES = 100
REQUIRED_META = ("dataset", "node", "schema_source")
QUICK_CHECK_ROWS = 3  # problems quoted in the message, at most
#: Above this size, opening a store does not run quick_check (its time grows
#: with the file: ~0.4 s at this size).
QUICK_CHECK_MAX_BYTES = 64 << 20
NULL_REPORT = "NULL value in "

_checked: set[tuple[int, int]] = set()
_checked_lock = threading.Lock()


def recovery_hint(home: Path) -> str:
    """What to do about a damaged store in ``home`` (one sentence)."""
    return (
        f"recover with 'branchline node recover --home {home} --from EXPORT' "
        "(or without --from to re-sync from the relay; docs/operations.md, 'A damaged store')"
    )


def problem(path: Path, *, full: bool = True) -> str | None:
    """What is wrong with the store file ``path`` (it must exist), or None
    when it is a readable Branchline store. ``full`` runs SQLite's
    ``quick_check``. Never writes to the file; raises nothing."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if size == 0:
        return "is empty (0 bytes)"
    found = _readable(path, full)
    if found is None:
        return None
    # Only now read the file outside SQLite: closing a descriptor of a file
    # drops every POSIX lock this process holds on it, also those of its
    # open SQLite connections (another process could then delete the WAL
    # under them). A store that fails is not in use here.
    return _header_problem(path, size) or found


def check_store(path: Path) -> None:
    """Raise StoreDamaged (one line: what is wrong, what to do) unless
    ``path`` is a readable Branchline store. Runs quick_check once per
    process, on a file of at most ``QUICK_CHECK_MAX_BYTES``. Never writes to
    it."""
    key = _identity(path)
    with _checked_lock:
        full = key is None or key not in _checked
    full = full and _size(path) <= QUICK_CHECK_MAX_BYTES
    found = problem(path, full=full)
    if found is not None:
        home = path.parent
        raise StoreDamaged(
            f"the node store {path} {found}; nothing was written to it; {recovery_hint(home)}"
        )
    if full and key is not None:
        with _checked_lock:
            _checked.add(key)


def readable_meta(path: Path) -> dict[str, str]:
    """The meta table of a store file that may be damaged, read-only and as
    far as it can be read ({} when it cannot). Never writes to the file and
    creates no ``-wal``/``-shm`` beside it."""
    try:
        conn = sqlite3.connect(f"{_uri(path)}?mode=ro&immutable=1", uri=True)
    except sqlite3.Error:
        return {}
    try:
        rows = conn.execute("SELECT key, value FROM meta").fetchall()
        return {str(k): str(v) for k, v in rows}
    except sqlite3.Error:
        return {}
    finally:
        conn.close()


def _header_problem(path: Path, size: int) -> str | None:
    """Not SQLite's header, or a file shorter than its header says (only
    when no WAL holds pages still to be copied into it)."""
    try:
        with path.open("rb") as f:
            header = f.read(HEADER_BYTES)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if len(header) < HEADER_BYTES or not header.startswith(SQLITE_MAGIC):
        return (
            f"is not a SQLite database ({size} bytes that do not start with SQLite's "
            "header; overwritten or truncated)"
        )
    raw_page = int.from_bytes(header[16:18], "big")
    page_size = 65536 if raw_page == 1 else raw_page
    if page_size < 512 or page_size & (page_size - 1):
        return f"is not a SQLite database (page size {raw_page} in its header)"
    pages = int.from_bytes(header[28:32], "big")
    # The header's page count is valid only when written by the same change
    # as the counter at offset 92 (SQLite file format, "in-header database size").
    valid = header[24:28] == header[92:96]
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        return None
    if size % page_size or (valid and size < pages * page_size):
        expected = f", its header says {pages * page_size}" if valid else ""
        return f"is truncated ({size} bytes{expected})"
    return None


def _readable(path: Path, full: bool) -> str | None:
    try:
        conn = sqlite3.connect(f"{_uri(path)}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return f"cannot be opened by SQLite ({exc})"
    try:
        if full:
            rows = conn.execute(f"PRAGMA quick_check({QUICK_CHECK_ROWS + 100})").fetchall()
            # SQLite 3.40 (Debian 12) reports "NULL value in T.C" for valid
            # rows of WITHOUT ROWID tables whose NOT NULL column is outside
            # the key; a constraint check, not damage of the file.
            found = [str(r[0]) for r in rows if not str(r[0]).startswith(NULL_REPORT)]
            found = found[:QUICK_CHECK_ROWS]
            if found and found != ["ok"]:
                return f"fails SQLite's quick_check ({'; '.join(found)})"
        try:
            meta = dict(
                conn.execute(
                    "SELECT key, value FROM meta WHERE key IN (?, ?, ?)", REQUIRED_META
                ).fetchall()
            )
        except sqlite3.OperationalError:
            return "is a SQLite database but not a Branchline node store (it has no meta table)"
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            return f"is not a complete Branchline node store (meta lacks {', '.join(missing)})"
    except sqlite3.DatabaseError as exc:
        return f"cannot be read by SQLite ({exc})"
    finally:
        conn.close()
    return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _uri(path: Path) -> str:
    return "file:" + quote(str(path.resolve()))
