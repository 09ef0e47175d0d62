"""The acceptance suite every adapter passes; an adapter's tests call it in a
few lines::

    from adapters.testing import run_acceptance

    def test_acceptance(tmp_path):
        run_acceptance("mirror", tmp_path, schema="accounting")

It checks, on real nodes: loading through the entry point; enabling on a home
that already holds records fills the tables; after every kind of write
(insert, update, delete, restore, vouchers) the incremental tables equal a
rebuild; two replicas that exchange updates in another order end with equal
tables; disable drops the tables and enabling again gives them back.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from engine import Node
from engine.clock import ManualClock
from engine.errors import BranchlineError
from engine.plugins import Adapter, load
from engine.schema import Collection, Schema

Snapshot = dict[str, list[tuple[Any, ...]]]


def snapshot(node: Node) -> Snapshot:
    """Every row of every enabled adapter's tables, and of adapter_conflicts, sorted."""
    out: Snapshot = {}
    conn = node.store.conn
    for name, options in node.adapters().items():
        adapter = load(name, node.schema, options)
        for table in [*adapter.tables()]:
            out[table] = sorted(
                (tuple(r) for r in conn.execute(f'SELECT * FROM "{table}"')), key=repr
            )
    out["adapter_conflicts"] = sorted(
        (tuple(r) for r in conn.execute("SELECT * FROM adapter_conflicts")), key=repr
    )
    return out


def assert_rebuild_identical(node: Node) -> None:
    """The incremental tables equal a full rebuild (and stay as they were)."""
    before = snapshot(node)
    for report in node.rebuild_adapters():
        bad = [t for t in report.tables if not t.same]
        assert not bad, f"{report.adapter}: incremental tables differ from the rebuild: {bad}"
    assert snapshot(node) == before


def make_node(
    home: Path,
    node: str,
    schema: str | Schema = "accounting",
    adapters: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
) -> Node:
    """A node with a manual clock and a seeded random source."""
    return Node.create(
        home,
        dataset="acceptance",
        node=node,
        schema=schema,
        clock=ManualClock(1_790_000_000_000 + seed),
        rng=random.Random(seed),
        adapters=adapters,
    )


def _value(fld: Any, rng: random.Random, refs: dict[str, list[str]]) -> Any:
    t = fld.type
    if t == "text":
        return rng.choice(["An", "Bình", "Chi", "x" * rng.randint(1, 5), "Kho chính"])
    if t == "int":
        return rng.randint(-1000, 1000)
    if t == "decimal":
        return Decimal(rng.randint(-(10**6), 10**9)).scaleb(-rng.choice([0, 0, 1, 2]))
    if t == "bool":
        return rng.random() < 0.5
    if t == "date":
        return dt.date(2026, rng.randint(1, 3), rng.randint(1, 28))
    if t == "ref":
        return rng.choice(refs[fld.to]) if refs.get(fld.to) else None
    if t == "lines":
        lines = []
        for _ in range(rng.randint(1, 3)):
            line = {s.name: _value(s, rng, refs) for s in fld.fields}
            lines.append({k: v for k, v in line.items() if v is not None})
        return lines
    raise AssertionError(f"no generator for field type {t}")


def random_fields(
    coll: Collection, rng: random.Random, refs: dict[str, list[str]]
) -> dict[str, Any]:
    """Values for every field of ``coll`` (references to existing records)."""
    out = {}
    for name, fld in coll.fields.items():
        if name == "number":
            continue
        value = _value(fld, rng, refs)
        if name == coll.key:
            value = f"{coll.name[:2].upper()}{rng.randint(0, 10**6)}"
        if value is not None:
            out[name] = value
    return out


def random_writes(node: Node, rng: random.Random, steps: int, collections: list[str]) -> None:
    """Random inserts, partial updates, deletes and restores on ``collections``
    (and what they refer to), each its own durable write."""
    schema = node.schema
    wanted = set(collections)
    for c in collections:
        wanted |= {f.to for f in schema.collections[c].fields.values() if f.to}
        wanted |= {s.to for f in schema.collections[c].fields.values() for s in f.fields if s.to}
    # System collections (the gap journal) are written by the node itself.
    order = [c for c in schema.ordered() if c.name in wanted and not c.system]
    refs: dict[str, list[str]] = {c.name: [] for c in order}
    deleted: list[tuple[str, str]] = []
    for coll in order:  # one record each first, so references resolve
        _insert(node, coll, rng, refs)
    for _ in range(steps):
        coll = rng.choice(order)
        roll = rng.random()
        try:
            if roll < 0.45 or not refs[coll.name]:
                _insert(node, coll, rng, refs)
            elif roll < 0.8:
                rid = rng.choice(refs[coll.name])
                fields = random_fields(coll, rng, refs)
                fields.pop(coll.key, None)
                if coll.partition:
                    fields.pop(coll.partition_field, None)
                keep = rng.sample(sorted(fields), k=min(len(fields), rng.randint(1, 3)))
                node.put(coll.name, {"id": rid, **{k: fields[k] for k in keep}})
            elif roll < 0.92:
                rid = rng.choice(refs[coll.name])
                node.delete(coll.name, rid)
                refs[coll.name].remove(rid)
                deleted.append((coll.name, rid))
            elif deleted:
                cname, rid = deleted.pop(rng.randrange(len(deleted)))
                node.restore(cname, rid)
                refs[cname].append(rid)
        except BranchlineError:
            continue  # e.g. a reference to a record deleted meanwhile: refused, nothing written


def _insert(node: Node, coll: Collection, rng: random.Random, refs: dict[str, list[str]]) -> None:
    fields = random_fields(coll, rng, refs)
    if coll.is_voucher:
        rid = node.post_voucher(coll.name, fields).id
    else:
        rid = node.put(coll.name, fields)
    refs[coll.name].append(rid)


def run_acceptance(
    name: str,
    tmp_path: Path,
    schema: str | Schema = "accounting",
    options: dict[str, Any] | None = None,
    seed: int = 0,
    steps: int = 80,
    check: Callable[[Node], None] | None = None,
) -> None:
    """Run the acceptance checks of adapter ``name`` (module docstring);
    ``check`` runs extra assertions on each node at the end."""
    opts = dict(options or {})
    rng = random.Random(seed)
    first = make_node(tmp_path / "a", "A", schema, seed=seed)
    try:
        adapter = load(name, first.schema, opts)
        assert isinstance(adapter, Adapter)
        assert adapter.name == name
        assert adapter.collections <= set(first.schema.collections), "unknown collections"
        colls = sorted(adapter.collections)
        # Records written before the adapter is enabled are taken in.
        random_writes(first, rng, steps // 4, colls)
        first.enable_adapter(name, opts)
        assert first.adapters() == {name: opts}
        assert_rebuild_identical(first)
        filled = snapshot(first)
        assert any(filled[t] for t in adapter.tables()), "enabling filled no table"
        random_writes(first, rng, steps, colls)
        assert_rebuild_identical(first)
        # A replica that receives the same updates, in two halves and in the
        # other order, ends with the same tables.
        second = make_node(tmp_path / "b", "B", schema, adapters={name: opts}, seed=seed + 1)
        try:
            updates = sorted(first.export_updates().items())
            half = len(updates) // 2
            second.import_updates(dict(updates[half:]))
            assert_rebuild_identical(second)
            second.import_updates(dict(updates[:half]))
            assert_rebuild_identical(second)
            random_writes(second, rng, steps // 2, colls)
            first.import_updates(second.export_updates(first.state()))
            second.import_updates(first.export_updates(second.state()))
            for node in (first, second):
                assert_rebuild_identical(node)
            assert snapshot(first) == snapshot(second)
            if check is not None:
                check(first)
                check(second)
        finally:
            second.close()
        # Disabling drops the tables; enabling again gives them back.
        before = snapshot(first)
        first.disable_adapter(name)
        tables = {
            r[0]
            for r in first.store.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        assert not tables & set(adapter.tables()), "disable left tables behind"
        first.enable_adapter(name, opts)
        assert snapshot(first) == before
    finally:
        first.close()
