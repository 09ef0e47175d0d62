"""``branchline relay init|enroll|revoke|status|list``: output contract, tokens
shown once, errors as one stderr line with exit 2 and nothing written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from engine.cli import cli
from engine.errors import AuthError
from engine.relay import SqliteRelayStore


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok_json(*args: str | Path) -> Any:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def fails(*args: str | Path) -> str:
    """Run a command that must fail as a user mistake; its one stderr line."""
    result = run(*args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "relay.db"
    result = run("relay", "init", path)
    assert result.exit_code == 0, result.stderr
    assert "created relay store" in result.stdout
    return path


def test_enroll_json_token_authenticates(store: Path) -> None:
    out = ok_json("relay", "enroll", store, "acme", "HN")
    assert out["dataset"] == "acme" and out["node"] == "HN" and out["dataset_created"]
    assert isinstance(out["token"], str) and len(out["token"]) >= 40
    with SqliteRelayStore.open(store) as relay:
        assert relay.authenticate("acme", "HN", out["token"]).read_only is False
    ro = ok_json("relay", "enroll", store, "acme", "till", "--read-only")
    with SqliteRelayStore.open(store) as relay:
        assert relay.authenticate("acme", "till", ro["token"]).read_only is True


def test_enroll_carrier_is_granted_shown_and_taken_back_by_enrolling_again(store: Path) -> None:
    out = ok_json("relay", "enroll", store, "acme", "HO", "--carrier")
    assert out["carrier"] is True and out["read_only"] is False
    with SqliteRelayStore.open(store) as relay:
        assert relay.authenticate("acme", "HO", out["token"]).carrier is True
    status = ok_json("relay", "status", store)
    assert [(n["name"], n["carrier"]) for n in status["datasets"][0]["nodes"]] == [("HO", True)]
    assert "read-write, carrier" in run("relay", "status", store).stdout
    again = ok_json("relay", "enroll", store, "acme", "HO")  # without --carrier: a plain node
    with SqliteRelayStore.open(store) as relay:
        assert relay.authenticate("acme", "HO", again["token"]).carrier is False
    line = fails("relay", "enroll", store, "acme", "T1", "--carrier", "--read-only")
    assert "both --read-only and --carrier" in line


def test_enroll_text_shows_token_once_and_reenroll_says_old_is_invalid(store: Path) -> None:
    first = run("relay", "enroll", store, "acme", "HN")
    assert first.exit_code == 0, first.stderr
    lines = first.stdout.splitlines()
    token = lines[lines.index(next(x for x in lines if x.endswith("token:"))) + 1]
    assert "will not be shown again" in first.stdout
    assert "previous token" not in first.stdout

    again = run("relay", "enroll", store, "acme", "HN")
    assert again.exit_code == 0, again.stderr
    assert "previous token no longer works" in again.stdout
    assert token not in again.stdout
    with SqliteRelayStore.open(store) as relay, pytest.raises(AuthError):
        relay.authenticate("acme", "HN", token)
    assert ok_json("relay", "enroll", store, "acme", "HN")["replaced"] is True


def test_revoke(store: Path) -> None:
    token = ok_json("relay", "enroll", store, "acme", "HN")["token"]
    result = run("relay", "revoke", store, "acme", "HN")
    assert result.exit_code == 0 and "revoked node 'HN'" in result.stdout
    result = run("relay", "revoke", store, "acme", "HN")
    assert result.exit_code == 0 and "already revoked" in result.stdout
    with SqliteRelayStore.open(store) as relay, pytest.raises(AuthError):
        relay.authenticate("acme", "HN", token)


def test_status_and_list_never_show_tokens(store: Path) -> None:
    tokens = [
        ok_json("relay", "enroll", store, "acme", "HN")["token"],
        ok_json("relay", "enroll", store, "acme", "till", "--read-only")["token"],
        ok_json("relay", "enroll", store, "beta", "X")["token"],
    ]
    run("relay", "revoke", store, "acme", "HN")
    for command in ("status", "list"):
        text = run("relay", command, store)
        assert text.exit_code == 0, text.stderr
        assert "acme" in text.stdout and "read-only" in text.stdout and "revoked" in text.stdout
        data = ok_json("relay", command, store)
        assert [d["name"] for d in data["datasets"]] == ["acme", "beta"]
        nodes = {n["name"]: n for n in data["datasets"][0]["nodes"]}
        assert nodes["HN"]["revoked"] and not nodes["till"]["revoked"]
        assert nodes["till"]["read_only"]
        for token in tokens:
            assert token not in text.stdout and token not in json.dumps(data)


def test_user_mistakes_are_one_line_exit_2_and_write_nothing(tmp_path: Path, store: Path) -> None:
    assert "already exists" in fails("relay", "init", store)
    assert "no relay store" in fails("relay", "enroll", tmp_path / "none.db", "acme", "HN")
    assert not (tmp_path / "none.db").exists()
    assert "invalid dataset name" in fails("relay", "enroll", store, "bad name", "HN")
    assert "invalid node name" in fails("relay", "enroll", store, "acme", "a.b")
    assert "no dataset 'acme'" in fails("relay", "revoke", store, "acme", "HN")
    ok_json("relay", "enroll", store, "acme", "HN")
    assert "no enrolled node 'ZZ'" in fails("relay", "revoke", store, "acme", "ZZ")
    assert "missing argument" in fails("relay", "enroll", store, "acme").lower()
    data = ok_json("relay", "status", store)
    assert [n["name"] for n in data["datasets"][0]["nodes"]] == ["HN"]


def test_lock_unlock_and_status_lists_locks(store: Path) -> None:
    ok_json("relay", "enroll", store, "acme", "HN")
    assert ok_json("relay", "lock", store, "acme", "2026-11") == {
        "dataset": "acme",
        "period": "2026-11",
        "locked": True,
        "already": False,
    }
    assert ok_json("relay", "lock", store, "acme", "2026-11")["already"] is True
    text = run("relay", "lock", store, "acme", "2025")
    assert text.exit_code == 0 and text.stdout == "locked period 2025 of dataset 'acme'\n"
    [dataset] = ok_json("relay", "status", store)["datasets"]
    assert dataset["locks"] == ["2025", "2026-11"]
    assert "locked periods: 2025, 2026-11" in run("relay", "status", store).stdout
    assert ok_json("relay", "unlock", store, "acme", "2025")["unlocked"] is True
    again = run("relay", "unlock", store, "acme", "2025")
    assert again.stdout == "period 2025 of dataset 'acme' was not locked\n"
    assert ok_json("relay", "status", store)["datasets"][0]["locks"] == ["2026-11"]


@pytest.mark.parametrize("period", ["2026-13", "26", "2026-1", "2026/11", "2026-11-01"])
def test_lock_refuses_a_bad_period_in_one_line(store: Path, period: str) -> None:
    ok_json("relay", "enroll", store, "acme", "HN")
    line = fails("relay", "lock", store, "acme", period)
    assert repr(period) in line and "YYYY or YYYY-MM" in line
    assert "YYYY or YYYY-MM" in fails("relay", "unlock", store, "acme", period)
    assert "no dataset 'beta'" in fails("relay", "lock", store, "beta", "2026")
    assert ok_json("relay", "status", store)["datasets"][0]["locks"] == []


def test_serve_json_start_and_stop_lines(store: Path) -> None:
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "branchline"),
            "relay",
            "serve",
            str(store),
            "--port",
            "0",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        start = json.loads(proc.stdout.readline())
        assert start["serving"] == str(store) and start["url"].startswith("ws://127.0.0.1:")
        proc.send_signal(signal.SIGTERM)
        assert json.loads(proc.stdout.readline()) == {"stopped": str(store)}
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
