"""The relay store acceptance suite (``engine.relay.testing``) on every store
the project ships: SQLite, and PostgreSQL when a server is reachable."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.relay import SqliteRelayStore
from engine.relay.doccache import RelayLimits
from engine.relay.testing import CHECKS, Check, StoreMaker


class SqliteMaker(StoreMaker):
    def __init__(self, path: Path) -> None:
        self.path = path

    def create(self, limits: RelayLimits | None = None) -> SqliteRelayStore:
        return SqliteRelayStore.create(self.path, limits)

    def open(self, limits: RelayLimits | None = None) -> SqliteRelayStore:
        return SqliteRelayStore.open(self.path, limits)


@pytest.fixture(params=["sqlite"])
def maker(request: pytest.FixtureRequest, tmp_path: Path) -> StoreMaker:
    return SqliteMaker(tmp_path / "relay.db")


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_contract(maker: StoreMaker, check: Check, tmp_path: Path) -> None:
    check(maker, tmp_path)
