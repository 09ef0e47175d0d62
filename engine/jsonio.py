"""JSON in and out, as the CLI and the branch server speak it: exact
decimals (read as Decimal, written as strings, never through a float),
dates as ISO text, a repeated field refused."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import orjson

from .errors import UserError


def _reject_constant(name: str) -> Any:
    raise UserError(f"invalid JSON: {name} is not a number Branchline accepts")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # json.loads would silently keep the last one; a typo must not pass.
            raise UserError(f"invalid JSON: field {key!r} is given twice")
        out[key] = value
    return out


def loads(text: str) -> Any:
    """One JSON value with exact decimals. Raises UserError."""
    try:
        return json.loads(
            text,
            parse_float=Decimal,
            parse_constant=_reject_constant,
            object_pairs_hook=_no_duplicates,
        )
    except json.JSONDecodeError as exc:
        raise UserError(
            f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise UserError("invalid JSON: nested too deeply") from None


def loads_object(text: str) -> dict[str, Any]:
    """One JSON object of fields with exact decimals. Raises UserError for
    anything else."""
    value = loads(text)
    if not isinstance(value, dict):
        raise UserError(
            f'expected a JSON object of fields like \'{{"code": "KH001"}}\', '
            f"got a JSON {json_kind(value)}"
        )
    return value


def json_kind(value: Any) -> str:
    """What JSON calls the type of ``value``."""
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    return "number"


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # exact: money never goes through a float
    raise TypeError(f"cannot show {type(value).__name__} as JSON")


def dumps(value: Any, *, indent: bool = False) -> bytes:
    """One JSON document: Decimal as strings, dates as ISO text."""
    return orjson.dumps(value, default=_default, option=orjson.OPT_INDENT_2 if indent else 0)
