"""Schema objects: collections, typed fields, unique keys, series, partitioning.

Immutable; built by ``engine.schema.loader`` from TOML. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FIELD_TYPES = ("text", "int", "decimal", "bool", "date", "ref", "lines")
LINE_FIELD_TYPES = ("text", "int", "decimal", "bool", "date", "ref")
KINDS = ("catalog", "voucher")
PARTITIONS = ("month", "year")
STRATEGIES = ("node", "blocks")
RESETS = ("never", "yearly")
# What a node does about two live records with one unique key (DESIGN §4):
# leave it to a person, or give the later voucher a fresh number.
DUPLICATE_POLICIES = ("manual", "renumber")


@dataclass(frozen=True)
class Field:
    """One typed field. ``to`` names the target collection of a ``ref``;
    ``fields`` holds the typed sub-fields of one line of a ``lines`` field."""

    name: str
    type: str
    required: bool = False
    to: str | None = None
    fields: tuple[Field, ...] = ()

    def line_field(self, name: str) -> Field | None:
        for f in self.fields:
            if f.name == name:
                return f
        return None


@dataclass(frozen=True)
class Series:
    """How a voucher book numbers its vouchers (DESIGN §4)."""

    prefix: str
    strategy: str = "node"
    template: str = "{prefix}{node}-{seq:06}"
    reset: str = "never"
    # blocks strategy: the node keeps at least ``reserve`` numbers leased ahead
    # and asks for ``block_size`` numbers at a time.
    reserve: int = 100
    block_size: int = 100


@dataclass(frozen=True)
class Collection:
    """A catalog (unique ``key``, usually ``code``) or a voucher book
    (unique ``number``, numbered by ``series``, partitioned by period)."""

    name: str
    kind: str
    key: str
    fields: dict[str, Field]
    priority: int = 100
    partition: str | None = None
    partition_field: str = "date"
    series: Series | None = None
    # Records matching all of these field values upload before the rest of
    # the collection (e.g. unpaid sales invoices, so selling goes on).
    urgent_when: dict[str, object] = field(default_factory=dict)
    on_duplicate: str = "manual"
    # Written by Branchline itself (the gap journal), never by a user's put.
    system: bool = False

    @property
    def is_voucher(self) -> bool:
        return self.kind == "voucher"

    def refs(self) -> list[Field]:
        return [f for f in self.fields.values() if f.type == "ref"]


#: The replicated gap journal (engine.gaps): a collection every schema has.
GAPS = "number_gaps"
GAP_REASONS = ("void", "restored")


def gaps_collection() -> Collection:
    """The ``number_gaps`` catalog: one record per number that left (or came
    back to) a series, written once by the node that saw it happen."""
    text = ("series", "collection", "number", "reason", "at")
    fields = {"code": Field("code", "text", required=True)}
    fields.update({n: Field(n, "text", required=True) for n in text})
    fields.update({n: Field(n, "text") for n in ("voucher", "node")})
    return Collection(GAPS, "catalog", "code", fields, priority=1000, system=True)


@dataclass(frozen=True)
class CaptureDecl:
    """``[capture.<table>]`` of a schema: an app table every node made with
    the schema captures into ``collection`` (engine.capture); ``key`` names
    the column holding the collection's key (None: a column of its name)."""

    table: str
    collection: str
    key: str | None = None


@dataclass(frozen=True)
class Schema:
    """A whole schema; ``source`` is the TOML text it was read from, kept in the
    node store so a node always reopens with exactly the schema it was made with."""

    name: str
    version: int
    collections: dict[str, Collection]
    source: str = ""
    captures: tuple[CaptureDecl, ...] = ()

    def ordered(self) -> list[Collection]:
        """Collections in sync order: catalogs before voucher books, then priority."""
        return sorted(
            self.collections.values(),
            key=lambda c: (c.kind != "catalog", c.priority, c.name),
        )
