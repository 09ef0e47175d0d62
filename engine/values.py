"""Typed values <-> the plain JSON values stored inside CRDT entries.

pycrdt has no Decimal or date and mangles ints, so entries hold only JSON text
that Branchline encodes itself: decimals as canonical strings, dates as ISO
strings, ints checked to fit in 64 bits. ``encode`` validates and raises
``ValidationError``; ``decode`` restores the Python type from the schema.
References are record ids here; resolving codes to ids is the node's job.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from decimal import (
    Decimal,
    InvalidOperation,
)
from typing import Any

from .errors import ValidationError
from .schema.model import Field

INT_MIN, INT_MAX = -(2**63), 2**63 - 1
MAX_TEXT = 1_000_000
MAX_DECIMAL_DIGITS = 38
MAX_LINES = 10_000

Stored = Any  # a JSON value: str, int, bool, list of dicts, or None


def encode(fld: Field, value: Any, where: str) -> Stored:
    """The stored form of ``value`` for ``fld``; ``where`` names it in errors."""
    if value is None:
        return None
    t = fld.type
    if t == "text":
        return _text(value, where)
    if t == "int":
        return _int(value, where)
    if t == "decimal":
        return _decimal(value, where)
    if t == "bool":
        if not isinstance(value, bool):
            raise ValidationError(f"{where}: expected true or false, got {_show(value)}")
        return value
    if t == "date":
        return _date(value, where)
    if t == "ref":
        if not isinstance(value, str) or not value:
            raise ValidationError(f"{where}: expected a record id or code, got {_show(value)}")
        return value
    if t == "lines":
        return _lines(fld, value, where)
    raise ValidationError(f"{where}: unsupported field type {t!r}")


_DECIMAL_RE = re.compile(r"-?\d+(\.\d+)?(E[+-]\d+)?")
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")


def is_stored(fld: Field, value: Stored) -> bool:
    """True when ``value`` (from a replica) is a well-formed stored value of
    ``fld`` that ``decode`` can read."""
    return stored_check(fld)(value)


def stored_check(fld: Field) -> Callable[[Any], bool]:
    """``is_stored`` for one field, its type dispatched once: imports run it
    for every field of every record they bring, so a collection keeps one
    per field (``Collection`` is immutable)."""
    t = fld.type
    if t == "text" or t == "ref":
        return _is_str
    if t == "decimal":
        return _is_decimal
    if t == "bool":
        return _is_bool
    if t == "int":
        return _is_int
    if t == "date":
        return _is_date
    if t == "lines":
        return lambda value: _is_lines(fld, value)
    return _never


def _is_str(value: Any) -> bool:
    return type(value) is str


def _is_decimal(value: Any) -> bool:
    return type(value) is str and len(value) <= 100 and bool(_DECIMAL_RE.fullmatch(value))


def _is_bool(value: Any) -> bool:
    return type(value) is bool


def _is_int(value: Any) -> bool:
    return type(value) is int and INT_MIN <= value <= INT_MAX


def _is_date(value: Any) -> bool:
    if type(value) is not str or not _DATE_RE.fullmatch(value):
        return False
    try:
        dt.date.fromisoformat(value)
    except ValueError:
        return False
    return True


def _is_lines(fld: Field, value: Any) -> bool:
    if type(value) is not list or len(value) > MAX_LINES:
        return False
    for line in value:
        if type(line) is not dict:
            return False
        for sub in fld.fields:
            item = line.get(sub.name)
            if item is None:
                if sub.required:
                    return False
            elif not is_stored(sub, item):
                return False
        if len(line) > len(fld.fields) or any(fld.line_field(k) is None for k in line):
            return False
    return True


def _never(value: Any) -> bool:
    return False


def decode(fld: Field, stored: Stored) -> Any:
    """The Python value of a stored value (Decimal, date, int, ...)."""
    if stored is None:
        return None
    t = fld.type
    if t == "decimal":
        return Decimal(stored)
    if t == "date":
        return dt.date.fromisoformat(stored)
    if t == "lines":
        out = []
        for line in stored:
            row = {}
            for sub in fld.fields:
                if sub.name in line:
                    row[sub.name] = decode(sub, line[sub.name])
            out.append(row)
        return out
    return stored


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{where}: expected text, got {_show(value)}")
    if len(value) > MAX_TEXT:
        raise ValidationError(f"{where}: text longer than {MAX_TEXT} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"{where}: text contains unpaired surrogate characters") from None
    return value


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ValidationError(f"{where}: expected an integer, got {_show(value)}")
    if isinstance(value, str):
        try:
            value = int(value.strip(), 10)
        except ValueError:
            raise ValidationError(f"{where}: expected an integer, got {_show(value)}") from None
    elif isinstance(value, Decimal) and value == value.to_integral_value():
        value = int(value)
    if not isinstance(value, int):
        raise ValidationError(f"{where}: expected an integer, got {_show(value)}")
    if not INT_MIN <= value <= INT_MAX:
        raise ValidationError(
            f"{where}: integer {value} does not fit in 64 bits; use a decimal field for it"
        )
    return value


def _decimal(value: Any, where: str) -> str:
    if isinstance(value, bool):
        raise ValidationError(f"{where}: expected a decimal number, got {_show(value)}")
    try:
        if isinstance(value, float):
            number = Decimal(repr(value))  # the shortest text that round-trips
        elif isinstance(value, Decimal | int):
            number = Decimal(value)
        elif isinstance(value, str):
            number = Decimal(value.strip())
        else:
            raise InvalidOperation
    except (InvalidOperation, ValueError):
        raise ValidationError(f"{where}: expected a decimal number, got {_show(value)}") from None
    if not number.is_finite():
        raise ValidationError(f"{where}: {value!r} is not a finite number")
    digits = number.as_tuple().digits
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)
    if len(digits) > MAX_DECIMAL_DIGITS or abs(exponent) > 2 * MAX_DECIMAL_DIGITS:
        raise ValidationError(f"{where}: decimal {_show(value)} has too many digits")
    return str(number)


def _date(value: Any, where: str) -> str:
    if isinstance(value, dt.datetime):
        raise ValidationError(f"{where}: expected a date, got a date and time")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, str) and len(value) == 10:
        try:
            return dt.date.fromisoformat(value).isoformat()
        except ValueError:
            pass
    raise ValidationError(f"{where}: expected a date as YYYY-MM-DD, got {_show(value)}")


def _lines(fld: Field, value: Any, where: str) -> list[dict[str, Stored]]:
    if not isinstance(value, list | tuple):
        raise ValidationError(f"{where}: expected a list of lines, got {_show(value)}")
    if len(value) > MAX_LINES:
        raise ValidationError(f"{where}: more than {MAX_LINES} lines")
    names = {sub.name for sub in fld.fields}
    out = []
    for i, line in enumerate(value, 1):
        at = f"{where} line {i}"
        if not isinstance(line, dict):
            raise ValidationError(f"{at}: expected an object, got {_show(line)}")
        unknown = set(line) - names
        if unknown:
            raise ValidationError(
                f"{at}: unknown field(s) {', '.join(sorted(map(str, unknown)))} "
                f"(known: {', '.join(sorted(names))})"
            )
        row: dict[str, Stored] = {}
        for sub in fld.fields:
            stored = encode(sub, line.get(sub.name), f"{at}, {sub.name}")
            if stored is None:
                if sub.required:
                    raise ValidationError(f"{at}: missing required field '{sub.name}'")
                continue
            row[sub.name] = stored
        out.append(row)
    return out
