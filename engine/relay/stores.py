"""Which relay store a spec names: a ``postgresql://`` URL opens a
``PgRelayStore``, anything else is the path of a ``SqliteRelayStore`` file."""

from __future__ import annotations

from pathlib import Path

from .doccache import RelayLimits
from .pg_store import PgRelayStore, is_pg_url, parse_url
from .sqlite_store import SqliteRelayStore
from .store import RelayStore


def create_store(spec: str | Path, limits: RelayLimits | None = None) -> RelayStore:
    """Create the store ``spec`` names. Raises RelayStoreExists,
    RelayStoreNotFound (missing directory or database), UserError (bad
    URL), StoreError."""
    if is_pg_url(str(spec)):
        return PgRelayStore.create(str(spec), limits)
    return SqliteRelayStore.create(spec, limits)


def open_store(spec: str | Path, limits: RelayLimits | None = None) -> RelayStore:
    """Open the existing store ``spec`` names. Raises RelayStoreNotFound,
    FormatVersionError, UserError (bad URL), StoreError (unreachable, not a
    relay store)."""
    if is_pg_url(str(spec)):
        return PgRelayStore.open(str(spec), limits)
    return SqliteRelayStore.open(spec, limits)


def describe(spec: str | Path) -> str:
    """How messages name the store: the path, or the URL without a password."""
    return str(parse_url(str(spec))) if is_pg_url(str(spec)) else str(spec)
