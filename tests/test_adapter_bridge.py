"""The bridge (seed 003: Sales tasks <-> Work items): the exact seed mapping
table, echo-freedom (the richer Sales status survives), no ping-pong,
deletes, config errors, the CLI, live mode, and a round-trip stability
property over random edits on both sides."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adapters.bridge as bridge_mod
from adapters.bridge import Bridge, load_config
from engine import Node
from engine.cli import cli
from engine.errors import BranchlineError

EXAMPLE = Path(bridge_mod.__file__).parent / "sales_work.toml"
WORK_SCHEMA = Path(bridge_mod.__file__).parent / "work.toml"
SALES_STATUSES = ("not_started", "in_progress", "completed", "deferred", "waiting")
WORK_STATUSES = ("done", "not_done", "in_review")


def homes(root: Path) -> Path:
    """Two node homes of two datasets and the example config beside them."""
    Node.create(root / "sales", dataset="sales", node="S1").close()
    Node.create(root / "work", dataset="work", node="W1", schema=WORK_SCHEMA).close()
    shutil.copy(EXAMPLE, root / "bridge.toml")
    return root / "bridge.toml"


@contextmanager
def setup(root: Path) -> Iterator[tuple[Node, Node, Bridge]]:
    config = homes(root)
    sales = Node.open(root / "sales")
    work = Node.open(root / "work")
    bridge = Bridge(load_config(config))
    try:
        yield sales, work, bridge
    finally:
        bridge.close()
        sales.close()
        work.close()


def status(node: Node, coll: str, code: str) -> Any:
    rec = node.get(coll, code)
    assert rec is not None
    return rec.get("status")


@pytest.mark.parametrize(
    ("sales_status", "work_status"),
    [(s, "done" if s == "completed" else "not_done") for s in SALES_STATUSES],
)
def test_seed_table_sales_to_work(tmp_path: Path, sales_status: str, work_status: str) -> None:
    with setup(tmp_path) as (sales, work, bridge):
        sales.put("tasks", {"code": "T1", "title": "Gọi khách", "status": sales_status})
        report = bridge.run_once()
        assert report.created_b == 1
        assert status(work, "work_items", "T1") == work_status
        # Changed later, it maps the same way.
        sales.put("tasks", {"code": "T1", "status": "completed"})
        bridge.run_once()
        sales.put("tasks", {"code": "T1", "status": sales_status})
        bridge.run_once()
        assert status(work, "work_items", "T1") == work_status


@pytest.mark.parametrize(
    ("work_status", "sales_status"),
    [(w, "completed" if w == "done" else "not_started") for w in WORK_STATUSES],
)
def test_seed_table_work_to_sales(tmp_path: Path, work_status: str, sales_status: str) -> None:
    with setup(tmp_path) as (sales, work, bridge):
        work.put("work_items", {"code": "W1", "title": "Giao hàng", "status": work_status})
        bridge.run_once()
        assert status(sales, "tasks", "W1") == sales_status
        # From a completed task, a Work change maps the same way.
        work.put("work_items", {"code": "W1", "status": "done"})
        bridge.run_once()
        assert status(sales, "tasks", "W1") == "completed"
        if work_status != "done":
            work.put("work_items", {"code": "W1", "status": work_status})
            bridge.run_once()
            assert status(sales, "tasks", "W1") == sales_status


def test_richer_status_survives(tmp_path: Path) -> None:
    with setup(tmp_path) as (sales, work, bridge):
        sales.put("tasks", {"code": "T1", "title": "Báo giá", "status": "in_progress"})
        bridge.run_once()
        assert status(work, "work_items", "T1") == "not_done"
        work.put("work_items", {"code": "T1", "title": "Báo giá (sửa)"})
        report = bridge.run_once()
        assert report.updated_a == 1 and report.updated_b == 0
        task = sales.get("tasks", "T1")
        assert task is not None
        assert task["status"] == "in_progress" and task["title"] == "Báo giá (sửa)"
        # An unmapped field changes nothing anywhere; nothing is written twice.
        work.put("work_items", {"code": "T1", "project": "P-9"})
        assert bridge.run_once().writes == 0
        # Work saying not_done again (a value that maps to in_progress) keeps it.
        work.put("work_items", {"code": "T1", "status": "not_done"})
        assert bridge.run_once().writes == 0
        assert status(sales, "tasks", "T1") == "in_progress"
        # Work done -> completed; and back to not_done -> not_started.
        work.put("work_items", {"code": "T1", "status": "done"})
        bridge.run_once()
        assert status(sales, "tasks", "T1") == "completed"
        work.put("work_items", {"code": "T1", "status": "not_done"})
        bridge.run_once()
        assert status(sales, "tasks", "T1") == "not_started"


def test_no_ping_pong_and_deletes(tmp_path: Path) -> None:
    with setup(tmp_path) as (sales, work, bridge):
        for i in range(5):
            sales.put("tasks", {"code": f"T{i}", "title": f"task {i}", "status": "in_progress"})
        first = bridge.run_once()
        assert first.created_b == 5 and first.passes == 2  # the second pass writes nothing
        assert bridge.run_once().writes == 0
        sales.delete("tasks", "T0")
        work.delete("work_items", "T1")
        report = bridge.run_once()
        assert (report.deleted_a, report.deleted_b) == (1, 1)
        assert sorted(r["code"] for r in sales.list("tasks")) == ["T2", "T3", "T4"]
        assert sorted(r["code"] for r in work.list("work_items")) == ["T2", "T3", "T4"]


def test_links_existing_records_by_key(tmp_path: Path) -> None:
    """A record on both sides before the bridge ran is linked, not duplicated
    (also what happens when a crash came between a write and the state file)."""
    with setup(tmp_path) as (sales, work, bridge):
        sales.put("tasks", {"code": "T1", "title": "A", "status": "completed"})
        work.put("work_items", {"code": "T1", "title": "A", "status": "done"})
        report = bridge.run_once()
        assert report.linked == 1 and report.writes == 0
        assert work.count("work_items") == 1 and sales.count("tasks") == 1


def test_config_errors(tmp_path: Path) -> None:
    config = homes(tmp_path)
    text = config.read_text()
    bad = tmp_path / "bad.toml"
    for broken, message in [
        (text.replace('collection = "work_items"', 'collection = "nope"'), "unknown collection"),
        (text.replace('status = "status"', 'status = "statuz"'), "has no field 'statuz'"),
        (text.replace('code = "code"\n', ""), "need code"),
        ("extra = 1\n" + text, "unknown key"),
        ("name = ", "invalid TOML"),
    ]:
        bad.write_text(broken)
        with pytest.raises(BranchlineError, match=message):
            Bridge(load_config(bad)).close()
    r = CliRunner().invoke(cli, ["bridge", "run", "--config", str(bad), "--once"])
    assert r.exit_code == 2 and r.output.startswith("error: bridge config")
    assert r.output.count("\n") == 1


def test_cli_once_and_live(tmp_path: Path) -> None:
    config = homes(tmp_path)
    with Node.open(tmp_path / "sales") as sales:
        sales.put("tasks", {"code": "T1", "title": "A", "status": "completed"})
    r = CliRunner().invoke(cli, ["bridge", "run", "--config", str(config), "--once", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["created_b"] == 1
    # Live: a change made while it runs crosses within a pass.
    with Bridge(load_config(config)) as bridge, Node.open(tmp_path / "work") as work:
        calls = {"n": 0}

        def stop() -> bool:
            calls["n"] += 1
            if calls["n"] == 2:
                work.put("work_items", {"code": "T1", "status": "not_done"})
            return status(bridge.a, "tasks", "T1") == "not_started"

        bridge.run_live(stop, interval=0.05)
        assert status(bridge.a, "tasks", "T1") == "not_started"


# -- round-trip stability ------------------------------------------------------

edit = st.tuples(st.integers(0, 7), st.integers(0, 2**32))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(edit, min_size=1, max_size=30))
def test_round_trip_stability(edits: list[tuple[int, int]]) -> None:
    """Any edits on both sides, with passes between: after each run the two
    sides agree, a second run writes nothing (no loop), every record has its
    counterpart, and a status that neither side changed is never rewritten
    (the richer Sales status is not lost)."""
    root = Path(tempfile.mkdtemp(prefix="bl-bridge-"))
    try:
        with setup(root) as (sales, work, bridge):
            pairs = bridge.config.pairs
            before: dict[str, tuple[Any, Any]] = {}
            for kind, seed in edits:
                rng = random.Random(seed)
                code = f"T{rng.randint(0, 3)}"
                if kind == 0:
                    sales.put(
                        "tasks", {"code": code, "title": code, "status": rng.choice(SALES_STATUSES)}
                    )
                elif kind == 1:
                    work.put(
                        "work_items",
                        {"code": code, "title": code, "status": rng.choice(WORK_STATUSES)},
                    )
                elif kind == 2 and sales.get("tasks", code):
                    sales.put("tasks", {"code": code, "title": f"{code}{rng.randint(0, 9)}"})
                elif kind == 3 and work.get("work_items", code):
                    work.put("work_items", {"code": code, "title": f"{code}{rng.randint(0, 9)}"})
                elif kind == 4 and sales.get("tasks", code):
                    sales.put("tasks", {"code": code, "status": rng.choice(SALES_STATUSES)})
                elif kind == 5 and work.get("work_items", code):
                    work.put("work_items", {"code": code, "status": rng.choice(WORK_STATUSES)})
                elif kind == 6 and rng.random() < 0.3 and sales.get("tasks", code):
                    sales.delete("tasks", code)
                elif kind == 7:
                    now = {
                        t["code"]: (
                            t.get("status"),
                            (work.get("work_items", t["code"]) or {}).get("status"),
                        )
                        for t in sales.list("tasks")
                    }
                    bridge.run_once()
                    for t in sales.list("tasks"):
                        if t["code"] in before and before[t["code"]] == now.get(t["code"]):
                            # Neither side's status moved since the last run.
                            assert t.get("status") == now[t["code"]][0]
                    before = {
                        t["code"]: (
                            t.get("status"),
                            (work.get("work_items", t["code"]) or {}).get("status"),
                        )
                        for t in sales.list("tasks")
                    }
            bridge.run_once()
            assert bridge.run_once().writes == 0
            tasks = {t["code"]: t for t in sales.list("tasks")}
            items = {w["code"]: w for w in work.list("work_items")}
            assert set(tasks) == set(items)
            for code, t in tasks.items():
                w = items[code]
                for p in pairs:
                    assert p.agree(t.get(p.a), w.get(p.b)), (code, p, t, w)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_two_collections_of_one_home(tmp_path: Path) -> None:
    """Both sides in one node: one Node is opened and shared."""
    work = WORK_SCHEMA.read_text().replace('schema = "work"', 'schema = "office"')
    work += (
        '\n[collections.tasks]\nkind = "catalog"\nfields.code = { type = "text", required = true }'
        '\nfields.title = { type = "text", required = true }\nfields.status = "text"\n'
    )
    (tmp_path / "office.toml").write_text(work)
    Node.create(
        tmp_path / "office", dataset="office", node="O1", schema=tmp_path / "office.toml"
    ).close()
    text = EXAMPLE.read_text().replace('home = "sales"', 'home = "office"')
    (tmp_path / "bridge.toml").write_text(text.replace('home = "work"', 'home = "office"'))
    with Bridge(load_config(tmp_path / "bridge.toml")) as bridge:
        assert bridge.a is bridge.b
        bridge.a.put("tasks", {"code": "T1", "title": "A", "status": "completed"})
        bridge.run_once()
        assert status(bridge.a, "work_items", "T1") == "done"
        assert bridge.run_once().writes == 0
