"""Who may read a node home. Its store holds the relay token in clear (the
node must present it), so a home is created 0700 and its store file 0600
(SQLite gives the -wal and -shm files the store file's mode), and
``exposed`` says when a home holding a token is open to other users, for
the commands that sync to refuse it (``branchline node run``, ``node serve``
and ``sync``, unless ``--allow-shared-home``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import HomeExposed, StoreError

DIR_MODE = 0o700
FILE_MODE = 0o600
# The store file and what SQLite keeps beside it.
SUFFIXES = ("", "-wal", "-shm")


def make_home(home: Path) -> None:
    """Create ``home`` (and missing parents) with mode 0700 for the last
    part; an existing directory is left as it is. Raises StoreError."""
    try:
        home.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    except OSError as exc:
        raise StoreError(f"cannot create node home {home}: {exc.strerror or exc}") from None


def create_file(path: Path) -> None:
    """Create the empty file ``path`` with mode 0600 (before SQLite opens
    it, so it is never readable by others, not even for a moment). Raises
    StoreError, also when it exists."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE))
    except OSError as exc:
        raise StoreError(f"cannot create {path}: {exc.strerror or exc}") from None


def exposed(home: Path, store_file: str) -> str | None:
    """What lets other users read the store or replace it (a file readable
    or writable by group or others, a home writable by them), or None."""
    found: list[str] = []
    for suffix in SUFFIXES:
        path = home / (store_file + suffix)
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue
        except OSError:
            continue  # unreadable by us: the open that follows says so
        if mode & 0o077:
            found.append(f"{path.name} is {mode:04o}")
    try:
        home_mode = stat.S_IMODE(home.stat().st_mode)
    except OSError:
        home_mode = 0
    if home_mode & 0o022:
        found.append(f"the home is {home_mode:04o} (others may replace its files)")
    return "; ".join(found) or None


def fix_command(home: Path, store_file: str) -> str:
    """The shell command that makes ``home`` private again."""
    return f"chmod 700 {home} && chmod 600 {home / store_file}*"


def require_private(home: Path, store_file: str) -> None:
    """Raise HomeExposed (one line: what is open, the command that closes
    it, the override) when ``exposed`` finds anything."""
    found = exposed(home, store_file)
    if found is not None:
        raise HomeExposed(
            f"the node home {home} holds the relay token but {found}: run "
            f"'{fix_command(home, store_file)}', or pass --allow-shared-home to sync anyway"
        )
