"""The ``branchline`` CLI contract (issue 2 §7): every command, the ``--json``
shapes, and for every kind of user mistake: exit 2, one line on stderr, nothing
written."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from engine.cli import cli
from engine.exchange import encode_export, read_export
from engine.node import Node
from engine.store.node_store import STORE_FILE

SALE = {
    "date": "2024-05-06",
    "customer": "KH001",
    "warehouse": "K1",
    "paid": False,
    "lines": [{"item": "SP01", "qty": 2, "price": "1.10", "vat_rate": "0.1"}],
}


def run(*args: str | Path, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, env=env)


def ok(*args: str | Path, input: str | None = None) -> Any:
    """Run a command that must succeed with --json-style output; its parsed JSON."""
    result = run(*args, input=input)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    return json.loads(result.stdout)


def done(*args: str | Path) -> Result:
    """Run a command that must succeed (text output)."""
    result = run(*args)
    assert result.exit_code == 0, result.stderr
    return result


def init(home: Path, node: str = "hn", dataset: str = "acme") -> Path:
    result = run("node", "init", "--home", home, "--dataset", dataset, "--node", node)
    assert result.exit_code == 0, result.stderr
    return home


def seed(home: Path) -> None:
    """Catalog entries a sales invoice can refer to."""
    ok("put", "--home", home, "customers", '{"code": "KH001", "name": "Công ty An Phát"}')
    ok("put", "--home", home, "warehouses", '{"code": "K1", "name": "Kho 1"}')
    ok("put", "--home", home, "items", '{"code": "SP01", "name": "Bút", "price": 5000}')


def dump(home: Path) -> list[str]:
    """The whole node store as SQL text, to prove that nothing was written."""
    conn = sqlite3.connect(home / STORE_FILE)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def assert_user_error(result: Result, *needles: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    h = init(tmp_path / "hn")
    seed(h)
    return h


# -- node init -----------------------------------------------------------------


def test_node_init_text_and_json(tmp_path: Path) -> None:
    result = run("node", "init", "--home", tmp_path / "a", "--dataset", "acme", "--node", "hn")
    assert result.exit_code == 0
    assert "created node 'hn' of dataset 'acme'" in result.stdout
    info = ok(
        "node", "init", "--home", tmp_path / "b", "--dataset", "acme", "--node", "hcm",
        "--relay", "wss://relay.example:8443", "--token", "s3cret", "--json",
    )  # fmt: skip
    assert info == {
        "home": str(tmp_path / "b"),
        "dataset": "acme",
        "node": "hcm",
        "schema": "accounting",
        "schema_version": 2,
        "relay": "wss://relay.example:8443",
        "adapters": [],
    }
    with Node.open(tmp_path / "b") as node:
        assert node.store.meta()["relay"] == "wss://relay.example:8443"


def test_node_init_with_a_schema_file(tmp_path: Path) -> None:
    schema = tmp_path / "shop.toml"
    schema.write_text(
        'schema = "shop"\nversion = 3\n[collections.products]\nkind = "catalog"\n'
        'fields.code = { type = "text", required = true }\nfields.stock = "int"\n'
    )
    info = ok(
        "node", "init", "--home", tmp_path / "h", "--dataset", "shop", "--node", "till1",
        "--schema", schema, "--json",
    )  # fmt: skip
    assert (info["schema"], info["schema_version"]) == ("shop", 3)
    ok("put", "--home", tmp_path / "h", "products", '{"code": "P1", "stock": 7}')
    assert ok("list", "--home", tmp_path / "h", "products", "--json")[0]["stock"] == 7
    # A whole number written with an exponent is still an exact int.
    ok("put", "--home", tmp_path / "h", "products", '{"code": "P2", "stock": 1e3}')
    assert ok("get", "--home", tmp_path / "h", "products", "P2", "--json")["stock"] == 1000
    # An int beyond 64 bits is refused clearly, not mangled by the CRDT.
    before = dump(tmp_path / "h")
    too_big = '{"code": "P3", "stock": 99999999999999999999}'
    assert_user_error(
        run("put", "--home", tmp_path / "h", "products", too_big), "products.stock", "64 bits"
    )
    assert dump(tmp_path / "h") == before


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--dataset", "acme co", "--node", "hn"], "invalid dataset name"),
        (["--dataset", "acme", "--node", "h/n"], "invalid node name"),
        (["--dataset", "acme", "--node", "hn", "--schema", "nope.toml"], "nope.toml"),
        (["--dataset", "acme", "--node", "hn", "--relay", "wss://r"], "--relay and --token"),
        (["--dataset", "acme", "--node", "hn", "--token", "t"], "--relay and --token"),
        (["--dataset", "acme", "--node", "hn", "--relay", "r:1", "--token", "t"], "ws://"),
        (["--node", "hn"], "--dataset"),
    ],
)
def test_node_init_mistakes_create_nothing(tmp_path: Path, args: list[str], needle: str) -> None:
    assert_user_error(run("node", "init", "--home", tmp_path / "h", *args), needle)
    assert not (tmp_path / "h").exists()


def test_node_init_bad_schema_names_file_and_field(tmp_path: Path) -> None:
    schema = tmp_path / "bad.toml"
    schema.write_text('[collections.things]\nkind = "catalog"\nfields.code = "money"\n')
    result = run(
        "node", "init", "--home", tmp_path / "h", "--dataset", "a", "--node", "n",
        "--schema", schema,
    )  # fmt: skip
    assert_user_error(result, "bad.toml", "things", "code")
    assert not (tmp_path / "h").exists()


def test_node_init_refuses_an_existing_home(home: Path) -> None:
    before = dump(home)
    result = run("node", "init", "--home", home, "--dataset", "acme", "--node", "other")
    assert_user_error(result, "already holds a node store")
    assert dump(home) == before


# -- put, voucher, get, list, delete --------------------------------------------


def test_put_creates_then_updates_only_the_given_fields(home: Path) -> None:
    created = ok("put", "--home", home, "customers", '{"code": "KH9", "name": "A", "address": "X"}')
    assert set(created) == {"id"}
    updated = ok("put", "--home", home, "customers", '{"code": "KH9", "name": "B"}', "--json")
    assert updated == created
    record = ok("get", "--home", home, "customers", "KH9", "--json")
    assert record == {"id": created["id"], "code": "KH9", "name": "B", "address": "X"}
    by_id = ok("put", "--home", home, "customers", json.dumps({"id": created["id"], "name": "C"}))
    assert by_id == created
    assert ok("get", "--home", home, "customers", created["id"], "--json")["name"] == "C"


def test_put_reads_json_from_stdin(home: Path) -> None:
    rid = ok("put", "--home", home, "customers", "-", input='{"code": "KH7", "name": "Ánh"}')["id"]
    assert ok("get", "--home", home, "customers", "KH7", "--json")["id"] == rid


def test_voucher_numbers_and_list_json_shape(home: Path) -> None:
    # Written by hand: 1.10 must reach the engine as the exact decimal 1.10.
    sale = (
        '{"date": "2024-05-06", "customer": "KH001", "warehouse": "K1", "paid": false, '
        '"lines": [{"item": "SP01", "qty": 2, "price": 1.10, "vat_rate": "0.1"}]}'
    )
    first = ok("voucher", "--home", home, "sales_invoice", sale)
    second = ok("voucher", "--home", home, "sales_invoice", json.dumps(SALE))
    assert set(first) == {"id", "number", "provisional"}
    assert (first["number"], second["number"]) == ("HDhn-2024-000001", "HDhn-2024-000002")
    assert first["provisional"] is False
    listed = ok("list", "--home", home, "sales_invoice", "--json")
    assert [r["id"] for r in listed] == [first["id"], second["id"]]
    assert listed[0] == {
        "id": first["id"],
        "number": "HDhn-2024-000001",
        "date": "2024-05-06",  # ISO date
        "customer": "KH001",  # reference shown as its code
        "warehouse": "K1",
        "paid": False,
        # decimals exact, as strings: 1.10 was never a float
        "lines": [{"item": "SP01", "qty": "2", "price": "1.10", "vat_rate": "0.1"}],
    }
    items = ok("list", "--home", home, "items", "--json")
    assert items[0]["price"] == "5000" and set(items[0]) == {"id", "code", "name", "price"}


def test_text_output_is_a_readable_table(home: Path) -> None:
    ok("voucher", "--home", home, "sales_invoice", json.dumps(SALE))
    listing = run("list", "--home", home, "customers")
    assert listing.exit_code == 0
    assert "customers (1 record)" in listing.stdout and "Công ty An Phát" in listing.stdout
    invoices = run("list", "--home", home, "sales_invoice")
    assert "HDhn-2024-000001" in invoices.stdout and "item=SP01" in invoices.stdout
    one = run("get", "--home", home, "items", "SP01")
    assert one.exit_code == 0 and "Bút" in one.stdout and "5000" in one.stdout
    assert run("conflicts", "--home", home).stdout.strip() == "no conflicts"
    # Markup-looking data is shown as typed, never interpreted by rich.
    ok("put", "--home", home, "customers", '{"code": "KH[b]", "name": "[red]x[/red]"}')
    assert "[red]x[/red]" in run("list", "--home", home, "customers").stdout


def test_delete(home: Path) -> None:
    rid = ok("put", "--home", home, "customers", '{"code": "KH2", "name": "Gone"}')["id"]
    assert ok("delete", "--home", home, "customers", rid) == {"id": rid}
    assert [r["code"] for r in ok("list", "--home", home, "customers", "--json")] == ["KH001"]
    assert_user_error(run("delete", "--home", home, "customers", rid), "no live record")
    assert_user_error(run("get", "--home", home, "customers", "KH2"), "no live record", "KH2")
    other = ok("put", "--home", home, "customers", '{"code": "KH3", "name": "By key"}')["id"]
    assert ok("delete", "--home", home, "customers", "KH3") == {"id": other}


def test_home_defaults_to_env_then_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    init(tmp_path / "env-home")
    env = {"BRANCHLINE_HOME": str(tmp_path / "env-home")}
    result = run("put", "customers", '{"code": "E1", "name": "env"}', env=env)
    assert result.exit_code == 0, result.stderr
    with Node.open(tmp_path / "env-home") as node:
        assert node.get("customers", "E1") is not None
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    made = run("node", "init", "--dataset", "acme", "--node", "cwd", env={"BRANCHLINE_HOME": ""})
    assert made.exit_code == 0, made.stderr
    assert (tmp_path / "cwd" / STORE_FILE).exists()


# -- user mistakes: exit 2, one line, nothing written ---------------------------

MISTAKES = [
    (["put", "customers", "{bad json"], "invalid JSON"),
    (["put", "customers", '["not", "an object"]'], "expected a JSON object"),
    (["put", "customers", '{"code": "K", "name": "a", "name": "b"}'], "given twice"),
    (["put", "items", '{"code": "X", "name": "x", "price": NaN}'], "NaN"),
    (["put", "nowhere", '{"code": "X"}'], "unknown collection 'nowhere'"),
    (["put", "customers", '{"code": "KH5"}'], "missing required field(s) name"),
    (["put", "customers", '{"code": "KH5", "name": 7}'], "customers.name: expected text"),
    (["put", "items", '{"code": "X", "name": "x", "price": "cheap"}'], "items.price"),
    (["put", "customers", '{"code": "KH5", "name": "n", "colour": "red"}'], "unknown field"),
    (["put", "contracts", '{"code": "C1", "customer": "KH404"}'], "KH404"),
    (["put", "customers", '{"id": "01M84MQ53AAKS1EX10WTHN3S9V", "name": "x"}'], "no live record"),
    (["voucher", "customers", '{"code": "X", "name": "x"}'], "not a voucher book"),
    (["voucher", "sales_invoice", json.dumps({**SALE, "date": "2024-13-01"})], "YYYY-MM-DD"),
    (["voucher", "sales_invoice", json.dumps({**SALE, "customer": "KH404"})], "KH404"),
    (["voucher", "sales_invoice", json.dumps({**SALE, "lines": [{"qty": 1}]})], "item"),
    (["voucher", "cash_receipt", '{"date": "2024-05-01", "customer": "KH001"}'], "amount"),
    (["delete", "customers", "KH404"], "no live record"),
    (["get", "customers", "KH404"], "no live record"),
    (["list", "nowhere"], "unknown collection"),
    (["put", "customers"], "Missing argument 'JSON'"),
    (["list", "customers", "--bogus"], "No such option"),
    (["frobnicate"], "No such command"),
]


@pytest.mark.parametrize(("args", "needle"), MISTAKES, ids=[" ".join(m[0])[:40] for m in MISTAKES])
def test_user_mistakes_exit_2_with_one_line_and_write_nothing(
    home: Path, args: list[str], needle: str
) -> None:
    ok("voucher", "--home", home, "sales_invoice", json.dumps(SALE))
    before = dump(home)
    assert_user_error(run(*args, "--home", home), needle)
    assert dump(home) == before
    # A failed voucher uses no number: the next one continues the series.
    assert ok("voucher", "--home", home, "sales_invoice", json.dumps(SALE))["number"] == (
        "HDhn-2024-000002"
    )


def test_missing_home_is_a_user_mistake(tmp_path: Path) -> None:
    assert_user_error(run("list", "--home", tmp_path / "nope", "items"), "no node store")
    assert not (tmp_path / "nope").exists()


# -- export, import, state, conflicts --------------------------------------------


def test_exchange_converges_and_shows_conflicts(tmp_path: Path) -> None:
    a, b = init(tmp_path / "a", "hn"), init(tmp_path / "b", "hcm")
    seed(a)
    full = ok("export", "--home", a, tmp_path / "a.blx", "--json")
    assert full == {
        "file": str(tmp_path / "a.blx"),
        "dataset": "acme",
        "node": "hn",
        "documents": 3,
        "bytes": (tmp_path / "a.blx").stat().st_size,
        "since_state_of": None,
        "unsynced": False,
    }
    first = ok("import", "--home", b, tmp_path / "a.blx", "--json")
    assert first == {
        "file": str(tmp_path / "a.blx"),
        "dataset": "acme",
        "from_node": "hn",
        "documents_in_file": 3,
        "documents_changed": 3,
        "records_changed": 3,
        "records_waiting": 0,
        "series_state_restored": 0,  # another node's state is not restored
        "changed": True,
        "unsynced": False,
    }
    # Offline at both: one field edited at both, the same new code at both.
    ok("put", "--home", a, "customers", '{"code": "KH001", "name": "An Phát (HN)"}')
    ok("put", "--home", b, "customers", '{"code": "KH001", "name": "An Phát (SG)"}')
    ok("put", "--home", a, "customers", '{"code": "KH002", "name": "Minh"}')
    ok("put", "--home", b, "customers", '{"code": "KH002", "name": "Long"}')
    sale_b = ok("voucher", "--home", b, "sales_invoice", json.dumps(SALE))
    assert sale_b["number"] == "HDhcm-2024-000001"

    state = ok("state", "--home", b, tmp_path / "b.state", "--json")
    assert state["node"] == "hcm" and state["documents"] == 4 and state["dataset"] == "acme"
    delta = ok("export", "--home", a, tmp_path / "a2.blx", "--since-state", tmp_path / "b.state",
               "--json")  # fmt: skip
    assert delta["since_state_of"] == "hcm" and delta["documents"] == 1
    assert delta["bytes"] < full["bytes"]
    done("import", "--home", b, tmp_path / "a2.blx")
    done("export", "--home", b, tmp_path / "b.blx")
    done("import", "--home", a, tmp_path / "b.blx")

    for h in (a, b):
        assert (
            ok("list", "--home", h, "sales_invoice", "--json")[0]["number"] == "HDhcm-2024-000001"
        )
    assert ok("list", "--home", a, "customers", "--json") == ok(
        "list", "--home", b, "customers", "--json"
    )
    conflicts = ok("conflicts", "--home", a, "--json")
    assert conflicts == ok("conflicts", "--home", b, "--json")
    kinds = {c["kind"]: c for c in conflicts}
    assert set(kinds) == {"concurrent_edit", "duplicate_key"}
    edit = kinds["concurrent_edit"]
    assert {"id", "kind", "collection", "records", "field", "values"} <= set(edit)
    assert (edit["collection"], edit["field"]) == ("customers", "name")
    assert {v["node"] for v in edit["values"]} == {"hn", "hcm"}
    assert {v["value"] for v in edit["values"]} == {"An Phát (HN)", "An Phát (SG)"}
    assert [v["in_force"] for v in edit["values"]] == [True, False]
    dup = kinds["duplicate_key"]
    assert (dup["key"], len(dup["records"])) == ("KH002", 2)
    text = run("conflicts", "--home", a)
    assert text.exit_code == 0 and "concurrent_edit" in text.stdout and "An Phát" in text.stdout


def test_edit_delete_conflict_shape(tmp_path: Path) -> None:
    a, b = init(tmp_path / "a", "hn"), init(tmp_path / "b", "hcm")
    rid = ok("put", "--home", a, "customers", '{"code": "KH1", "name": "An"}')["id"]
    done("export", "--home", a, tmp_path / "a.blx")
    done("import", "--home", b, tmp_path / "a.blx")
    ok("delete", "--home", a, "customers", "KH1")
    ok("put", "--home", b, "customers", '{"code": "KH1", "name": "Bình"}')
    done("export", "--home", a, tmp_path / "a2.blx")
    done("export", "--home", b, tmp_path / "b.blx")
    done("import", "--home", a, tmp_path / "b.blx")
    done("import", "--home", b, tmp_path / "a2.blx")
    found = ok("conflicts", "--home", a, "--json")
    assert found == ok("conflicts", "--home", b, "--json")
    assert [(c["kind"], c["records"], c["field"]) for c in found] == [
        ("edit_delete", [rid], "_deleted")
    ]
    delete, *edits = found[0]["values"]
    assert (delete["node"], delete["value"], delete["in_force"]) == ("hn", True, True)
    assert {"name": "Bình"} in [e["value"] for e in edits] and {e["node"] for e in edits} == {"hcm"}


def test_import_twice_changes_nothing(tmp_path: Path) -> None:
    a, b = init(tmp_path / "a", "hn"), init(tmp_path / "b", "hcm")
    seed(a)
    assert run("export", "--home", a, tmp_path / "x.blx").stdout.startswith("exported 3 documents")
    once = run("import", "--home", b, tmp_path / "x.blx")
    assert "3 of 3 documents changed" in once.stdout
    before = dump(b)
    again = run("import", "--home", b, tmp_path / "x.blx")
    assert again.exit_code == 0
    assert "nothing new" in again.stdout
    assert dump(b) == before
    assert ok("import", "--home", b, tmp_path / "x.blx", "--json")["changed"] is False
    state = run("state", "--home", b, tmp_path / "b.state")
    assert state.exit_code == 0 and "wrote the state of node 'hcm'" in state.stdout


def test_another_dataset_is_refused(tmp_path: Path) -> None:
    a, other = init(tmp_path / "a", "hn"), init(tmp_path / "o", "hq", dataset="globex")
    seed(a)
    done("export", "--home", a, tmp_path / "a.blx")
    done("state", "--home", a, tmp_path / "a.state")
    before = dump(other)
    assert_user_error(run("import", "--home", other, tmp_path / "a.blx"), "'acme'", "'globex'")
    assert dump(other) == before
    refused = run(
        "export", "--home", other, tmp_path / "o.blx", "--since-state", tmp_path / "a.state"
    )
    assert_user_error(refused, "'acme'", "'globex'")
    assert not (tmp_path / "o.blx").exists()


def test_damaged_and_foreign_files_are_refused(home: Path, tmp_path: Path) -> None:
    done("export", "--home", home, tmp_path / "x.blx")
    done("state", "--home", home, tmp_path / "x.state")
    data = (tmp_path / "x.blx").read_bytes()
    (tmp_path / "cut.blx").write_bytes(data[:-5])
    (tmp_path / "flip.blx").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    (tmp_path / "notes.txt").write_text("hello")
    before = dump(home)
    for name, needle in [
        ("cut.blx", "truncated"),
        ("flip.blx", "checksum"),
        ("notes.txt", "not a Branchline export file"),
        ("x.state", "state file"),
        ("missing.blx", "no such file"),
    ]:
        assert_user_error(run("import", "--home", home, tmp_path / name), name, needle)
    assert_user_error(
        run("export", "--home", home, tmp_path / "y.blx", "--since-state", tmp_path / "x.blx"),
        "export file, not a state file",
    )
    assert dump(home) == before
    assert not (tmp_path / "y.blx").exists()


def test_undecodable_update_is_an_error_of_the_data_not_a_crash(home: Path, tmp_path: Path) -> None:
    bad = encode_export(
        dataset="acme", node="evil", updates={"customers": b"\xff\xff"}, created_ms=1
    )
    (tmp_path / "bad.blx").write_bytes(bad)
    before = dump(home)
    result = run("import", "--home", home, tmp_path / "bad.blx")
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ")
    assert dump(home) == before


def test_exported_file_is_verified_and_complete(home: Path, tmp_path: Path) -> None:
    done("export", "--home", home, tmp_path / "x.blx")
    header, updates = read_export(tmp_path / "x.blx")
    assert (header.dataset, header.node) == ("acme", "hn")
    assert sorted(updates) == ["customers", "items", "warehouses"]


# -- real processes ---------------------------------------------------------------


def _branchline() -> str:
    beside = Path(sys.executable).parent / "branchline"
    found = str(beside) if beside.exists() else shutil.which("branchline")
    assert found, "the branchline command is not installed"
    return found


def test_real_process(tmp_path: Path) -> None:
    exe = _branchline()
    env = {**os.environ, "BRANCHLINE_HOME": str(tmp_path / "h")}

    def call(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=60)

    made = call("node", "init", "--dataset", "acme", "--node", "hn", "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["node"] == "hn"
    put = call("put", "items", '{"code": "SP01", "name": "Bút", "price": 0.1}')
    assert put.returncode == 0 and set(json.loads(put.stdout)) == {"id"}
    bad = call("put", "items", '{"code": "SP02", "name": "x", "price": [1]}')
    assert bad.returncode == 2
    assert bad.stdout == "" and len(bad.stderr.splitlines()) == 1
    assert bad.stderr.startswith("error: items.price") and "Traceback" not in bad.stderr
    listed = call("list", "items", "--json")
    assert json.loads(listed.stdout)[0]["price"] == "0.1"
    version = call("--version")
    assert version.returncode == 0 and "branchline" in version.stdout


def test_demo_runs_and_converges() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "harness.demo"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "HN, HCM and DN are identical" in result.stdout
    assert "every node shows identical books; everything stopped cleanly" in result.stdout
    for shown in ("HDHN-2024-000001", "HDDN-2024-000001", "duplicate_key", "concurrent_edit"):
        assert shown in result.stdout


def test_init_with_adapters_json_everywhere_and_a_query_hint(tmp_path: Path) -> None:
    home = tmp_path / "with"
    made = ok("node", "init", "--home", home, "--dataset", "acme", "--node", "hn",
              "--adapter", "accounting", "--json")  # fmt: skip
    assert made["adapters"] == ["accounting"]
    seed(home)
    assert ok("query", "--home", home, "SELECT COUNT(*) AS n FROM receivables", "--json") == [
        {"n": 0}
    ]
    assert ok("adapters", "disable", "--home", home, "accounting", "--json") == {
        "adapter": "accounting",
        "enabled": False,
    }
    missing = run("query", "--home", home, "SELECT * FROM receivables")
    assert missing.exit_code == 2
    assert f"'branchline adapters enable --home {home} accounting'" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert ok("adapters", "enable", "--home", home, "accounting", "--json")["enabled"] is True
    assert ok("node", "offline", "--home", home, "--json") == {
        "home": str(home),
        "offline_mode": True,
    }
    assert ok("node", "online", "--home", home, "--json")["offline_mode"] is False
    unknown = run("query", "--home", home, "SELECT * FROM nowhere")
    assert unknown.exit_code == 2 and "adapters enable" not in unknown.stderr
