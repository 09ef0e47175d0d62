"""The OpenAPI 3.1 description of the branch server (``GET /openapi.json``).

Written here rather than generated: request bodies are the node schema's
fields (exact decimals as strings), which no decorator knows. A test checks
that every route of the app is described here and that nothing described
here is missing from the app, and that docs/api-http.md names every path.
"""

from __future__ import annotations

from typing import Any

from .. import __version__

Schema = dict[str, Any]

_ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "snake_case error code"},
                "message": {"type": "string", "description": "one line: what happened, what to do"},
            },
        }
    },
}
_STAMPED: Schema = {
    "type": "object",
    "properties": {"at": {"type": "integer"}, "message": {"type": "string"}},
}
_STATUS: Schema = {
    "type": "object",
    "properties": {
        "dataset": {"type": "string"},
        "node": {"type": "string"},
        "online": {"type": "boolean"},
        "state": {"type": "string", "description": "online, connecting, backing off, ..."},
        "offline_mode": {"type": "boolean"},
        "relay": {"type": ["string", "null"]},
        "last_sync": {"type": ["integer", "null"], "description": "wall ms of the last pass"},
        "pending": {"type": "object", "additionalProperties": {"type": "integer"}},
        "pending_total": {"type": "integer"},
        "urgent_pending": {
            "type": "object",
            "additionalProperties": {"type": "integer"},
            "description": "per collection with urgent_when, pending records matching it "
            "(counted in pending too; their documents sync first)",
        },
        "waiting": {"type": "integer"},
        "conflicts": {"type": "integer"},
        "failures": {
            "type": "object",
            "properties": {"upload": {"type": "integer"}, "download": {"type": "integer"}},
        },
        "token_refused": {
            "oneOf": [{"$ref": "#/components/schemas/Stamped"}, {"type": "null"}],
            "description": "when and why the relay last refused the node's token",
        },
        "numbering_known": {
            "type": "boolean",
            "description": "false while a rebuilt home numbers vouchers provisionally",
        },
        "last_reached": {
            "type": ["integer", "null"],
            "description": "wall ms when the node last had a session with the relay",
        },
        "last_error": {
            "oneOf": [{"$ref": "#/components/schemas/Stamped"}, {"type": "null"}],
            "description": "why the latest attempt to sync failed, since when",
        },
        "capture": {
            "type": "object",
            "description": "captured app tables, their changes not yet written, quarantined",
            "properties": {
                "tables": {"type": "integer"},
                "queued": {"type": "integer"},
                "quarantined": {"type": "integer"},
            },
        },
        "sync": {
            "type": "object",
            "properties": {
                "running": {"type": "boolean"},
                "progress": {
                    "type": "object",
                    "description": "collection -> [done, total] records of the current pass",
                    "additionalProperties": {"type": "array", "items": {"type": "integer"}},
                },
            },
        },
    },
}
_RECORD: Schema = {
    "type": "object",
    "description": "a record: id, its fields (decimals as strings, references as codes)",
    "additionalProperties": True,
}
_FIELDS: Schema = {
    "type": "object",
    "description": "fields of the collection (decimals as strings or numbers, read exactly)",
    "additionalProperties": True,
}
_PAGE: Schema = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": _RECORD}, "total": {"type": "integer"}},
}
_ID: Schema = {"type": "object", "properties": {"id": {"type": "string"}}}
_POSTED: Schema = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "number": {"type": ["string", "null"]},
        "provisional": {"type": "boolean"},
    },
}
_OBJECT: Schema = {"type": "object", "additionalProperties": True}
_GAPS: Schema = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["series", "number", "reason", "collection", "node", "at"],
        "properties": {
            "series": {"type": "string", "description": "series key: book, or book@YEAR"},
            "number": {"type": "string"},
            "reason": {"type": "string", "enum": ["void", "restored"]},
            "voucher": {"type": ["string", "null"], "description": "the voucher's record id"},
            "collection": {"type": "string"},
            "node": {"type": "string", "description": "the node where it happened"},
            "at": {"type": "string", "description": "ISO time (UTC)"},
        },
    },
}
_LIST: Schema = {"type": "array", "items": _OBJECT}
_RETRYING: Schema = {
    "type": "object",
    "properties": {"retrying": {"type": "array", "items": {"type": "integer"}}},
}
_RESOLVE: Schema = {
    "type": "object",
    "description": "exactly one of keep, rename, merge_into, renumber; record with rename/renumber",
    "properties": {
        "keep": {"description": "a node name, 'in_force', 'delete', 'edit', or a value"},
        "rename": {"type": "string"},
        "merge_into": {"type": "string"},
        "renumber": {"type": "boolean"},
        "record": {"type": "string"},
    },
}


def _param(name: str, where: str = "path", schema: Schema | None = None, text: str = "") -> Schema:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": schema or {"type": "string"},
        "description": text,
    }


_PAGING = [
    _param("limit", "query", {"type": "integer", "minimum": 0, "maximum": 1000, "default": 100}),
    _param("offset", "query", {"type": "integer", "minimum": 0, "default": 0}),
]


def _op(
    summary: str,
    ok: Schema,
    *,
    params: list[Schema] | None = None,
    body: Schema | None = None,
    ok_status: str = "200",
    errors: tuple[str, ...] = ("401",),
    media: str = "application/json",
) -> Schema:
    responses: Schema = {ok_status: {"description": "done", "content": {media: {"schema": ok}}}}
    for status in errors:
        responses[status] = {
            "description": _ERROR_TEXT[status],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    op: Schema = {"summary": summary, "responses": responses, "security": [{"bearer": []}]}
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return op


_ERROR_TEXT = {
    "400": "bad JSON or a bad parameter or choice",
    "401": "no token, or an unknown one",
    "403": "a write by a read-only user",
    "404": "unknown collection, record, conflict, failure or report",
    "409": "the write collides with what is there (duplicate number, deleted record)",
    "413": "body too large",
    "422": "unknown reference or schema violation",
    "503": "the node cannot do it now (no sync loop, series exhausted, store busy)",
}
_READ = ("401",)
_WRITE = ("400", "401", "403", "404", "409", "413", "422", "503")
_COLL = _param("collection", text="collection name of the node's schema")
_TYPE = _param("type", text="voucher book (a voucher collection)")
_KEYED = _param("id", text="record id, or its code / number")


def openapi_spec() -> Schema:
    """The OpenAPI document (a fresh dict each call)."""
    api = "/api/v1"
    paths: dict[str, dict[str, Schema]] = {
        f"{api}/me": {"get": _op("Who the token belongs to", _OBJECT)},
        f"{api}/status": {"get": _op("Sync status of the node", _STATUS)},
        f"{api}/collections": {"get": _op("Collections of the node's schema", _LIST)},
        f"{api}/pending": {"get": _op("Records waiting to go up (oldest change first)", _LIST)},
        f"{api}/records/{{collection}}": {
            "get": _op(
                "List live records (filter by ?field=value, paging)",
                _PAGE,
                params=[_COLL, *_PAGING],
                errors=("400", "401", "404", "422"),
            ),
            "put": _op(
                "Create a record, or update the one its code (or id) names",
                _ID,
                params=[_COLL],
                body=_FIELDS,
                errors=_WRITE,
            ),
        },
        f"{api}/records/{{collection}}/{{id}}": {
            "get": _op("One live record", _RECORD, params=[_COLL, _KEYED], errors=("401", "404")),
            "delete": _op("Delete a live record", _ID, params=[_COLL, _KEYED], errors=_WRITE),
        },
        f"{api}/vouchers/{{type}}": {
            "get": _op(
                "List vouchers (filter, paging)",
                _PAGE,
                params=[_TYPE, *_PAGING],
                errors=("400", "401", "404", "422"),
            ),
            "post": _op(
                "Book a voucher with the next number of the node's series",
                _POSTED,
                params=[_TYPE],
                body=_FIELDS,
                ok_status="201",
                errors=_WRITE,
            ),
        },
        f"{api}/vouchers/{{type}}/{{id}}/void": {
            "post": _op(
                "Void a voucher (its number is journalled as void)",
                _POSTED,
                params=[_TYPE, _KEYED],
                errors=_WRITE,
            )
        },
        f"{api}/series/gaps": {
            "get": _op(
                "The replicated gap journal: numbers voided or restored on any node",
                _GAPS,
                params=[_param("series", "query", text="one voucher book or series key")],
                errors=("400", "401", "404"),
            )
        },
        f"{api}/conflicts": {"get": _op("Open conflicts", _LIST)},
        f"{api}/conflicts/{{id}}": {
            "get": _op(
                "One open conflict (a unique id prefix is enough)",
                _OBJECT,
                params=[_param("id")],
                errors=("400", "401", "404"),
            )
        },
        f"{api}/conflicts/{{id}}/resolve": {
            "post": _op(
                "Resolve a conflict on every node; returns the journal entry",
                _OBJECT,
                params=[_param("id")],
                body=_RESOLVE,
                errors=_WRITE,
            )
        },
        f"{api}/failures": {
            "get": _op(
                "Sync failures waiting for a person",
                _LIST,
                params=[
                    _param("direction", "query", {"type": "string", "enum": ["upload", "download"]})
                ],
                errors=("400", "401"),
            )
        },
        f"{api}/failures/retry": {
            "post": _op("Retry every sync failure", _RETRYING, errors=("401", "403"))
        },
        f"{api}/failures/{{id}}/retry": {
            "post": _op(
                "Retry one sync failure",
                _RETRYING,
                params=[_param("id", schema={"type": "integer"})],
                errors=("400", "401", "403", "404"),
            )
        },
        f"{api}/sync": {
            "post": _op(
                "Sync now (reconnect at once and run a full pass)",
                {
                    "type": "object",
                    "properties": {
                        "started": {"type": "boolean"},
                        "state": {"type": "string"},
                        "running": {"type": "boolean"},
                    },
                },
                ok_status="202",
                errors=("401", "403", "503"),
            )
        },
        f"{api}/offline": {
            "post": _op("Enter offline mode; returns the status", _STATUS, errors=("401", "403"))
        },
        f"{api}/online": {
            "post": _op("Leave offline mode; returns the status", _STATUS, errors=("401", "403"))
        },
        f"{api}/reports/{{name}}": {
            "get": _op(
                "An accounting report (stock_on_hand, receivables, ledger)",
                {
                    "type": "object",
                    "properties": {
                        "columns": {"type": "array", "items": {"type": "string"}},
                        "rows": {"type": "array", "items": {"type": "array"}},
                    },
                },
                params=[
                    _param(
                        "name",
                        schema={
                            "type": "string",
                            "enum": ["stock_on_hand", "receivables", "ledger"],
                        },
                    )
                ],
                errors=("401", "404", "409"),
            )
        },
        f"{api}/events": {
            "get": _op(
                "Server-sent events: 'status' with the status JSON on every change",
                {"type": "string"},
                media="text/event-stream",
                errors=("401", "503"),
            )
        },
        "/healthz": {"get": _open("Liveness: the node answers", _OBJECT)},
        "/metrics": {"get": _open("Prometheus metrics", {"type": "string"}, "text/plain")},
        "/openapi.json": {"get": _open("This description", _OBJECT)},
        "/": {"get": _open("The web screen", {"type": "string"}, "text/html")},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Branchline branch server",
            "version": __version__,
            "description": "JSON API of a Branchline node for workstations (docs/api-http.md).",
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": _ERROR, "Status": _STATUS, "Stamped": _STAMPED},
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a token of 'branchline node users add NAME'",
                }
            },
        },
    }


def _open(summary: str, ok: Schema, media: str = "application/json") -> Schema:
    return {
        "summary": summary,
        "security": [],
        "responses": {"200": {"description": "done", "content": {media: {"schema": ok}}}},
    }
