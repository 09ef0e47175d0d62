"""CLI: conflicts, resolve, conflicts --resolved, export --unsynced / import."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from engine.cli import cli
from engine.node import Node


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(*args: str | Path) -> Any:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def init(home: Path, node: str, dataset: str = "acme") -> Path:
    assert run("node", "init", "--home", home, "--dataset", dataset, "--node", node).exit_code == 0
    return home


def exchange(a: Path, b: Path, tmp: Path) -> None:
    """Both ways through export files, as two branches would by USB stick."""
    for src, dst in ((a, b), (b, a)):
        ok("export", "--home", src, tmp / "x.blx")
        ok("import", "--home", dst, tmp / "x.blx")


def test_resolve_a_duplicate_code_from_the_cli(tmp_path: Path) -> None:
    a, b = init(tmp_path / "a", "HN"), init(tmp_path / "b", "HCM")
    ok("put", "--home", a, "customers", '{"code": "KH01", "name": "An (HN)"}')
    ok("put", "--home", b, "customers", '{"code": "KH01", "name": "An (HCM)"}')
    exchange(a, b, tmp_path)
    (conflict,) = ok("conflicts", "--home", a)
    assert conflict["kind"] == "duplicate_key"
    text = run("conflicts", "--home", a)
    assert conflict["id"][:8] in text.stdout and "--merge-into" in text.stdout

    bad = run("resolve", "--home", a, conflict["id"], "--keep", "HN")
    assert bad.exit_code == 2 and "rename, merge_into or renumber" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = run("resolve", "--home", a, "0" * 20, "--rename", "KH02")
    assert missing.exit_code == 2 and "no open conflict" in missing.stderr

    entry = ok("resolve", "--home", a, conflict["id"], "--rename", "KH02")
    assert (entry["action"], entry["old"], entry["new"]) == ("rename", "KH01", "KH02")
    exchange(a, b, tmp_path)
    assert ok("conflicts", "--home", b) == []
    (journal,) = ok("conflicts", "--home", b, "--resolved")
    assert journal["id"] == entry["id"] and journal["auto"] is False
    assert "by hand" in run("conflicts", "--home", b, "--resolved").stdout


def test_unsynced_work_survives_recreating_the_node(tmp_path: Path) -> None:
    home = init(tmp_path / "hn", "HN")
    ok("put", "--home", home, "customers", '{"code": "KH01", "name": "An"}')
    with Node.open(home) as n:
        n.ack([seq for seq, _, _ in n.outbox()])  # the relay has this one
    ok("put", "--home", home, "customers", '{"code": "KH02", "name": "Bình"}')
    out = ok("export", "--home", home, tmp_path / "unsynced.blx", "--unsynced")
    assert out["unsynced"] is True and out["documents"] == 1

    # The branch server's disk is replaced: a fresh home for the same node.
    fresh = init(tmp_path / "hn2", "HN")
    report = ok("import", "--home", fresh, tmp_path / "unsynced.blx")
    assert report["unsynced"] is True and report["records_changed"] == 1
    with Node.open(fresh) as n:
        assert n.get("customers", "KH02")["name"] == "Bình"
        assert n.get("customers", "KH01") is None  # acknowledged: the relay gives it back
        assert len(n.outbox()) == 1  # queued to upload at the next sync
    again = ok("import", "--home", fresh, tmp_path / "unsynced.blx")
    assert again["changed"] is False  # a double import is harmless
    with Node.open(fresh) as n:
        assert len(n.outbox()) == 1

    other = init(tmp_path / "other", "HN", dataset="globex")
    refused = run("import", "--home", other, tmp_path / "unsynced.blx")
    assert refused.exit_code == 2
    assert "acme" in refused.stderr and "globex" in refused.stderr

    both = run("export", "--home", home, tmp_path / "x.blx", "--unsynced", "--since-state", "y")
    assert both.exit_code == 2 and "not both" in both.stderr
