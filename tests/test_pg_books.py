"""The head-office books in PostgreSQL (adapters.pg_books): the same rows
as the SQLite books, incremental = rebuild over vouchers from two branches,
no half batch when the connection is killed mid-apply, the follower thread,
refusals, and the report commands. Every test has a database of its own
(tests/pg.py: skipped loudly without PostgreSQL, failing under CI=true)."""

from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.accounting import TABLES, VOUCHER_BOOKS
from adapters.pg_books import pending, queued_upto
from adapters.pg_books.books import BRANCH_TABLES, PgBooks, PgConn
from adapters.pg_books.feed import Follower, ReportBooks, ensure_enabled, forget, rebuild
from adapters.testing import make_node, random_writes, run_acceptance, snapshot
from engine import Node
from engine.cli import cli
from engine.errors import QueryError, ReportingError, ReportingUnreachable

SHARED_VIEWS = ("stock_on_hand", "account_balances", "receivables", "contract_progress")
_schemas = itertools.count()


def pg_rows(url: str, schema: str, relation: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(f'SELECT * FROM "{schema}"."{relation}"').fetchall()
    return sorted((tuple(r) for r in rows), key=repr)


def pg_books(url: str, schema: str, node: Node) -> dict[str, list[tuple[Any, ...]]]:
    """Every table of the PostgreSQL books, sorted."""
    return {t: pg_rows(url, schema, t) for t in PgBooks(node.schema).tables()}


def without_branch(table: str, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    if table not in BRANCH_TABLES:
        return rows
    return sorted((r[:-1] for r in rows), key=repr)


def assert_same_as_sqlite(url: str, schema: str, node: Node) -> None:
    """The PostgreSQL books hold the SQLite accounting books' rows (plus a
    branch column), and the shared views show the same."""
    lite = snapshot(node)
    pg = pg_books(url, schema, node)
    for table in [*TABLES, *(c.name for c in PgBooks(node.schema).catalogs)]:
        assert without_branch(table, pg[table]) == lite[table], table
    mine = [r for r in lite["adapter_conflicts"] if r[0] == "accounting"]
    assert pg["adapter_conflicts"] == mine
    for view in SHARED_VIEWS:
        try:
            want = node.query(f"SELECT * FROM {view}").rows
        except QueryError as exc:
            # SQLite's 64-bit sums overflow on the generator's huge amounts;
            # PostgreSQL's are NUMERIC and still show them.
            assert "overflow" in str(exc)
            continue
        assert pg_rows(url, schema, view) == sorted((tuple(r) for r in want), key=repr), view


def wait_until(done: Any, what: str, timeout: float = 30) -> None:
    """Poll ``done()`` until it is true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def feed_all(node: Node, books: ReportBooks, rng: random.Random, most: int = 50) -> None:
    """Apply the whole queue in batches of random sizes."""
    while True:
        at = books.position()
        assert at is not None
        changes, upto = pending(node.store.conn, at, rng.randint(1, most))
        if not changes:
            return
        assert books.apply(changes, at, upto)


def test_pg_books_hold_the_sqlite_books(tmp_path: Path, pg_url: str) -> None:
    """The accounting acceptance suite, each node's books then rebuilt in
    PostgreSQL: table for table the SQLite rows."""

    def check(node: Node) -> None:
        ensure_enabled(node)
        schema = f"acc_{node.node_id.lower()}"
        books = ReportBooks(pg_url, schema, node)
        try:
            rebuild(node, books)
        finally:
            books.close()
        assert_same_as_sqlite(pg_url, schema, node)

    run_acceptance("accounting", tmp_path, seed=3, steps=60, check=check)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.sampled_from("AB"), st.integers(1, 12)),
        st.tuples(st.just("sync"), st.sampled_from("AB"), st.just(0)),
        st.tuples(st.just("cross"), st.just("A"), st.just(0)),
        st.tuples(st.just("feed"), st.just("R"), st.integers(1, 40)),
    ),
    min_size=3,
    max_size=14,
)


# Each example makes fresh nodes and a schema of its own in the test's database.
@settings(
    max_examples=8,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=OPS, seed=st.integers(0, 2**16))
def test_incremental_equals_rebuild_two_branches(
    tmp_path_factory: pytest.TempPathFactory, pg_url: str, ops: list[Any], seed: int
) -> None:
    print(f"seed={seed} ops={ops}")
    root = tmp_path_factory.mktemp("two")
    rng = random.Random(seed)
    branches = {b: make_node(root / b, b, seed=seed + i) for i, b in enumerate("AB")}
    hq = make_node(root / "hq", "HQ", adapters={"accounting": {}}, seed=seed + 9)
    schema = f"two_{next(_schemas)}"
    books = ReportBooks(pg_url, schema, hq)
    try:
        rebuild(hq, books)
        colls = sorted(VOUCHER_BOOKS)
        for op, who, n in ops:
            if op == "write":
                random_writes(branches[who], rng, n, colls)
            elif op == "sync":
                hq.import_updates(branches[who].export_updates(hq.state()))
            elif op == "cross":  # the branches see each other's catalogs
                a, b = branches["A"], branches["B"]
                a.import_updates(b.export_updates(a.state()))
                b.import_updates(a.export_updates(b.state()))
            else:
                feed_all(hq, books, rng, n)
        for b in branches.values():
            hq.import_updates(b.export_updates(hq.state()))
        feed_all(hq, books, rng)
        incremental = pg_books(pg_url, schema, hq)
        assert_same_as_sqlite(pg_url, schema, hq)
        # The branch column is the node that booked the voucher.
        created = dict(
            hq.query(
                "SELECT id, created_node FROM records WHERE collection IN "
                f"({', '.join(repr(v) for v in VOUCHER_BOOKS)})"
            ).rows
        )
        for row in incremental["vouchers"]:
            assert row[-1] == created[row[0]] and row[-1] in "AB"
        rebuild(hq, books)
        assert pg_books(pg_url, schema, hq) == incremental
    finally:
        books.close()
        for node in (*branches.values(), hq):
            node.close()


def test_connection_killed_mid_apply_leaves_no_half_batch(tmp_path: Path, pg_url: str) -> None:
    hq = make_node(tmp_path / "hq", "HQ", adapters={"accounting": {}})
    books = ReportBooks(pg_url, "kill", hq)
    try:
        rebuild(hq, books)
        random_writes(hq, random.Random(5), 40, sorted(VOUCHER_BOOKS))
        before, at = pg_books(pg_url, "kill", hq), books.position()
        assert at is not None
        changes, upto = pending(hq.store.conn, at, 10_000)
        assert len(changes) > 20
        pid = books._connected().info.backend_pid
        calls = {"n": 0}
        real = PgConn.copy_rows

        def killing(self: PgConn, table: str, rows: Any) -> None:
            calls["n"] += 1
            if calls["n"] == 2:  # the vouchers are written by now, their lines not
                with psycopg.connect(pg_url, autocommit=True) as admin:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            real(self, table, rows)

        PgConn.copy_rows = killing  # type: ignore[method-assign]
        try:
            with pytest.raises(ReportingUnreachable, match="nothing half applied"):
                books.apply(changes, at, upto)
        finally:
            PgConn.copy_rows = real  # type: ignore[method-assign]
        assert calls["n"] >= 2
        assert books.position() == at  # reconnected: the batch is not there
        assert pg_books(pg_url, "kill", hq) == before
        assert books.apply(changes, at, upto)
        assert books.apply(changes, at, upto) is False  # applied once only
        assert_same_as_sqlite(pg_url, "kill", hq)
    finally:
        books.close()
        hq.close()


def test_another_home_is_refused_and_unreachable_is_clear(tmp_path: Path, pg_url: str) -> None:
    one = make_node(tmp_path / "one", "HQ")
    two = make_node(tmp_path / "two", "HQ2")
    try:
        first = ReportBooks(pg_url, "acme", one)
        rebuild(one, first)
        first.close()
        other = ReportBooks(pg_url, "acme", two)
        with pytest.raises(ReportingError, match="run 'branchline report rebuild'"):
            other.position()
        rebuild(two, other)  # taking the schema over is a rebuild
        assert other.position() == 0
        other.close()
        down = ReportBooks("postgresql://postgres:secret@127.0.0.1:1/test", "acme", one)
        with pytest.raises(ReportingUnreachable) as caught:
            down.position()
        assert "secret" not in str(caught.value) and "catch up" in str(caught.value)
    finally:
        one.close()
        two.close()


def test_follower_feeds_live_and_waits_out_an_unreachable_server(
    tmp_path: Path, pg_url: str
) -> None:
    hq = make_node(tmp_path / "hq", "HQ", adapters={"accounting": {}})
    ensure_enabled(hq)
    down = Follower(tmp_path / "hq", "postgresql://postgres@127.0.0.1:1/x", "s", retry_s=0.05)
    live = Follower(tmp_path / "hq", pg_url, "live")
    try:
        down.start()
        live.start()
        random_writes(hq, random.Random(8), 30, sorted(VOUCHER_BOOKS))
        want = hq.query("SELECT COUNT(*) FROM vouchers").rows[0][0]
        wait_until(
            lambda: live.position is not None and len(pg_rows(pg_url, "live", "vouchers")) == want,
            "the vouchers",
        )
        assert down.alive and down.error is None  # still retrying
    finally:
        down.stop()
        live.stop()
    assert live.error is None
    assert_same_as_sqlite(pg_url, "live", hq)
    hq.close()


def test_report_rebuild_command(tmp_path: Path, pg_url: str) -> None:
    hq = make_node(tmp_path / "hq", "HQ", adapters={"accounting": {}})
    random_writes(hq, random.Random(2), 20, sorted(VOUCHER_BOOKS))
    hq.close()
    runner = CliRunner()
    args = ["report", "rebuild", "--home", str(tmp_path / "hq"), "--pg", pg_url]
    done = runner.invoke(cli, [*args, "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["schema"] == "acceptance" and report["records"] >= 10
    bad = runner.invoke(cli, [*args[:-1], "postgresql://postgres@127.0.0.1:1/x"])
    assert bad.exit_code == 1
    assert bad.stderr.startswith("error: PostgreSQL postgresql://postgres@127.0.0.1:1/x")


def test_books_older_than_the_queue_are_rebuilt(tmp_path: Path, pg_url: str) -> None:
    """Books restored from an older dump stand before queue rows already
    deleted: the follower rebuilds them instead of missing those changes."""
    hq = make_node(tmp_path / "hq", "HQ", adapters={"accounting": {}})
    books = ReportBooks(pg_url, "old", hq)
    rebuild(hq, books)
    random_writes(hq, random.Random(4), 30, sorted(VOUCHER_BOOKS))
    feed_all(hq, books, random.Random(4))
    at = books.position()
    assert at is not None and at > 0
    forget(hq, at)
    books.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:  # as an older dump would
        conn.execute("UPDATE old.report_position SET seq = 0")
        conn.execute("DELETE FROM old.vouchers")
    follower = Follower(tmp_path / "hq", pg_url, "old")
    follower.start()
    try:
        wait_until(lambda: follower.position == at, "the rebuild")
    finally:
        follower.stop()
    assert follower.error is None and follower.position == at
    assert_same_as_sqlite(pg_url, "old", hq)
    hq.close()


def test_postgresql_away_then_back_the_books_catch_up(tmp_path: Path, pg_url: str) -> None:
    """PostgreSQL behind a fault proxy: while its connections are reset and
    refused, the node takes in a branch's updates (as its sync does) and the
    follower waits; healed, the books catch up with every change once."""
    from harness.faults import ProxyHost

    branch = make_node(tmp_path / "a", "A")
    hq = make_node(tmp_path / "hq", "HQ", adapters={"accounting": {}})
    ensure_enabled(hq)
    host = ProxyHost(random.Random(1))
    pg_port = int(pg_url.rsplit(":", 1)[1].split("/")[0])
    proxy = host.add(pg_port)
    via_proxy = pg_url.replace(f":{pg_port}/", f":{proxy.port}/")
    follower = Follower(tmp_path / "hq", via_proxy, "away", retry_s=0.05, retry_max_s=0.2)
    rng = random.Random(6)

    def settle(want: int) -> None:
        wait_until(lambda: (follower.position or 0) >= want, f"the follower at {want}")

    def queued() -> int:
        with hq.store.reading() as conn:
            return queued_upto(conn)

    try:
        follower.start()
        random_writes(branch, rng, 20, sorted(VOUCHER_BOOKS))
        hq.import_updates(branch.export_updates(hq.state()))
        settle(queued())
        host.call(lambda: proxy.refuse(True))
        host.call(proxy.reset)
        random_writes(branch, rng, 30, sorted(VOUCHER_BOOKS))
        hq.import_updates(branch.export_updates(hq.state()))  # the node goes on
        time.sleep(1.0)
        assert follower.alive and follower.error is None
        host.call(proxy.heal)
        settle(queued())
    finally:
        follower.stop()
        host.close()
    assert follower.error is None
    assert_same_as_sqlite(pg_url, "away", hq)
    branch.close()
    hq.close()
