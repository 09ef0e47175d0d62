"""PostgreSQL for the tests: one database of this test session
(``bl_test_<random>``, dropped at the end) and a fresh schema per test.

The server is ``BRANCHLINE_TEST_PG`` (default ``postgresql://postgres@127.0.0.1:5432/test``,
used only to create and drop the session's database). Without a reachable
server the tests that need it skip, saying why; under ``CI=true`` they fail.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

ADMIN_URL = os.environ.get("BRANCHLINE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", "", ""))


def _unavailable(reason: str) -> None:
    message = f"PostgreSQL is not reachable at {ADMIN_URL} ({reason}): PostgreSQL tests SKIPPED"
    if os.environ.get("CI") == "true":
        pytest.fail(f"under CI=true PostgreSQL is required: {message}")
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """The URL of a database of this session's own."""
    name = f"bl_test_{secrets.token_hex(4)}"
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.Error as exc:
        _unavailable(str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc))
        raise  # unreachable: skip or fail raised
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_database(ADMIN_URL, name)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_database: str) -> str:
    """A store URL naming a schema no other test uses."""
    return f"{pg_database}?schema=t_{secrets.token_hex(6)}"
