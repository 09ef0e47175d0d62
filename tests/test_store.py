"""The node store: format 4 -> 5 (sync failures get a ``code`` column)
and on to the current one."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from store_formats import downgrade

from engine.node import Node
from engine.store import FORMAT_VERSION, STORE_FILE
from engine.sync import failures


def test_a_format_4_store_gets_failure_codes_from_the_reasons(tmp_path: Path) -> None:
    node = Node.create(tmp_path / "h", dataset="acme", node="A")
    failures.record_failure(node, failures.UPLOAD, "customers", "locked_period", "locked", 1)
    failures.record_failure(node, failures.DOWNLOAD, "sales_invoice/2026-01", "schema", "no", 2)
    node.close()
    downgrade(tmp_path / "h", 4)
    conn = sqlite3.connect(tmp_path / "h" / STORE_FILE)
    # As format 4 stored them: the code only in the reason, and older rows
    # whose reason has none (or a head that is no code).
    conn.executescript(
        "INSERT INTO sync_failures (direction, doc, reason, first_at, last_at) VALUES "
        "('upload', 'items', 'the relay said no', 3, 3), "
        "('upload', 'suppliers', 'Bad Thing: x', 4, 4), "
        "('download', 'accounts', 'not_author: waits for: more', 5, 5);"
    )
    conn.close()
    node = Node.open(tmp_path / "h")
    version = node.store.conn.execute("PRAGMA user_version").fetchone()[0]
    assert version == FORMAT_VERSION
    got = {(f.doc, f.code, f.reason) for f in failures.list_failures(node)}
    assert got == {
        ("customers", "locked_period", "locked_period: locked"),
        ("sales_invoice/2026-01", "schema", "schema: no"),
        ("items", "local", "the relay said no"),
        ("suppliers", "local", "Bad Thing: x"),
        ("accounts", "not_author", "not_author: waits for: more"),
    }
    # The column is what the policy reads now: a schema download is held.
    assert failures.held_downloads(node) == {"sales_invoice/2026-01"}
    assert failures.retry_codes(node, failures.DOWNLOAD, {"not_author"}) != []
    node.close()


def test_a_failure_recorded_again_counts_an_attempt_and_keeps_its_code(tmp_path: Path) -> None:
    node = Node.create(tmp_path / "h", dataset="acme", node="A")
    first = failures.record_failure(node, failures.UPLOAD, "items", "bad_update", "no", 1)
    again = failures.record_failure(node, failures.UPLOAD, "items", "bad_update", "no", 2)
    assert first == again
    [failure] = failures.list_failures(node)
    assert (failure.code, failure.attempts, failure.first_at, failure.last_at) == (
        "bad_update",
        2,
        1,
        2,
    )
    node.close()
