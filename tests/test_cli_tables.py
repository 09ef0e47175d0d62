"""Readable tables (issue 18): conflicts and failures show codes and voucher
numbers rather than record ids and fit 100 columns; every id a command takes
may be given by a unique prefix, as git takes commit ids."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from engine.cli import cli
from engine.errors import AmbiguousId
from engine.node import Node
from engine.prefix import match_prefix, short_ids
from engine.sync.failures import record_failure

ULID = re.compile(r"\b[0-9A-HJKMNP-TV-Z]{26}\b")


def run(*args: str | Path) -> Result:
    return CliRunner(env={"COLUMNS": "100"}).invoke(cli, [str(a) for a in args])


def ok(*args: str | Path) -> object:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def two_homes_in_conflict(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    for home, name in ((a, "HN"), (b, "HCM")):
        made = run("node", "init", "--home", home, "--dataset", "acme", "--node", name)
        assert made.exit_code == 0
    ok("put", "--home", a, "customers", '{"code": "KH02", "name": "Binh"}')
    ok("export", "--home", a, tmp_path / "x.blx")
    ok("import", "--home", b, tmp_path / "x.blx")
    for home, side in ((a, "HN"), (b, "HCM")):
        ok("put", "--home", home, "customers", f'{{"code": "KH02", "name": "Binh {side}"}}')
        ok("put", "--home", home, "customers", f'{{"code": "KH07", "name": "Cuong {side}"}}')
    for src, dst in ((a, b), (b, a)):
        ok("export", "--home", src, tmp_path / "x.blx")
        ok("import", "--home", dst, tmp_path / "x.blx")
    return a, b


def test_conflicts_table_shows_codes_and_fits_100_columns(tmp_path: Path) -> None:
    a, _ = two_homes_in_conflict(tmp_path)
    found = ok("conflicts", "--home", a)
    assert isinstance(found, list) and {c["kind"] for c in found} == {
        "concurrent_edit", "duplicate_key",
    }  # fmt: skip
    text = run("conflicts", "--home", a).stdout
    assert all(len(line) <= 100 for line in text.splitlines()), text
    assert not ULID.search(text), text  # no raw record id anywhere
    assert "KH02" in text and "KH07 (" in text  # a key, and a short id where keys collide
    shown = short_ids(c["id"] for c in found)
    for c in found:
        assert shown[c["id"]] in text and c["id"] not in text


def test_ids_by_unique_prefix_and_ambiguous_prefixes(tmp_path: Path) -> None:
    a, _ = two_homes_in_conflict(tmp_path)
    found = ok("conflicts", "--home", a)
    assert isinstance(found, list)
    dup = next(c for c in found if c["kind"] == "duplicate_key")
    edit = next(c for c in found if c["kind"] == "concurrent_edit")
    loser = dup["records"][1]
    # A conflict id by its shown prefix, a record id by a prefix too.
    entry = ok("resolve", "--home", a, dup["id"][:8], "--rename", "KH08", "--record", loser[:12])
    assert isinstance(entry, dict) and entry["record"] == loser and entry["new"] == "KH08"
    got = ok("get", "--home", a, "customers", loser[:12])
    assert isinstance(got, dict) and got["code"] == "KH08" and got["id"] == loser
    ok("resolve", "--home", a, edit["id"][:6], "--keep", "HN")
    with Node.open(a) as n:
        ids = [r["id"] for r in n.list("customers")]
    common = ids[0][:6]  # the same millisecond's ULIDs share their first characters
    assert sum(i.startswith(common) for i in ids) > 1
    bad = run("get", "--home", a, "customers", common)
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1
    assert "ambiguous" in bad.stderr and all(i in bad.stderr for i in ids if i.startswith(common))
    missing = run("resolve", "--home", a, "fff", "--keep", "HN")
    assert missing.exit_code == 2 and "no open conflict" in missing.stderr


def test_failures_table_shows_codes_and_fits_100_columns(tmp_path: Path) -> None:
    home = tmp_path / "h"
    with Node.create(home, dataset="acme", node="HN") as n:
        rids = [n.put("customers", {"code": f"KH{i:02d}", "name": f"C{i}"}) for i in range(5)]
        record_failure(
            n, "upload", "customers", "locked_period", "period 2026-01 of dataset acme is "
            "locked on the relay; unlock it there or book in an open period", 1_795_000_000_000,
            rids,
        )  # fmt: skip
    text = run("failures", "--home", home).stdout
    assert all(len(line) <= 100 for line in text.splitlines()), text
    assert not ULID.search(text), text
    print(text)
    assert "KH00" in text and "+2" in text and "locked_period" in text


def test_prefix_functions() -> None:
    ids = ["abc123", "abd999", "xyz000"]
    assert match_prefix("abc", ids, "id") == "abc123"
    assert match_prefix("ABD", ids, "id") == "abd999"
    assert match_prefix("q", ids, "id") is None
    with pytest.raises(AmbiguousId, match="abc123, abd999"):
        match_prefix("ab", ids, "id")
    assert short_ids(ids, minimum=2) == {"abc123": "abc", "abd999": "abd", "xyz000": "xy"}
