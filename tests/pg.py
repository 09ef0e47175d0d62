"""PostgreSQL for the tests that need it (imported by conftest).

``pg_url`` is the URL of a fresh database of the test's own
(``bl_<purpose>_<random>``), dropped afterwards. Without a server on
``BRANCHLINE_TEST_PG`` (default ``postgresql://postgres@127.0.0.1:5432/test``)
the test is skipped with the reason, except under ``CI=true``, where it fails.
``private_pg`` is a PostgreSQL server of the test's own, which it may stop
and start (a restart) without touching the machine's server.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.net import free_port

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


class PrivateServer:
    """A PostgreSQL server of the test's own (``initdb`` in a temporary
    directory, on a free loopback port), so a test may stop and start it as
    a restart of the machine's server would, without touching that server.
    Run as the ``postgres`` user when the tests run as root (PostgreSQL
    refuses root)."""

    def __init__(self, bindir: Path, port: int) -> None:
        self.bindir = bindir
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="bl-pg-"))
        self.data = self.dir / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [*self.as_user, str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.dir,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)}: {done.stderr.strip() or done.stdout}")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=on"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"),
                  "-w", "-t", "60", "start")  # fmt: skip

    def stop(self) -> None:
        """A fast shutdown: every session is cut, as a restart cuts them."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _pg_bindir() -> Path | None:
    for found in sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True):
        return found.parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture
def private_pg() -> Iterator[PrivateServer]:
    """A running PostgreSQL server of this test's own (see PrivateServer).
    Skipped loudly without PostgreSQL's server programs, failed under CI=true."""
    bindir = _pg_bindir()
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
