"""PostgreSQL for the tests that need it (imported by conftest).

``pg_url`` is the URL of a fresh database of the test's own
(``bl_<purpose>_<random>``), dropped afterwards. Without a server on
``BRANCHLINE_TEST_PG`` (default ``postgresql://postgres@127.0.0.1:5432/test``)
the test is skipped with the reason, except under ``CI=true``, where it fails.
``private_pg`` is a PostgreSQL server of the test's own, which it may stop
and start (a restart) without touching the machine's server.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator

import pytest

from harness.net import free_port
from harness.pg_server import PrivateServer, server_bindir

ADMIN_URL = os.environ.get("BRANCHLINE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _admin() -> object:
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - psycopg is a dependency
        reason = f"psycopg is not installed ({exc})"
    else:
        try:
            return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)
        except psycopg.Error as exc:
            reason = f"PostgreSQL unreachable at {ADMIN_URL}: {str(exc).strip()}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true needs PostgreSQL: {reason}")
    pytest.skip(f"SKIPPED LOUDLY: no PostgreSQL: {reason}")


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database of this test's own; dropped (its sessions ended) after it."""
    admin = _admin()
    purpose = "".join(ch for ch in request.node.name.lower() if ch.isalnum())[:20]
    name = f"bl_{purpose}_{secrets.token_hex(4)}"
    admin.execute(f'CREATE DATABASE "{name}"')  # type: ignore[attr-defined]
    try:
        yield ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[attr-defined]
        admin.close()  # type: ignore[attr-defined]


@pytest.fixture
def private_pg() -> Iterator[PrivateServer]:
    """A running PostgreSQL server of this test's own (see PrivateServer).
    Skipped loudly without PostgreSQL's server programs, failed under CI=true."""
    bindir = server_bindir()
    reason = "" if bindir else "no initdb (PostgreSQL's server programs) on this machine"
    if bindir and os.geteuid() == 0 and shutil.which("runuser") is None:
        reason = "running as root without runuser to start PostgreSQL as postgres"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true needs a private PostgreSQL server: {reason}")
        pytest.skip(f"SKIPPED LOUDLY: {reason}")
    assert bindir is not None
    server = PrivateServer(bindir, free_port())
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.remove()
