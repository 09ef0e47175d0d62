"""Declarative schemas: TOML files and the built-in ``accounting`` schema."""

from .loader import builtin_schema, load_schema, parse_schema
from .model import GAPS, CaptureDecl, Collection, Field, Schema, Series

__all__ = [
    "GAPS",
    "CaptureDecl",
    "Collection",
    "Field",
    "Schema",
    "Series",
    "builtin_schema",
    "load_schema",
    "parse_schema",
]
