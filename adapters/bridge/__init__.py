"""The ``bridge`` adapter: keeps records of two collections in step, in one
node home or in two (two datasets), with field and value mappings per
direction (seed 003: Sales tasks <-> Work items). See docs/adapters.md for the
config format.

Echo-free: for each mapped field pair the bridge remembers the values both
sides had after its last pass. A side whose value changed since then is
copied across (through the value map) only when the two sides no longer
agree; they agree when either direction's map takes one value to the other.
So a Sales task ``in_progress`` (shown ``not_done`` in Work) stays
``in_progress`` when Work changes anything that still maps to it, and a
value the bridge wrote is remembered as seen: it never comes back (no
ping-pong). When both sides changed a field since the last pass, the record
written later (hybrid clock) wins; ties go to side ``a``.

Records are linked by id in a small state file (SQLite). An unlinked record
is matched by its mapped unique key before a new one is created, so a crash
between a write and the state update does not duplicate anything. A record
deleted on one side is deleted on the other.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from engine import Node
from engine.errors import AdapterConfigError, RecordNotFound
from engine.schema import Collection

ANY = "*"
MAX_PASSES = 10  # a one-shot run stops when a pass writes nothing; loops are bugs
STATE_SQL = """
CREATE TABLE IF NOT EXISTS links (
    a_id TEXT PRIMARY KEY,
    b_id TEXT NOT NULL UNIQUE,
    a_last TEXT NOT NULL,
    b_last TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class ValueMap:
    """Maps one field's values (as text); ``*`` is the value for anything
    else. Without ``*``, unlisted values cross unchanged."""

    table: dict[str, str]

    def __call__(self, value: Any) -> Any:
        if value is None:
            return None
        key = _text(value)
        if key in self.table:
            return self.table[key]
        return self.table.get(ANY, value)


@dataclass(frozen=True)
class FieldPair:
    """A field of side a and its counterpart on side b; ``ab``/``ba`` are
    the value maps of the directions that carry it (None: not carried)."""

    a: str
    b: str
    ab: ValueMap | None
    ba: ValueMap | None

    def agree(self, a_value: Any, b_value: Any) -> bool:
        if self.ab is not None and _norm(self.ab(a_value)) == b_value:
            return True
        return self.ba is not None and _norm(self.ba(b_value)) == a_value


@dataclass(frozen=True)
class Side:
    name: str
    home: Path
    collection: str


@dataclass(frozen=True)
class BridgeConfig:
    name: str
    a: Side
    b: Side
    pairs: tuple[FieldPair, ...]
    state: Path
    interval: float = 1.0


@dataclass
class BridgeReport:
    """What one run did (counts per side), and how many passes it took."""

    created_a: int = 0
    created_b: int = 0
    updated_a: int = 0
    updated_b: int = 0
    deleted_a: int = 0
    deleted_b: int = 0
    linked: int = 0
    skipped: list[str] = field(default_factory=list)
    passes: int = 0

    @property
    def writes(self) -> int:
        return (
            self.created_a
            + self.created_b
            + self.updated_a
            + self.updated_b
            + self.deleted_a
            + self.deleted_b
        )

    def add(self, other: BridgeReport) -> None:
        for name in (
            "created_a",
            "created_b",
            "updated_a",
            "updated_b",
            "deleted_a",
            "deleted_b",
            "linked",
            "passes",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.skipped += other.skipped

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        text = (
            f"bridge: {self.passes} pass(es); a: {self.created_a} created, {self.updated_a} "
            f"updated, {self.deleted_a} deleted; b: {self.created_b} created, {self.updated_b} "
            f"updated, {self.deleted_b} deleted; {self.linked} linked by key"
        )
        if self.skipped:
            text += f"; skipped: {'; '.join(self.skipped)}"
        return text


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)


def _norm(value: Any) -> Any:
    """A value as compared and remembered: JSON-safe (decimals and dates as text)."""
    if isinstance(value, Decimal | dt.date):
        return _text(value)
    if isinstance(value, list):
        return orjson.loads(orjson.dumps(value, default=_text))
    return value


def load_config(path: Path) -> BridgeConfig:
    """Read a bridge TOML config. Raises AdapterConfigError naming the problem."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise AdapterConfigError(f"bridge config {path}: cannot read it ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise AdapterConfigError(f"bridge config {path}: invalid TOML ({exc})") from None
    return parse_config(raw, Path(path).parent, origin=str(path), stem=Path(path).stem)


def parse_config(
    raw: dict[str, Any], base: Path, origin: str, stem: str = "bridge"
) -> BridgeConfig:
    """A config from parsed TOML; relative paths are taken from ``base``."""

    def fail(message: str) -> AdapterConfigError:
        return AdapterConfigError(f"bridge config {origin}: {message}")

    unknown = set(raw) - {"name", "state", "interval", "a", "b", "a_to_b", "b_to_a"}
    if unknown:
        raise fail(f"unknown key(s) {', '.join(sorted(unknown))}")

    def side(key: str) -> Side:
        table = raw.get(key)
        if not isinstance(table, dict):
            raise fail(f"missing [{key}] table (name, home, collection)")
        for name in ("home", "collection"):
            if not isinstance(table.get(name), str) or not table[name]:
                raise fail(f"[{key}] needs '{name}' (text)")
        return Side(str(table.get("name", key)), base / table["home"], table["collection"])

    def direction(key: str) -> tuple[dict[str, str], dict[str, ValueMap]]:
        table = raw.get(key, {})
        if not isinstance(table, dict):
            raise fail(f"[{key}] must be a table")
        fields = table.get("fields", {})
        values = table.get("values", {})
        if not isinstance(fields, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in fields.items()
        ):
            raise fail(f"[{key}.fields] must map field names to field names")
        if not isinstance(values, dict):
            raise fail(f"[{key}.values] must be a table of value maps")
        maps = {}
        for fld, table_ in values.items():
            if fld not in fields:
                raise fail(f"[{key}.values.{fld}] maps a field that [{key}.fields] does not carry")
            if not isinstance(table_, dict) or not all(isinstance(v, str) for v in table_.values()):
                raise fail(f"[{key}.values.{fld}] must map values to text values")
            maps[fld] = ValueMap({str(k): v for k, v in table_.items()})
        return fields, maps

    ab_fields, ab_maps = direction("a_to_b")
    ba_fields, ba_maps = direction("b_to_a")
    if not ab_fields and not ba_fields:
        raise fail("no field is mapped: give [a_to_b.fields] and/or [b_to_a.fields]")
    pairs: dict[tuple[str, str], FieldPair] = {}
    for af, bf in ab_fields.items():
        pairs[(af, bf)] = FieldPair(af, bf, ab_maps.get(af, ValueMap({})), None)
    for bf, af in ba_fields.items():
        old = pairs.get((af, bf))
        ba = ba_maps.get(bf, ValueMap({}))
        pairs[(af, bf)] = FieldPair(af, bf, old.ab if old else None, ba)
    for side_name, index in (("a", 0), ("b", 1)):
        used = [p[index] for p in pairs]
        twice = sorted({f for f in used if used.count(f) > 1})
        if twice:
            raise fail(f"side {side_name} field(s) {', '.join(twice)} mapped to several fields")
    interval = raw.get("interval", 1.0)
    if not isinstance(interval, int | float) or interval <= 0:
        raise fail("'interval' must be a positive number of seconds")
    state = raw.get("state", f"{stem}.state.db")
    if not isinstance(state, str):
        raise fail("'state' must be a file name")
    return BridgeConfig(
        str(raw.get("name", stem)),
        side("a"),
        side("b"),
        tuple(pairs.values()),
        base / state,
        float(interval),
    )


class Bridge:
    """An open bridge: both node homes and the state file."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self.a = Node.open(config.a.home)
        try:
            same = config.a.home.resolve() == config.b.home.resolve()
            self.b = self.a if same else Node.open(config.b.home)
        except BaseException:
            self.a.close()
            raise
        try:
            self.coll_a = self.a.collection(config.a.collection)
            self.coll_b = self.b.collection(config.b.collection)
            self._check(self.coll_a, self.coll_b)
            self.state = sqlite3.connect(config.state, isolation_level=None)
            self.state.execute("PRAGMA journal_mode = WAL")
            self.state.execute(STATE_SQL)
        except BaseException:
            self.close()
            raise

    def _check(self, ca: Collection, cb: Collection) -> None:
        """Both collections have the mapped fields, and a record created on
        either side gets every required field."""
        cfg = self.config
        for p in cfg.pairs:
            for coll, name, side in ((ca, p.a, cfg.a), (cb, p.b, cfg.b)):
                if name not in coll.fields:
                    raise AdapterConfigError(
                        f"bridge '{cfg.name}': {side.name} collection '{coll.name}' has no "
                        f"field '{name}'"
                    )
        for coll, carried, side in (
            (cb, {p.b for p in cfg.pairs if p.ab}, cfg.b),
            (ca, {p.a for p in cfg.pairs if p.ba}, cfg.a),
        ):
            missing = [f.name for f in coll.fields.values() if f.required and f.name not in carried]
            if missing:
                raise AdapterConfigError(
                    f"bridge '{cfg.name}': records created on {side.name} need "
                    f"{', '.join(missing)}, which no mapping towards {side.name} carries"
                )

    def close(self) -> None:
        if hasattr(self, "state"):
            self.state.close()
        if self.b is not self.a:
            self.b.close()
        self.a.close()

    def __enter__(self) -> Bridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running -------------------------------------------------------------

    def run_once(self) -> BridgeReport:
        """Passes until one writes nothing (at most MAX_PASSES)."""
        total = BridgeReport()
        for _ in range(MAX_PASSES):
            report = self.run_pass()
            total.add(report)
            if report.writes == 0:
                break
        return total

    def run_live(
        self,
        stop: Callable[[], bool],
        interval: float | None = None,
        on_report: Callable[[BridgeReport], None] | None = None,
    ) -> None:
        """Run passes every ``interval`` seconds until ``stop()`` is true."""
        wait = interval or self.config.interval
        while not stop():
            report = self.run_once()
            if report.writes and on_report is not None:
                on_report(report)
            deadline = time.monotonic() + wait
            while not stop() and time.monotonic() < deadline:
                time.sleep(min(0.05, wait))

    def run_pass(self) -> BridgeReport:
        """One pass over both collections."""
        report = BridgeReport(passes=1)
        ca, cb = self.config.a.collection, self.config.b.collection
        recs_a = {r["id"]: r for r in self.a.list(ca, codes=True)}
        recs_b = {r["id"]: r for r in self.b.list(cb, codes=True)}
        links = self.state.execute("SELECT a_id, b_id, a_last, b_last FROM links").fetchall()
        for a_id, b_id, a_last, b_last in links:
            # Popped: a record handled here is not also "unlinked" below.
            ra, rb = recs_a.pop(a_id, None), recs_b.pop(b_id, None)
            if ra is None or rb is None:
                self._unlink(a_id)
                if ra is not None and self._delete(self.a, ca, a_id):
                    report.deleted_a += 1
                if rb is not None and self._delete(self.b, cb, b_id):
                    report.deleted_b += 1
                continue
            self._sync(ra, rb, orjson.loads(a_last), orjson.loads(b_last), report)
        key_a, key_b = self.coll_a.key, self.coll_b.key
        key_pair = next((p for p in self.config.pairs if p.a == key_a and p.b == key_b), None)
        b_by_key = {_norm(r.get(key_b)): r for r in recs_b.values()}
        linked_b: set[str] = set()
        for ra in recs_a.values():
            if key_pair is not None and key_pair.ab is not None:
                rb = b_by_key.pop(_norm(key_pair.ab(ra.get(key_a))), None)
                if rb is not None:
                    report.linked += 1
                    linked_b.add(rb["id"])
                    self._link(ra, rb)
                    self._sync(ra, rb, {}, {}, report)
                    continue
            self._create(ra, towards_b=True, report=report)
        for b_id, rb in recs_b.items():
            if b_id not in linked_b:
                self._create(rb, towards_b=False, report=report)
        return report

    # -- one record ------------------------------------------------------------

    def _values(self, record: dict[str, Any], side: str) -> dict[str, Any]:
        names = [p.a if side == "a" else p.b for p in self.config.pairs]
        return {n: _norm(record.get(n)) for n in names}

    def _sync(
        self,
        ra: dict[str, Any],
        rb: dict[str, Any],
        a_last: dict[str, Any],
        b_last: dict[str, Any],
        report: BridgeReport,
    ) -> None:
        to_a: dict[str, Any] = {}
        to_b: dict[str, Any] = {}
        a_wins: bool | None = None
        for p in self.config.pairs:
            av, bv = _norm(ra.get(p.a)), _norm(rb.get(p.b))
            if p.agree(av, bv):
                continue
            a_changed = p.a not in a_last or a_last[p.a] != av
            b_changed = p.b not in b_last or b_last[p.b] != bv
            if a_changed and b_changed:
                if a_wins is None:
                    a_wins = self._newer_a(ra["id"], rb["id"])
                from_a = a_wins
            else:
                from_a = a_changed or not b_changed
            if from_a and p.ab is None:
                from_a = False
            elif not from_a and p.ba is None:
                from_a = True
            if from_a and p.ab is not None:
                to_b[p.b] = p.ab(ra.get(p.a))
            elif not from_a and p.ba is not None:
                to_a[p.a] = p.ba(rb.get(p.b))
        ca, cb = self.config.a.collection, self.config.b.collection
        if to_a:
            ra = self._put(self.a, ca, ra["id"], to_a)
            report.updated_a += 1
        if to_b:
            rb = self._put(self.b, cb, rb["id"], to_b)
            report.updated_b += 1
        self._remember(ra, rb)

    def _newer_a(self, a_id: str, b_id: str) -> bool:
        ha = _updated(self.a, self.config.a.collection, a_id)
        hb = _updated(self.b, self.config.b.collection, b_id)
        return ha >= hb

    def _put(self, node: Node, coll: str, rid: str, values: dict[str, Any]) -> dict[str, Any]:
        node.put(coll, {"id": rid, **values})
        fresh = node.get(coll, rid, codes=True)
        assert fresh is not None
        return fresh

    def _create(self, record: dict[str, Any], towards_b: bool, report: BridgeReport) -> None:
        cfg = self.config
        node, coll = (self.b, cfg.b.collection) if towards_b else (self.a, cfg.a.collection)
        fields: dict[str, Any] = {}
        for p in cfg.pairs:
            source, target, vmap = (p.a, p.b, p.ab) if towards_b else (p.b, p.a, p.ba)
            if vmap is not None and record.get(source) is not None:
                fields[target] = vmap(record[source])
        target_coll = node.collection(coll)
        key = fields.get(target_coll.key)
        if key is not None and node.get(coll, str(key)) is not None:
            # Put would update that record: it is linked to another one already.
            report.skipped.append(f"{coll} {target_coll.key} {key!r} exists and is linked")
            return
        rid = node.put(coll, fields)
        made = node.get(coll, rid, codes=True)
        assert made is not None
        if towards_b:
            report.created_b += 1
            self._link(record, made)
        else:
            report.created_a += 1
            self._link(made, record)

    def _link(self, ra: dict[str, Any], rb: dict[str, Any]) -> None:
        self.state.execute(
            "INSERT OR REPLACE INTO links VALUES (?, ?, ?, ?)",
            (
                ra["id"],
                rb["id"],
                orjson.dumps(self._values(ra, "a")).decode(),
                orjson.dumps(self._values(rb, "b")).decode(),
            ),
        )

    def _remember(self, ra: dict[str, Any], rb: dict[str, Any]) -> None:
        self.state.execute(
            "UPDATE links SET a_last = ?, b_last = ? WHERE a_id = ?",
            (
                orjson.dumps(self._values(ra, "a")).decode(),
                orjson.dumps(self._values(rb, "b")).decode(),
                ra["id"],
            ),
        )

    def _unlink(self, a_id: str) -> None:
        self.state.execute("DELETE FROM links WHERE a_id = ?", (a_id,))

    @staticmethod
    def _delete(node: Node, coll: str, rid: str) -> bool:
        try:
            node.delete(coll, rid)
        except RecordNotFound:
            return False
        return True


def _updated(node: Node, coll: str, rid: str) -> int:
    row = node.store.conn.execute(
        "SELECT updated_hlc FROM records WHERE collection = ? AND id = ?", (coll, rid)
    ).fetchone()
    return int(row[0]) if row else 0
