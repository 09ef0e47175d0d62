"""The replicated gap journal (DESIGN §4, docs/cli.md "series gaps"): a
voided or restored number is a ``number_gaps`` record written once by the
node that voided it, so every node (and, through the relay, every other
node) lists the same gaps, and no user write can change one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_series import invoice, setup_catalogs
from test_sync_live import ThreadRelay, free_port, init_home

from adapters.testing import assert_rebuild_identical
from engine import Node
from engine.cli import cli
from engine.clock import ManualClock
from engine.errors import SchemaError, UnknownCollection, UserError
from engine.relay.sqlite_store import SqliteRelayStore
from engine.schema import GAPS, parse_schema
from engine.sync import failures as fl
from engine.transport import node_sync


def make(home: Path, node: str) -> Node:
    return Node.create(home, dataset="books", node=node, clock=ManualClock(), rng=random.Random(7))


def test_a_void_is_journalled_once_and_replicates_to_other_nodes(tmp_path: Path) -> None:
    with make(tmp_path / "a", "A") as a, make(tmp_path / "b", "B") as b:
        setup_catalogs(a)
        kept = a.post_voucher("sales_invoice", invoice())
        gone = a.post_voucher("sales_invoice", invoice())
        a.delete("sales_invoice", gone.id)
        b.import_updates(a.export_updates())
        gaps = a.gaps()
        assert [(g["number"], g["reason"], g["voucher"], g["node"]) for g in gaps] == [
            (gone.number, "void", gone.id, "A")
        ]
        assert gaps[0]["series"] == "sales_invoice@2026"
        assert gaps[0]["collection"] == "sales_invoice"
        assert b.gaps() == gaps
        assert all(g["number"] != kept.number for g in b.gaps())
        # Restoring the voucher on B journals the number as back in use, on B.
        b.restore("sales_invoice", gone.id)
        a.import_updates(b.export_updates(a.state()))
        assert [(g["reason"], g["node"]) for g in a.gaps()] == [("void", "A"), ("restored", "B")]
        assert a.gaps() == b.gaps()
        assert a.gaps("sales_invoice") == a.gaps("sales_invoice@2026") == a.gaps()
        assert a.gaps("cash_receipt") == []
        with pytest.raises(UnknownCollection):
            a.gaps("customers")


def test_the_gap_journal_is_not_writable_by_users(tmp_path: Path) -> None:
    with make(tmp_path / "a", "A") as a:
        setup_catalogs(a)
        gone = a.post_voucher("sales_invoice", invoice())
        a.delete("sales_invoice", gone.id)
        gap = a.list(GAPS)[0]
        with pytest.raises(UserError, match="written by Branchline only"):
            a.put(GAPS, {"id": gap["id"], "reason": "typo"})
        with pytest.raises(UserError, match="written by Branchline only"):
            a.put(GAPS, {"code": "X", "series": "s", "collection": "c", "number": "1",
                         "reason": "void", "at": "now"})  # fmt: skip
        with pytest.raises(UserError, match="written by Branchline only"):
            a.delete(GAPS, gap["id"])
        assert a.list(GAPS) == [gap]


def test_a_schema_cannot_take_the_journal_name() -> None:
    text = '[collections.number_gaps]\nfields.code = "text"\n'
    with pytest.raises(SchemaError, match="reserved"):
        parse_schema(text)


def test_series_gaps_cli_table_and_json(tmp_path: Path) -> None:
    home = tmp_path / "a"
    with make(home, "A") as a:
        setup_catalogs(a)
        gone = a.post_voucher("sales_invoice", invoice())
        a.delete("sales_invoice", gone.id)
    runner = CliRunner()
    shown = runner.invoke(cli, ["series", "gaps", "--home", str(home)])
    assert shown.exit_code == 0, shown.output
    assert gone.number in shown.output and "void" in shown.output
    as_json = runner.invoke(cli, ["series", "gaps", "--home", str(home), "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert '"reason": "void"' in as_json.output.replace('":"', '": "')
    none = runner.invoke(cli, ["series", "gaps", "--home", str(home), "--series", "journal"])
    assert none.exit_code == 0 and "no gaps in journal" in none.output
    bad = runner.invoke(cli, ["series", "gaps", "--home", str(home), "--series", "nope"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output


def test_gaps_written_on_two_nodes_pass_the_relays_authorship_check(tmp_path: Path) -> None:
    """B voids a voucher A booked: B's entry is B's own, so the relay takes
    it, and A lists B's void after syncing."""
    store_path = tmp_path / "relay.db"
    with SqliteRelayStore.create(store_path) as store:
        tokens = {n: store.enroll("acme", n).token for n in ("A", "B")}
    port = free_port()
    homes = {n: tmp_path / n for n in ("A", "B")}
    for n in ("A", "B"):
        init_home(homes[n], n, port, tokens[n])
    relay = ThreadRelay(store_path, port)
    relay.start()
    try:
        with Node.open(homes["A"]) as a:
            asyncio.run(node_sync(a, timeout=60))  # numbering known: final numbers
            setup_catalogs(a)
            first = a.post_voucher("sales_invoice", invoice())
            second = a.post_voucher("sales_invoice", invoice())
            a.delete("sales_invoice", first.id)
            asyncio.run(node_sync(a, timeout=60))
            assert fl.list_failures(a) == [] and a.outbox() == []
        with Node.open(homes["B"]) as b:
            asyncio.run(node_sync(b, timeout=60))
            b.delete("sales_invoice", second.id)
            asyncio.run(node_sync(b, timeout=60))
            assert fl.list_failures(b) == [] and b.outbox() == []
            on_b = b.gaps()
        with Node.open(homes["A"]) as a:
            asyncio.run(node_sync(a, timeout=60))
            assert a.gaps() == on_b
        assert [(g["number"], g["node"]) for g in on_b] == sorted(
            [(first.number, "A"), (second.number, "B")]
        )
    finally:
        relay.stop()


def test_the_books_keep_a_number_gaps_table_rebuilt_as_kept(tmp_path: Path) -> None:
    with make(tmp_path / "a", "A") as a, make(tmp_path / "b", "B") as b:
        b.enable_adapter("accounting")
        setup_catalogs(a)
        gone = a.post_voucher("sales_invoice", invoice())
        a.delete("sales_invoice", gone.id)
        b.import_updates(a.export_updates())
        rows = b.query("SELECT series, number, reason, voucher, node FROM number_gaps").rows
        assert rows == [("sales_invoice@2026", gone.number, "void", gone.id, "A")]
        b.restore("sales_invoice", gone.id)
        reasons = sorted(b.query("SELECT reason FROM number_gaps").rows)
        assert reasons == [("restored",), ("void",)]
        assert_rebuild_identical(b)


def test_a_home_from_before_the_replicated_journal_publishes_its_voids_once(
    tmp_path: Path,
) -> None:
    home = tmp_path / "old"
    with make(home, "A") as a:
        setup_catalogs(a)
        gone = a.post_voucher("sales_invoice", invoice())
        a.delete("sales_invoice", gone.id)
        # As a home of the earlier code: the void only in the local journal.
        with a.store.transaction() as conn:
            conn.execute("DELETE FROM records WHERE collection = ?", (GAPS,))
            conn.execute("DELETE FROM meta WHERE key = 'gap_journal'")
        at = a.store.conn.execute("SELECT at FROM series_journal WHERE event = 'void'").fetchone()
    with Node.open(home, clock=ManualClock(), rng=random.Random(3)) as a:
        gaps = a.gaps()
        assert [(g["number"], g["reason"], g["voucher"]) for g in gaps] == [
            (gone.number, "void", gone.id)
        ]
        assert gaps[0]["at"].startswith(
            dt.datetime.fromtimestamp(at[0] / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M")
        )
        assert a.outbox()  # it goes up with the next sync
    with Node.open(home) as a:
        assert a.gaps() == gaps  # once
