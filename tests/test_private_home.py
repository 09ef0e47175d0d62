"""A node home holds the relay token: it is created 0700 with its store
0600 (whatever the umask), and the commands that sync refuse a home other
users can read, in one line that says how to close it, unless
--allow-shared-home."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine.cli import cli
from engine.node import Node
from engine.store.node_store import STORE_FILE

RELAY = "ws://127.0.0.1:9/"  # the discard port: nothing answers


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_a_new_home_is_private_even_under_umask_0(tmp_path: Path, open_umask: None) -> None:
    home = tmp_path / "hn"
    with Node.create(home, dataset="acme", node="HN", relay=RELAY, token="s3cret") as n:
        n.put("customers", {"code": "KH1", "name": "An"})
        assert mode(home) == 0o700
        for suffix in ("", "-wal", "-shm"):
            path = home / (STORE_FILE + suffix)
            if path.exists():
                assert mode(path) == 0o600, path.name


def test_sync_refuses_a_readable_home_unless_allowed(tmp_path: Path) -> None:
    home = tmp_path / "hn"
    Node.create(home, dataset="acme", node="HN", relay=RELAY, token="s3cret").close()
    (home / STORE_FILE).chmod(0o644)
    for args in (["sync", "--timeout", "1"], ["node", "run"], ["node", "serve"]):
        r = CliRunner().invoke(cli, [*args, "--home", str(home)])
        assert r.exit_code == 2, (args, r.output)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and "0644" in lines[0] and "--allow-shared-home" in lines[0]
        assert f"chmod 700 {home}" in lines[0]
    r = CliRunner().invoke(
        cli, ["sync", "--timeout", "1", "--home", str(home), "--allow-shared-home"]
    )
    assert r.exit_code != 0 and "--allow-shared-home" not in r.output  # past the check: no relay
    (home / STORE_FILE).chmod(0o600)
    home.chmod(0o777)
    r = CliRunner().invoke(cli, ["sync", "--timeout", "1", "--home", str(home)])
    assert r.exit_code == 2 and "others may replace its files" in r.output
