"""Values between a captured table's SQL columns and a collection's fields.

Into a write (``to_fields``): what SQLite holds is turned into what ``put``
takes: numbers in a text column become text, 0/1 in a bool column become
false/true, a ``lines`` column's JSON text is parsed. Anything else is left
for the schema's own validation, which says what is wrong.

Into the table (``to_columns``): a record's stored values as plain SQL:
decimals and dates as text, bools as 0/1, lines as JSON text, and references
as the referenced record's key (its code, as an app writes them), or its id
when it has none.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import ValidationError
from ..schema import Collection, Field
from ..store import records as rec
from .spec import CaptureSpec

Values = dict[str, Any]


def to_fields(coll: Collection, values: Values, where: str) -> Values:
    """Captured column values (by field name) as ``put`` fields. Raises
    ValidationError for a value no field type takes (a BLOB)."""
    return {
        name: _field_value(coll.fields[name], v, f"{where}.{name}") for name, v in values.items()
    }


def to_columns(conn: Any, coll: Collection, spec: CaptureSpec, values: Values) -> dict[str, Any]:
    """A record's stored values as the captured table's columns."""
    out: dict[str, Any] = {}
    for name, column in spec.columns.items():
        fld = coll.fields[name]
        out[column] = _column_value(conn, fld, values.get(name))
    return out


def _field_value(fld: Field, value: Any, where: str) -> Any:
    if value is None:
        return None
    if isinstance(value, list) and len(value) == 2 and value[0] == "blob":
        raise ValidationError(
            f"{where}: a BLOB value ({len(value[1]) // 2} bytes); expected {fld.type}"
        )
    t = fld.type
    if t in ("text", "ref", "date") and type(value) in (int, float):
        return str(value)
    if t == "bool" and type(value) is int and value in (0, 1):
        return bool(value)
    if t == "lines" and isinstance(value, str):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            raise ValidationError(f"{where}: not JSON lines: {value[:60]!r}") from None
    return value


def _column_value(conn: Any, fld: Field, value: Any) -> Any:
    if value is None:
        return None
    t = fld.type
    if t == "bool":
        return 1 if value else 0
    if t == "ref":
        assert fld.to is not None
        return _key_of(conn, fld.to, value)
    if t == "lines":
        lines = []
        for line in value:
            shown = dict(line)
            for sub in fld.fields:
                if sub.type == "ref" and shown.get(sub.name) is not None:
                    assert sub.to is not None
                    shown[sub.name] = _key_of(conn, sub.to, shown[sub.name])
            lines.append(shown)
        return orjson.dumps(lines).decode()
    return value


def _key_of(conn: Any, collection: str, rid: str) -> str:
    row = rec.row_of(conn, collection, rid)
    return row.key if row is not None and row.key else rid
