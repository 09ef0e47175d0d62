"""The relay store acceptance suite (``engine.relay.testing``) on every store
the project ships: SQLite, and PostgreSQL when a server is reachable."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.relay import SqliteRelayStore
from engine.relay.doccache import RelayLimits
from engine.relay.pg_store import PgRelayStore
from engine.relay.testing import CHECKS, Check, StoreMaker


class SqliteMaker(StoreMaker):
    def __init__(self, path: Path) -> None:
        self.path = path

    def create(self, limits: RelayLimits | None = None) -> SqliteRelayStore:
        return SqliteRelayStore.create(self.path, limits)

    def open(self, limits: RelayLimits | None = None) -> SqliteRelayStore:
        return SqliteRelayStore.open(self.path, limits)


class PgMaker(StoreMaker):
    def __init__(self, url: str) -> None:
        self.url = url

    def create(self, limits: RelayLimits | None = None) -> PgRelayStore:
        return PgRelayStore.create(self.url, limits)

    def open(self, limits: RelayLimits | None = None) -> PgRelayStore:
        return PgRelayStore.open(self.url, limits)


@pytest.fixture(params=["sqlite", "postgresql"])
def maker(request: pytest.FixtureRequest, tmp_path: Path) -> StoreMaker:
    if request.param == "sqlite":
        return SqliteMaker(tmp_path / "relay.db")
    return PgMaker(request.getfixturevalue("pg_url"))


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_contract(maker: StoreMaker, check: Check, tmp_path: Path) -> None:
    check(maker, tmp_path)
