"""The benchmark workload: a catalog of 10-field business records.

The schema is written by the benchmark (one catalog, ``parties``, with ten
typed fields: six text, a decimal, an int, a bool and a date). Record values
are generated from a seed, so every run writes the same kind of data, with
Vietnamese text so UTF-8 handling is on the path.

``build_source`` makes the update another replica would send: the document
of a node that wrote ``n`` records, built with the engine's own write
primitives (``values.encode``, ``merge.new_state``, ``HybridClock``,
``RecordDoc.write`` — one Yjs transaction per record, as ``Node.put`` makes)
but without the node store, so building 100,000 records takes seconds rather
than minutes. ``source_fidelity`` checks it against a real ``Node.put``.
"""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal
from pathlib import Path
from typing import Any

from engine.clock import HybridClock, SystemClock
from engine.crdt import RecordDoc
from engine.ids import new_id, node_salt
from engine.merge import CREATED, new_state
from engine.node import Node
from engine.schema import Collection, parse_schema
from engine.values import encode

DATASET = "bench"
COLLECTION = "parties"
SCHEMA_TOML = f"""\
# Written by bench/workload.py: one catalog of 10-field records.
schema = "bench"
version = 1

[collections.{COLLECTION}]
kind = "catalog"
priority = 20
fields.code = {{ type = "text", required = true }}
fields.name = {{ type = "text", required = true }}
fields.tax_code = "text"
fields.address = "text"
fields.phone = "text"
fields.email = "text"
fields.credit_limit = "decimal"
fields.visits = "int"
fields.active = "bool"
fields.since = "date"
"""
FIELD_COUNT = 10

_FAMILY = ["Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Huỳnh", "Phan", "Vũ", "Võ", "Đặng"]
_GIVEN = ["An", "Bình", "Cường", "Dũng", "Giang", "Hương", "Khánh", "Linh", "Minh", "Thảo"]
_KIND = ["Công ty TNHH", "Công ty CP", "Cửa hàng", "Doanh nghiệp tư nhân", "Hộ kinh doanh"]
_STREET = ["Lê Lợi", "Nguyễn Huệ", "Hai Bà Trưng", "Trần Hưng Đạo", "Điện Biên Phủ"]
_CITY = ["Quận 1, TP Hồ Chí Minh", "Hoàn Kiếm, Hà Nội", "Hải Châu, Đà Nẵng", "Ninh Kiều, Cần Thơ"]


def write_schema(directory: Path) -> Path:
    """Write the benchmark schema TOML into ``directory``; returns its path."""
    path = Path(directory) / "bench-schema.toml"
    path.write_text(SCHEMA_TOML, encoding="utf-8")
    return path


def collection() -> Collection:
    return parse_schema(SCHEMA_TOML, origin="bench schema").collections[COLLECTION]


def record(i: int, rng: random.Random, revision: int = 0) -> dict[str, Any]:
    """The ten fields of record number ``i`` (API values: Decimal, date, ...).
    A higher ``revision`` changes every field but the code."""
    person = f"{rng.choice(_FAMILY)} {rng.choice(_GIVEN)}"
    return {
        "code": f"P{i:07d}",
        "name": f"{rng.choice(_KIND)} {person} {i}" + (f" r{revision}" if revision else ""),
        "tax_code": f"{rng.randrange(10**9, 10**10)}",
        "address": f"{rng.randrange(1, 400)} {rng.choice(_STREET)}, {rng.choice(_CITY)}",
        "phone": f"+84 {rng.randrange(20, 99)} {rng.randrange(10**7, 10**8)}",
        "email": f"ke.toan{i}.{revision}@example.vn",
        "credit_limit": Decimal(rng.randrange(0, 10**9)) / 100,
        "visits": rng.randrange(0, 10_000) + revision,
        "active": rng.random() < 0.9,
        "since": dt.date(2015, 1, 1) + dt.timedelta(days=rng.randrange(0, 4000) + revision),
    }


def encoded(coll: Collection, fields: dict[str, Any]) -> dict[str, Any]:
    """Stored form of a record's fields, as ``Node._encode`` makes it (no refs here)."""
    return {
        name: encode(coll.fields[name], value, f"{coll.name}.{name}")
        for name, value in fields.items()
    }


def build_source(
    n: int, *, seed: int, node: str = "source", samples: int = 100
) -> tuple[bytes, dict[str, dict[str, str]]]:
    """The full update of a replica's ``parties`` document holding records
    0 .. n-1 (what its ``export_updates`` would send), and about ``samples``
    of those records as text (code -> field -> ``str(value)``) to check
    the receiving side against."""
    rng = random.Random(seed)
    clock = SystemClock()
    hlc = HybridClock(clock)
    coll = collection()
    doc = RecordDoc(COLLECTION, rng.getrandbits(52) + 1)
    salt = node_salt(node)
    step = max(1, n // samples)
    expected: dict[str, dict[str, str]] = {}
    for i in range(n):
        fields = record(i, rng)
        if i % step == 0:
            expected[fields["code"]] = {k: str(v) for k, v in fields.items()}
        values = encoded(coll, fields)
        values[CREATED] = True
        # As Node._put: the id from one clock tick, the entry at the next.
        rid = new_id(hlc.tick(), salt, rng)
        doc.write(rid, node, new_state(None, values, hlc.tick(), {}))
    return doc.diff(), expected


def source_fidelity(directory: Path, n: int, seed: int) -> dict[str, Any]:
    """Export ``n`` records written through ``Node.put`` and the same records
    made by ``build_source``; the sizes per record should agree."""
    home = Path(directory) / "fidelity-node"
    node = Node.create(home, dataset=DATASET, node="source", schema=write_schema(directory))
    try:
        rng = random.Random(seed)
        for i in range(n):
            node.put(COLLECTION, record(i, rng))
        real = len(node.export_updates()[COLLECTION])
    finally:
        node.close()
    built = len(build_source(n, seed=seed)[0])
    return {
        "records": n,
        "node_put_bytes_per_record": real / n,
        "build_source_bytes_per_record": built / n,
        "ratio": built / real,
    }
