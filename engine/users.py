"""Workstation users of the branch server (docs/operations.md "Users").

Each user (a workstation or a person) has a token, shown once by ``add`` and
stored only as a salted hash (``engine.tokens``, the relay's hashing) in the
node store's local meta (``user:NAME``), which never replicates. A user is
read-only or may write. The server authenticates the ``Authorization:
Bearer`` header against ``load_users`` with ``check_token``.

Every function runs plain SQLite on the node's store (like
``engine.sync.failures``); each write is one transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import orjson

from .errors import UnknownUser, UserError, UserExists
from .names import USER_RE
from .node import Node
from .tokens import new_token, token_hash, token_matches

#: Meta key prefix of a user's row.
META_PREFIX = "user:"
#: Users a node holds at most (a token is checked against each of them).
MAX_USERS = 256


@dataclass(frozen=True)
class User:
    """A workstation user, without secrets."""

    name: str
    read_only: bool
    created_at: int


@dataclass(frozen=True)
class StoredUser:
    """A user with its salt and token hash (for ``check_token``)."""

    user: User
    salt: bytes
    hashed: bytes


def add_user(node: Node, name: str, *, read_only: bool, now_ms: int) -> str:
    """Create user ``name`` and return its token (shown once, never stored).

    Raises UserError (bad name, too many users), UserExists."""
    if not USER_RE.match(name):
        raise UserError(
            f"invalid user name {name!r}: use letters, digits, '_', '.', '@', '-' (max 64)"
        )
    token, salt = new_token()
    row = {
        "salt": salt.hex(),
        "hash": token_hash(salt, token).hex(),
        "read_only": read_only,
        "created_at": now_ms,
    }
    with node.store.transaction():
        stored = load_users(node)
        if any(s.user.name == name for s in stored):
            raise UserExists(
                f"user {name!r} already exists; remove it first to issue a new token "
                f"('branchline node users remove {name}')"
            )
        if len(stored) >= MAX_USERS:
            raise UserError(f"this node has {MAX_USERS} users already; remove unused ones first")
        node.store.set_meta(META_PREFIX + name, orjson.dumps(row).decode())
    return token


def remove_user(node: Node, name: str) -> None:
    """Remove user ``name``: its token stops working. Raises UnknownUser."""
    with node.store.transaction() as conn:
        gone = conn.execute("DELETE FROM meta WHERE key = ?", (META_PREFIX + name,)).rowcount
    if not gone:
        raise UnknownUser(f"no user {name!r}; 'branchline node users list' lists them")


def list_users(node: Node) -> list[User]:
    """Every user, by name."""
    return [s.user for s in load_users(node)]


def load_users(node: Node) -> list[StoredUser]:
    """Every user with its salt and hash, by name (damaged rows are skipped:
    they can only lock a user out, never let anyone in)."""
    rows = node.store.conn.execute(
        "SELECT key, value FROM meta WHERE key >= ? AND key < ? ORDER BY key",
        (META_PREFIX, META_PREFIX[:-1] + chr(ord(META_PREFIX[-1]) + 1)),
    ).fetchall()
    out = []
    for key, value in rows:
        try:
            row = orjson.loads(value)
            user = User(
                str(key)[len(META_PREFIX) :], bool(row["read_only"]), int(row["created_at"])
            )
            out.append(StoredUser(user, bytes.fromhex(row["salt"]), bytes.fromhex(row["hash"])))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return out


def check_token(users: Iterable[StoredUser], token: str) -> User | None:
    """The user whose token this is, or None. Every user's hash is
    computed, so the time taken does not tell which one matched."""
    found = None
    for stored in users:
        if token_matches(stored.salt, stored.hashed, token) and found is None:
            found = stored.user
    return found
