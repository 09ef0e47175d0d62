"""A workload drawn from a user's own schema (``make sim SCHEMA=path`` and
``make soak SCHEMA=path``, docs/reliability.md).

Records are generated from the schema's fields: every required field has a
value, optional ones now and then; texts, ints, exact decimals, bools and
dates (across a month and a year boundary, so partitions and yearly series
restart) by type; references by the code of a record of the target catalog
(a few codes per catalog, so nodes create the same code and the
``duplicate_key`` path runs); lines of one to three lines of their
sub-fields. Voucher books with a series are numbered by it (and now and
then given a number typed by hand, which another node may type too);
books without one get a number unique to the node.

No I/O of its own: it writes through the ``Node`` it is given, draws only
from the ``random.Random`` it is given, and raises what the node raises
(``BranchlineError`` for a refused write: a reference not there yet, a
record deleted meanwhile).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from engine.node import Node
from engine.schema import Collection, Field, Schema

DATES = ("2026-09-02", "2026-12-31", "2027-01-01", "2027-02-14")
KEYS_PER_CATALOG = 4
TYPED_POOL = 3  # hand-typed numbers shared by every node of one book
#: Operation weights of ``step``.
WEIGHTS = {"put": 30, "edit": 15, "voucher": 35, "delete": 8}


@dataclass(frozen=True)
class Written:
    """A write the node returned from: its record, and for a voucher the
    number its series issued (``(number, provisional)``; None when typed)."""

    collection: str
    id: str
    issued: tuple[str, bool] | None = None


class SchemaWorkload:
    """Random writes generated from ``schema`` (module docstring)."""

    def __init__(self, schema: Schema, rng: random.Random) -> None:
        self.schema = schema
        self.rng = rng
        self.catalogs = _by_reference([c for c in schema.ordered() if c.kind == "catalog"])
        self.catalogs = [c for c in self.catalogs if not c.system]
        self.books = [c for c in schema.ordered() if c.is_voucher]
        self._typed = 0
        self._kinds = [k for k in WEIGHTS if k != "voucher" or self.books]
        self._weights = [WEIGHTS[k] for k in self._kinds]

    def seed(self, node: Node) -> list[Written]:
        """Every code of every catalog on ``node``, targets first, so the
        other nodes' references resolve once it is synced."""
        out = []
        for coll in self.catalogs:
            for i in range(KEYS_PER_CATALOG):
                fields = self._fields(coll, creating=True)
                fields[coll.key] = self._code(coll, i)
                out.append(Written(coll.name, node.put(coll.name, fields)))
        return out

    def step(self, node: Node, *, new_only: bool = False) -> tuple[str, Written | None]:
        """One random write on ``node``: (its kind, what was written, if
        anything). ``new_only``: only new vouchers (a rebuilt home before its
        first sync must not write over its own entries the relay holds).
        Raises BranchlineError for a refused write."""
        kind = self.rng.choices(self._kinds, self._weights)[0]
        if new_only:
            if not self.books:
                return "voucher", None
            kind = "voucher"
        if kind == "voucher":
            return kind, self._voucher(node, self.rng.choice(self.books))
        coll = self.rng.choice([*self.catalogs, *self.books] if kind == "delete" else self.catalogs)
        if kind == "put":  # create the code, or update the record holding it
            fields = self._fields(coll, creating=True)
            return kind, Written(coll.name, node.put(coll.name, fields))
        live = node.list(coll.name, limit=20)
        if not live:
            return kind, None
        rid = str(self.rng.choice(live)["id"])
        if kind == "delete":
            node.delete(coll.name, rid)
            return kind, None
        fields = self._fields(coll, creating=False)
        fields.pop(coll.key, None)
        if not fields:
            return kind, None
        return kind, Written(coll.name, node.put(coll.name, {"id": rid, **fields}))

    # -- generating values ------------------------------------------------------

    def _voucher(self, node: Node, coll: Collection) -> Written:
        fields = self._fields(coll, creating=True)
        if coll.series is None:
            self._typed += 1
            fields["number"] = f"{node.node_id}-{self._typed}"
        elif self.rng.random() < 0.1:
            fields["number"] = f"TAY-{self.rng.randint(1, TYPED_POOL)}"
        posted = node.post_voucher(coll.name, fields)
        issued = None if "number" in fields else (posted.number, posted.provisional)
        return Written(coll.name, posted.id, issued)

    def _fields(self, coll: Collection, *, creating: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, fld in coll.fields.items():
            if name == "number" and coll.is_voucher:
                continue
            if name == coll.key:
                out[name] = self._code(coll, self.rng.randrange(KEYS_PER_CATALOG))
                continue
            if coll.partition and name == coll.partition_field and not creating:
                continue  # a voucher never moves to another period
            if not fld.required and self.rng.random() < 0.4:
                continue
            value = self._value(fld)
            if value is not None:
                out[name] = value
        return out

    def _value(self, fld: Field) -> Any:
        rng = self.rng
        kind = fld.type
        if kind == "text":
            return f"v{rng.randint(0, 9)}"
        if kind == "int":
            return rng.randint(-1000, 1000)
        if kind == "decimal":
            return f"{rng.randint(0, 99_999)}.{rng.randint(0, 99):02d}"
        if kind == "bool":
            return rng.random() < 0.5
        if kind == "date":
            return rng.choice(DATES)
        if kind == "ref":
            target = self.schema.collections[fld.to or ""]
            return self._code(target, rng.randrange(KEYS_PER_CATALOG))
        if kind == "lines":
            lines = []
            for _ in range(rng.randint(1, 3)):
                line = {
                    sub.name: self._value(sub)
                    for sub in fld.fields
                    if sub.required or rng.random() < 0.6
                }
                lines.append(line)
            return lines
        raise ValueError(f"no generator for field type {kind!r}")

    @staticmethod
    def _code(coll: Collection, i: int) -> str:
        return f"{coll.name[:3].upper()}{i}"


def _by_reference(catalogs: list[Collection]) -> list[Collection]:
    """``catalogs`` with every referenced catalog before the ones referring
    to it (a reference cycle keeps the schema's order)."""
    out: list[Collection] = []
    left = list(catalogs)
    while left:
        names = {c.name for c in out}
        ready = [c for c in left if all(t in names or t == c.name for t in _targets(c))]
        if not ready:
            out += left
            break
        out += ready
        left = [c for c in left if c not in ready]
    return out


def _targets(coll: Collection) -> set[str]:
    subs = [s for f in coll.fields.values() for s in f.fields]
    return {f.to for f in [*coll.fields.values(), *subs] if f.type == "ref" and f.to}
