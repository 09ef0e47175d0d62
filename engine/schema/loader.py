"""Reading schemas from TOML, with errors that name file, collection and field."""

from __future__ import annotations

import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import SchemaError
from .model import (
    DUPLICATE_POLICIES,
    FIELD_TYPES,
    GAPS,
    KINDS,
    LINE_FIELD_TYPES,
    PARTITIONS,
    RESETS,
    STRATEGIES,
    CaptureDecl,
    Collection,
    Field,
    Schema,
    Series,
    gaps_collection,
)

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}\Z")
BUILTIN = ("accounting",)


class _Where:
    """Builds messages of the form ``file: collection 'c', field 'f': problem``."""

    def __init__(self, origin: str, collection: str | None = None, fld: str | None = None):
        self.origin, self.collection, self.field = origin, collection, fld

    def at(self, collection: str | None = None, fld: str | None = None) -> _Where:
        return _Where(self.origin, collection or self.collection, fld or self.field)

    def error(self, problem: str) -> SchemaError:
        ctx = []
        if self.collection:
            ctx.append(f"collection '{self.collection}'")
        if self.field:
            ctx.append(f"field '{self.field}'")
        head = f"{self.origin}: {', '.join(ctx)}" if ctx else self.origin
        return SchemaError(f"{head}: {problem}")


def builtin_schema(name: str = "accounting") -> Schema:
    """The named built-in schema. Raises SchemaError for an unknown name."""
    if name not in BUILTIN:
        raise SchemaError(f"unknown built-in schema '{name}' (built in: {', '.join(BUILTIN)})")
    text = resources.files(__package__).joinpath(f"{name}.toml").read_text("utf-8")
    return parse_schema(text, origin=f"<built-in {name}>")


def load_schema(spec: str | Path) -> Schema:
    """A built-in schema by name, or a schema read from a TOML file path."""
    if isinstance(spec, str) and spec in BUILTIN:
        return builtin_schema(spec)
    path = Path(spec)
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise SchemaError(f"{path}: schema file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SchemaError(f"{path}: cannot read schema file: {exc}") from None
    return parse_schema(text, origin=str(path))


def parse_schema(text: str, origin: str = "<schema>") -> Schema:
    """Parse and validate schema TOML text. Raises SchemaError naming what is wrong."""
    where = _Where(origin)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise where.error(f"not valid TOML: {exc}") from None
    name = doc.get("schema", "custom")
    version = doc.get("version", 1)
    if not isinstance(name, str) or not name:
        raise where.error("'schema' must be a non-empty string")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise where.error("'version' must be a positive integer")
    unknown = set(doc) - {"schema", "version", "collections", "capture"}
    if unknown:
        raise where.error(f"unknown top-level key(s): {', '.join(sorted(unknown))}")
    raw = doc.get("collections")
    if not isinstance(raw, dict) or not raw:
        raise where.error("no [collections.<name>] tables defined")
    collections = {cname: _collection(where.at(cname), cname, body) for cname, body in raw.items()}
    if GAPS in collections:
        raise where.at(GAPS).error("the name is reserved for Branchline's gap journal")
    collections[GAPS] = gaps_collection()
    for coll in collections.values():
        for fld in _all_ref_fields(coll):
            if fld.to not in collections:
                raise where.at(coll.name, fld.name).error(
                    f"references unknown collection '{fld.to}'"
                )
            if collections[fld.to].kind != "catalog":
                raise where.at(coll.name, fld.name).error(
                    f"references '{fld.to}', which is not a catalog"
                )
    captures = _captures(where, doc.get("capture", {}), collections)
    return Schema(
        name=name, version=version, collections=collections, source=text, captures=captures
    )


TABLE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}\Z")


def _captures(
    where: _Where, raw: Any, collections: dict[str, Collection]
) -> tuple[CaptureDecl, ...]:
    """``[capture.<table>]`` tables: collection = "...", key = "column"."""
    if not isinstance(raw, dict):
        raise where.error("'capture' must be a table of [capture.<table>] tables")
    out = []
    seen: dict[str, str] = {}
    for table, body in raw.items():
        at = _Where(f"{where.origin}: [capture.{table}]")
        if not TABLE_RE.match(table):
            raise at.error("table names are letters, digits and '_'")
        if not isinstance(body, dict) or set(body) - {"collection", "key"}:
            raise at.error("must be a table with 'collection' and, optionally, 'key'")
        coll = body.get("collection")
        if coll not in collections or collections[coll].system:
            raise at.error(f"collection {coll!r} is not a collection of this schema")
        if coll in seen:
            raise at.error(f"{coll} is captured already, by table {seen[coll]}")
        seen[coll] = table
        key = body.get("key")
        if key is not None and (not isinstance(key, str) or not TABLE_RE.match(key)):
            raise at.error("key must name a column (letters, digits and '_')")
        out.append(CaptureDecl(table, coll, key))
    return tuple(out)


def _all_ref_fields(coll: Collection) -> list[Field]:
    out = []
    for f in coll.fields.values():
        if f.type == "ref":
            out.append(f)
        out.extend(sub for sub in f.fields if sub.type == "ref")
    return out


def _collection(where: _Where, cname: str, body: Any) -> Collection:
    if not NAME_RE.match(cname):
        raise where.error("collection names are lower-case letters, digits and '_'")
    if not isinstance(body, dict):
        raise where.error("must be a table")
    allowed = {
        "kind",
        "key",
        "fields",
        "priority",
        "partition",
        "partition_field",
        "series",
        "urgent_when",
        "on_duplicate",
    }
    unknown = set(body) - allowed
    if unknown:
        raise where.error(f"unknown key(s): {', '.join(sorted(unknown))}")
    kind = body.get("kind", "catalog")
    if kind not in KINDS:
        raise where.error(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    raw_fields = body.get("fields")
    if not isinstance(raw_fields, dict) or not raw_fields:
        raise where.error("needs a 'fields' table")
    fields: dict[str, Field] = {}
    if kind == "voucher":
        if "number" in raw_fields:
            raise where.at(fld="number").error("voucher books get 'number' implicitly")
        fields["number"] = Field("number", "text")
    for fname, spec in raw_fields.items():
        fields[fname] = _field(where.at(fld=fname), fname, spec, FIELD_TYPES)
    default_key = "number" if kind == "voucher" else "code"
    key = body.get("key", default_key)
    if key not in fields:
        raise where.at(fld=str(key)).error("unique key field is not defined")
    if fields[key].type != "text":
        raise where.at(fld=key).error("unique key field must be of type text")
    if kind == "catalog" and not fields[key].required:
        fields[key] = Field(key, "text", required=True)
    priority = body.get("priority", 100)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise where.error("priority must be an integer (lower syncs first)")
    partition = body.get("partition")
    pfield = body.get("partition_field", "date")
    if partition is not None:
        if kind != "voucher":
            raise where.error("only voucher books are partitioned")
        if partition not in PARTITIONS:
            raise where.error(f"partition must be one of {', '.join(PARTITIONS)}")
        if pfield not in fields or fields[pfield].type != "date" or not fields[pfield].required:
            raise where.at(fld=pfield).error("partitioning needs a required date field")
    series = None
    if "series" in body:
        if kind != "voucher":
            raise where.error("only voucher books have a series")
        series = _series(where, body["series"], fields, pfield)
    urgent = body.get("urgent_when", {})
    if not isinstance(urgent, dict):
        raise where.error("urgent_when must be a table of field = value")
    for uf, uv in urgent.items():
        if uf not in fields or fields[uf].type not in ("text", "bool", "int"):
            raise where.at(fld=uf).error("urgent_when fields must be text, bool or int fields")
        if not isinstance(uv, str | bool | int):
            raise where.at(fld=uf).error("urgent_when values must be text, bool or int")
    on_duplicate = body.get("on_duplicate", "manual")
    if on_duplicate not in DUPLICATE_POLICIES:
        raise where.error(
            f"on_duplicate must be one of {', '.join(DUPLICATE_POLICIES)}, not {on_duplicate!r}"
        )
    if on_duplicate == "renumber" and series is None:
        raise where.error("on_duplicate = 'renumber' needs a voucher book with a series")
    return Collection(
        name=cname,
        kind=kind,
        key=key,
        fields=fields,
        priority=priority,
        partition=partition,
        partition_field=pfield,
        series=series,
        urgent_when=dict(urgent),
        on_duplicate=on_duplicate,
    )


def _field(where: _Where, fname: str, spec: Any, types: tuple[str, ...]) -> Field:
    if not NAME_RE.match(fname):
        raise where.error("field names are lower-case letters, digits and '_' (not leading)")
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict):
        raise where.error("must be a type name or a table with 'type'")
    unknown = set(spec) - {"type", "required", "to", "fields"}
    if unknown:
        raise where.error(f"unknown key(s): {', '.join(sorted(unknown))}")
    ftype = spec.get("type")
    if ftype not in types:
        raise where.error(f"unknown type {ftype!r} (expected one of {', '.join(types)})")
    required = spec.get("required", False)
    if not isinstance(required, bool):
        raise where.error("required must be true or false")
    to = spec.get("to")
    if ftype == "ref":
        if not isinstance(to, str) or not to:
            raise where.error("a ref field needs 'to = \"<collection>\"'")
    elif to is not None:
        raise where.error("'to' is only for ref fields")
    subs: tuple[Field, ...] = ()
    if ftype == "lines":
        raw = spec.get("fields")
        if not isinstance(raw, dict) or not raw:
            raise where.error("a lines field needs a 'fields' table for one line")
        subs = tuple(
            _field(where.at(fld=f"{fname}.{sub}"), sub, sspec, LINE_FIELD_TYPES)
            for sub, sspec in raw.items()
        )
    elif "fields" in spec:
        raise where.error("'fields' is only for lines fields")
    return Field(fname, ftype, required=required, to=to, fields=subs)


def _series(where: _Where, raw: Any, fields: dict[str, Field], pfield: str) -> Series:
    if not isinstance(raw, dict):
        raise where.error("series must be a table")
    unknown = set(raw) - {"prefix", "strategy", "template", "reset", "reserve", "block_size"}
    if unknown:
        raise where.error(f"series: unknown key(s): {', '.join(sorted(unknown))}")
    prefix = raw.get("prefix")
    if not isinstance(prefix, str) or not re.match(r"^[A-Za-z0-9]{0,10}$", prefix):
        raise where.error("series prefix must be up to 10 letters or digits")
    strategy = raw.get("strategy", "node")
    if strategy not in STRATEGIES:
        raise where.error(f"series strategy must be one of {', '.join(STRATEGIES)}")
    default = "{prefix}{node}-{seq:06}" if strategy == "node" else "{prefix}{seq:06}"
    template = raw.get("template", default)
    reset = raw.get("reset", "never")
    if reset not in RESETS:
        raise where.error(f"series reset must be one of {', '.join(RESETS)}")
    if not isinstance(template, str) or "{seq" not in template:
        raise where.error("series template must contain {seq} (e.g. {seq:06})")
    try:
        template.format(prefix="P", node="N", year=2026, seq=1)
    except (KeyError, ValueError, IndexError) as exc:
        raise where.error(
            f"series template {template!r} is invalid ({exc}); placeholders are "
            "{prefix}, {node}, {year}, {seq}"
        ) from None
    if strategy == "node" and "{node}" not in template:
        raise where.error("a 'node' series template must contain {node}, or numbers would clash")
    if reset == "yearly":
        if "{year" not in template:
            raise where.error(
                "a yearly reset needs {year} in the template, or numbers would repeat"
            )
        if pfield not in fields or fields[pfield].type != "date" or not fields[pfield].required:
            raise where.at(fld=pfield).error("a yearly reset needs a required date field")
    reserve = raw.get("reserve", 100)
    block = raw.get("block_size", 100)
    for label, val in (("reserve", reserve), ("block_size", block)):
        if not isinstance(val, int) or isinstance(val, bool) or not 1 <= val <= 1_000_000:
            raise where.error(f"series {label} must be an integer from 1 to 1000000")
    return Series(
        prefix=prefix,
        strategy=strategy,
        template=template,
        reset=reset,
        reserve=reserve,
        block_size=block,
    )
