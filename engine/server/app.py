"""The branch server's ASGI application (docs/api-http.md, docs/operations.md).

``create_app(home)`` returns a Starlette app serving the JSON API under
``/api/v1``, ``/healthz``, ``/metrics``, ``/openapi.json`` and the web screen
(``engine/server/static``). With ``sync=True`` its lifespan also runs the
node's live sync loop (``engine.transport.LiveSync``) in the same event loop.

**Threads.** ``Node`` is single-threaded (pycrdt, sqlite3): every API call
runs on one worker thread that owns the server's own ``Node`` (a
``NodeThread``, as the sync loop has its own), one call at a time, so a heavy
call never blocks the event loop and no lock is needed. Routes use Node's
public interface and the sync helpers only.

**Auth.** Every ``/api/v1`` call needs ``Authorization: Bearer <token>`` of a
user of ``branchline node users``; writes need a user that is not read-only.
Tokens are only ever read from that header (never from a URL, so access logs
cannot show them) and never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from .. import jsonio
from ..errors import (
    AuthError,
    BranchlineError,
    ConflictNotFound,
    ReadOnlyUser,
    RecordNotFound,
    SyncUnavailable,
    UnknownCollection,
    UserError,
    ValidationError,
)
from ..node import Node
from ..schema.model import Collection, Field
from ..sync import list_failures, retry
from ..transport import Backoff, LiveSync, relay_of, set_offline
from ..transport.client import NodeThread
from ..transport.pump import CapturePump
from ..users import User
from .errors import HttpError, error_body, http_error
from .hub import StatusHub
from .metrics import CONTENT_TYPE, NodeMetrics
from .openapi import openapi_spec
from .writes import WriteGroup

log = logging.getLogger("branchline.server")

T = TypeVar("T")

API = "/api/v1"
STATIC_DIR = Path(__file__).parent / "static"
#: Largest request body accepted (a voucher with thousands of lines fits).
MAX_BODY_BYTES = 16 << 20
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
#: Seconds between keep-alive comments of an idle event stream.
KEEPALIVE_S = 15.0
#: Reports by name -> the accounting adapter's view they read.
REPORTS = {
    "stock_on_hand": "stock_on_hand",
    "receivables": "receivables",
    "ledger": "account_balances",
}
RESOLVE_KEYS = frozenset({"keep", "rename", "merge_into", "renumber", "record"})


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class ServerState:
    """What the routes of one app share (set up by the lifespan)."""

    home: Path
    nt: NodeThread
    hub: StatusHub
    metrics: NodeMetrics
    live: LiveSync | None
    keepalive_s: float
    writes: WriteGroup

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(node, *args)`` on the API thread."""
        return await self.nt.run(fn, *args)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(node, *args)`` on the API thread, committed together with the
        other writes waiting (engine.server.writes); the status is then due."""
        try:
            return await self.writes.run(fn, *args)
        finally:
            self.hub.touch()


# -- responses -------------------------------------------------------------------


class JSON(Response):
    """A JSON response with exact decimals (``engine.jsonio``)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else jsonio.dumps(content)


def _error(status: int, code: str, message: str) -> JSON:
    return JSON(error_body(code, message), status_code=status)


Handler = Callable[[Request, "ServerState", User], Awaitable[Response]]


def endpoint(handler: Handler, *, write: bool = False) -> Callable[[Request], Awaitable[Response]]:
    """An API route: authenticate (a writer for ``write``), time it, and turn
    every error into the one error body."""

    async def run(request: Request) -> Response:
        started = time.perf_counter()
        state: ServerState = request.app.state.server
        try:
            user = _authenticate(request, state)
            if write and user.read_only:
                raise ReadOnlyUser(f"user {user.name!r} is read-only: it can read, not write")
            response = await handler(request, state, user)
        except HttpError as exc:
            response = _error(exc.status, exc.code, exc.message)
        except BranchlineError as exc:
            status, code = http_error(exc)
            if status >= 500:
                log.error("%s %s: %s", request.method, _route(request), exc)
            response = _error(status, code, str(exc))
        state.metrics.observe_api(_route(request), request.method, started)
        return response

    return run


def _route(request: Request) -> str:
    route = request.scope.get("route")
    return str(getattr(route, "path", "other"))


def _authenticate(request: Request, state: ServerState) -> User:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError(
            "this API needs 'Authorization: Bearer <token>'; "
            "a token comes from 'branchline node users add NAME'"
        )
    user = state.hub.user_for(token)
    if user is None:
        raise AuthError("unknown or removed token; ask for a new one ('branchline node users add')")
    return user


async def _body(request: Request) -> dict[str, Any]:
    """The request body as one JSON object of fields (exact decimals).
    Raises HttpError 400 (not UTF-8 JSON object) or 413."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise HttpError(413, "too_large", f"the body is over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError(400, "bad_json", "the body is not UTF-8 text") from None
    try:
        return jsonio.loads_object(text)
    except UserError as exc:
        raise HttpError(400, "bad_json", str(exc)) from None


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HttpError(400, "bad_parameter", f"{name}={raw!r}: expected a whole number") from None
    if not low <= value <= high:
        raise HttpError(400, "bad_parameter", f"{name}={value}: expected {low} to {high}")
    return value


# -- routes: who, status, schema ---------------------------------------------------


async def me(request: Request, state: ServerState, user: User) -> Response:
    return JSON({"user": user.name, "read_only": user.read_only})


async def status(request: Request, state: ServerState, user: User) -> Response:
    return JSON(await state.hub.current_json())


def _field_json(fld: Field) -> dict[str, Any]:
    out: dict[str, Any] = {"name": fld.name, "type": fld.type, "required": fld.required}
    if fld.to:
        out["to"] = fld.to
    if fld.fields:
        out["fields"] = [_field_json(f) for f in fld.fields]
    return out


def _collections(node: Node) -> list[dict[str, Any]]:
    return [
        {
            "name": c.name,
            "kind": c.kind,
            "key": c.key,
            "fields": [_field_json(f) for f in c.fields.values()],
        }
        for c in node.schema.ordered()
    ]


async def collections(request: Request, state: ServerState, user: User) -> Response:
    return JSON(await state.call(_collections))


def _pending(node: Node) -> list[dict[str, Any]]:
    out = []
    for row in node.pending_records():
        coll = node.schema.collections.get(row["collection"])
        out.append(
            {
                "collection": row["collection"],
                "id": row["id"],
                (coll.key if coll else "key"): row["key"],
                "doc": row["doc"],
            }
        )
    return out


async def pending(request: Request, state: ServerState, user: User) -> Response:
    return JSON(await state.call(_pending))


# -- routes: records and vouchers --------------------------------------------------


def _matches(fld: Field, value: Any, wanted: str) -> bool:
    """Whether a record's shown value equals a query-string value."""
    if value is None:
        return wanted == ""
    if fld.type == "decimal":
        try:
            return bool(Decimal(wanted) == value)
        except InvalidOperation:
            return False
    if fld.type == "bool":
        return (
            wanted.lower() in ("true", "1", "yes")
            if value
            else wanted.lower() in ("false", "0", "no")
        )
    if fld.type == "date":
        return bool(value.isoformat() == wanted)
    if fld.type == "lines":
        return False
    return str(value) == wanted


def _page(
    node: Node, name: str, filters: dict[str, str], limit: int, offset: int, voucher: bool
) -> dict[str, Any]:
    coll = _coll(node, name, voucher)
    if not filters:
        total = node.count(name)
        return {"items": node.list(name, codes=True, limit=limit, offset=offset), "total": total}
    for field in filters:
        if field != "id" and field not in coll.fields:
            raise ValidationError(
                f"{name}: cannot filter on unknown field '{field}' "
                f"(known: {', '.join(coll.fields)})"
            )
    found = [
        rec
        for rec in node.list(name, codes=True)
        if all(
            rec.get("id") == wanted
            if field == "id"
            else _matches(coll.fields[field], rec.get(field), wanted)
            for field, wanted in filters.items()
        )
    ]
    return {"items": found[offset : offset + limit], "total": len(found)}


def _coll(node: Node, name: str, voucher: bool | None) -> Collection:
    coll = node.collection(name)
    if voucher is True and not coll.is_voucher:
        raise UnknownCollection(f"{name} is a catalog, not a voucher book; use /records/{name}")
    return coll


def _list_params(request: Request) -> tuple[int, int, dict[str, str]]:
    limit = _int_param(request, "limit", DEFAULT_LIMIT, 0, MAX_LIMIT)
    offset = _int_param(request, "offset", 0, 0, 1 << 40)
    filters = {k: v for k, v in request.query_params.items() if k not in ("limit", "offset")}
    return limit, offset, filters


async def list_records(request: Request, state: ServerState, user: User) -> Response:
    limit, offset, filters = _list_params(request)
    name = request.path_params["collection"]
    return JSON(await state.call(_page, name, filters, limit, offset, False))


def _get(node: Node, name: str, id_or_key: str) -> dict[str, Any]:
    coll = node.collection(name)
    record = node.get(name, id_or_key, codes=True)
    if record is None:
        raise RecordNotFound(f"{name}: no live record with id or {coll.key} {id_or_key!r}")
    return record


async def get_record(request: Request, state: ServerState, user: User) -> Response:
    p = request.path_params
    return JSON(await state.call(_get, p["collection"], p["id"]))


async def put_record(request: Request, state: ServerState, user: User) -> Response:
    fields = await _body(request)
    rid = await state.write(Node.put, request.path_params["collection"], fields)
    return JSON({"id": rid})


async def delete_record(request: Request, state: ServerState, user: User) -> Response:
    p = request.path_params
    rid = await state.write(Node.delete, p["collection"], p["id"])
    return JSON({"id": rid})


def _post_voucher(node: Node, name: str, fields: dict[str, Any]) -> dict[str, Any]:
    _coll(node, name, True)
    posted = node.post_voucher(name, fields)
    return {"id": posted.id, "number": posted.number, "provisional": posted.provisional}


async def post_voucher(request: Request, state: ServerState, user: User) -> Response:
    fields = await _body(request)
    posted = await state.write(_post_voucher, request.path_params["type"], fields)
    return JSON(posted, status_code=201)


async def list_vouchers(request: Request, state: ServerState, user: User) -> Response:
    limit, offset, filters = _list_params(request)
    name = request.path_params["type"]
    return JSON(await state.call(_page, name, filters, limit, offset, True))


def _void(node: Node, name: str, id_or_number: str) -> dict[str, Any]:
    _coll(node, name, True)
    record = _get(node, name, id_or_number)
    rid = node.delete(name, record["id"])
    return {"id": rid, "number": record.get("number")}


async def void_voucher(request: Request, state: ServerState, user: User) -> Response:
    p = request.path_params
    voided = await state.write(_void, p["type"], p["id"])
    return JSON(voided)


async def series_gaps(request: Request, state: ServerState, user: User) -> Response:
    return JSON(await state.call(Node.gaps, request.query_params.get("series")))


# -- routes: conflicts -------------------------------------------------------------


def _conflict(node: Node, prefix: str) -> dict[str, Any]:
    """The open conflict whose id is ``prefix`` or starts with it."""
    found = [c for c in node.conflicts() if str(c["id"]).startswith(prefix)]
    exact = [c for c in found if c["id"] == prefix]
    if exact:
        return exact[0]
    if not found or not prefix:
        raise ConflictNotFound(f"no open conflict {prefix!r} (it may be resolved already)")
    if len(found) > 1:
        raise UserError(f"{len(found)} conflicts start with {prefix!r}; give more of the id")
    return found[0]


async def list_conflicts(request: Request, state: ServerState, user: User) -> Response:
    return JSON(await state.call(Node.conflicts))


async def get_conflict(request: Request, state: ServerState, user: User) -> Response:
    return JSON(await state.call(_conflict, request.path_params["id"]))


def _resolve(node: Node, prefix: str, choice: dict[str, Any]) -> dict[str, Any]:
    conflict = _conflict(node, prefix)
    record = choice.get("record")
    if record is not None and not isinstance(record, str):
        raise UserError("record: expected a record id")
    for name in ("rename", "merge_into"):
        if name in choice and not isinstance(choice[name], str):
            raise UserError(f"{name}: expected text")
    renumber = choice.get("renumber", False)
    if not isinstance(renumber, bool):
        raise UserError("renumber: expected true")
    return node.resolve(
        str(conflict["id"]),
        keep=choice.get("keep"),
        rename=choice.get("rename"),
        merge_into=choice.get("merge_into"),
        renumber=renumber,
        record=record,
    )


async def resolve_conflict(request: Request, state: ServerState, user: User) -> Response:
    choice = await _body(request)
    unknown = sorted(set(choice) - RESOLVE_KEYS)
    if unknown:
        raise HttpError(
            400,
            "bad_request",
            f"unknown choice {', '.join(unknown)}: give one of keep, rename (with record), "
            "merge_into, renumber (with record)",
        )
    entry = await state.write(_resolve, request.path_params["id"], choice)
    return JSON(entry)


# -- routes: failures, sync, offline -----------------------------------------------


def _failures(node: Node, direction: str | None) -> list[dict[str, Any]]:
    return [f.to_json() for f in list_failures(node) if direction in (None, f.direction)]


async def failures(request: Request, state: ServerState, user: User) -> Response:
    direction = request.query_params.get("direction") or None
    if direction not in (None, "upload", "download"):
        raise HttpError(
            400, "bad_parameter", f"direction={direction!r}: expected upload or download"
        )
    return JSON(await state.call(_failures, direction))


def _retry(node: Node, ids: list[int] | None) -> dict[str, Any]:
    return {"retrying": [f.id for f in retry(node, ids)]}


async def retry_one(request: Request, state: ServerState, user: User) -> Response:
    raw = request.path_params["id"]
    try:
        fid = int(raw)
    except ValueError:
        raise HttpError(400, "bad_parameter", f"failure id {raw!r}: expected a number") from None
    done = await state.call(_retry, [fid])
    state.hub.touch()
    return JSON(done)


async def retry_all(request: Request, state: ServerState, user: User) -> Response:
    done = await state.call(_retry, None)
    state.hub.touch()
    return JSON(done)


async def sync_now(request: Request, state: ServerState, user: User) -> Response:
    live = state.live
    if live is None:
        raise SyncUnavailable(
            "this server runs no sync loop (no relay configured for the node, or started "
            "without sync); 'branchline sync' syncs once"
        )
    started = live.sync_now()
    status = await state.hub.current()
    return JSON(
        {"started": started, "state": live.state, "running": status["sync"]["running"]},
        status_code=202,
    )


async def _offline(state: ServerState, flag: bool) -> Response:
    await state.call(set_offline, flag)
    state.hub.touch()
    if not flag and state.live is not None:
        state.live.sync_now()
    return JSON(await state.hub.current_json())


async def go_offline(request: Request, state: ServerState, user: User) -> Response:
    return await _offline(state, True)


async def go_online(request: Request, state: ServerState, user: User) -> Response:
    return await _offline(state, False)


# -- routes: reports, events -------------------------------------------------------


def _report(node: Node, view: str) -> dict[str, Any]:
    if "accounting" not in node.adapters():
        raise HttpError(
            409,
            "adapter_not_enabled",
            "reports need the accounting adapter: 'branchline adapters enable accounting'",
        )
    result = node.query(f"SELECT * FROM {view}")  # a view name from REPORTS
    return {"columns": result.columns, "rows": result.json_rows()}


async def report(request: Request, state: ServerState, user: User) -> Response:
    name = request.path_params["name"]
    view = REPORTS.get(name)
    if view is None:
        raise HttpError(404, "unknown_report", f"no report {name!r} (known: {', '.join(REPORTS)})")
    return JSON(await state.call(_report, view))


async def events(request: Request, state: ServerState, user: User) -> Response:
    sub = state.hub.subscribe()
    first = await state.hub.current_json()

    async def stream() -> AsyncIterator[bytes]:
        sent = first
        try:
            yield b"event: status\ndata: " + first + b"\n\n"
            while True:
                try:
                    data = await asyncio.wait_for(sub.queue.get(), state.keepalive_s)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                if data != sent:
                    sent = data
                    yield b"event: status\ndata: " + data + b"\n\n"
        finally:
            state.hub.unsubscribe(sub)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


# -- unauthenticated: health, metrics, description, page -----------------------------


async def healthz(request: Request) -> Response:
    state: ServerState = request.app.state.server
    try:
        status = await state.hub.current()
    except BranchlineError as exc:
        return JSONResponse({"ok": False, "error": str(exc)}, status_code=503)
    return JSONResponse({"ok": True, "node": status["node"], "state": status["state"]})


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.server
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


async def openapi(request: Request) -> Response:
    return JSON(openapi_spec())


async def index(request: Request) -> Response:
    page = STATIC_DIR / "index.html"
    if not page.is_file():
        return _error(404, "no_page", "this installation has no web screen (engine/server/static)")
    return FileResponse(page, headers={"Cache-Control": "no-cache"})


# -- the app -----------------------------------------------------------------------

#: (path, method, handler, writes): every API route, in the order of the docs.
API_ROUTES: tuple[tuple[str, str, Handler, bool], ...] = (
    ("/me", "GET", me, False),
    ("/status", "GET", status, False),
    ("/collections", "GET", collections, False),
    ("/pending", "GET", pending, False),
    ("/records/{collection}", "GET", list_records, False),
    ("/records/{collection}", "PUT", put_record, True),
    ("/records/{collection}/{id}", "GET", get_record, False),
    ("/records/{collection}/{id}", "DELETE", delete_record, True),
    ("/vouchers/{type}", "GET", list_vouchers, False),
    ("/vouchers/{type}", "POST", post_voucher, True),
    ("/vouchers/{type}/{id}/void", "POST", void_voucher, True),
    ("/series/gaps", "GET", series_gaps, False),
    ("/conflicts", "GET", list_conflicts, False),
    ("/conflicts/{id}", "GET", get_conflict, False),
    ("/conflicts/{id}/resolve", "POST", resolve_conflict, True),
    ("/failures", "GET", failures, False),
    ("/failures/retry", "POST", retry_all, True),
    ("/failures/{id}/retry", "POST", retry_one, True),
    ("/sync", "POST", sync_now, True),
    ("/offline", "POST", go_offline, True),
    ("/online", "POST", go_online, True),
    ("/reports/{name}", "GET", report, False),
    ("/events", "GET", events, False),
)


def _routes() -> list[BaseRoute]:
    by_path: dict[str, dict[str, Callable[[Request], Awaitable[Response]]]] = {}
    for path, method, handler, writes in API_ROUTES:
        by_path.setdefault(path, {})[method] = endpoint(handler, write=writes)
    routes: list[BaseRoute] = []
    for path, methods in by_path.items():

        async def dispatch(
            request: Request,
            _methods: dict[str, Callable[[Request], Awaitable[Response]]] = methods,
        ) -> Response:
            return await _methods[request.method](request)

        routes.append(Route(API + path, dispatch, methods=list(methods)))
    routes += [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/", index, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static"),
    ]
    return routes


def create_app(
    home: str | Path,
    *,
    sync: bool = False,
    backoff: Backoff | None = None,
    wall_ms: Callable[[], int] = _wall_ms,
    keepalive_s: float = KEEPALIVE_S,
) -> Starlette:
    """The branch server app of node ``home``.

    With ``sync``, the lifespan also runs the node's live sync loop (when the
    node has a relay configured; otherwise it logs that it serves without
    sync). Starting raises what ``Node.open`` raises (HomeNotFound, ...).
    """
    home = Path(home)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        dataset = await _dataset_of(home, wall_ms)
        async with NodeThread(home, dataset=dataset, wall_ms=wall_ms) as nt:
            live: LiveSync | None = None
            hub = StatusHub(nt, None, wall_ms)
            server_metrics = NodeMetrics(lambda: hub.status, wall_ms)
            if sync:
                try:
                    url, token = await nt.run(relay_of)
                except UserError as exc:
                    log.warning("serving without sync: %s", exc)
                else:
                    live = LiveSync(
                        nt.node,  # read for home and dataset only, on this thread
                        url=url,
                        token=token,
                        backoff=backoff,
                        wall_ms=wall_ms,
                        on_progress=hub.on_progress,
                        on_apply=server_metrics.apply_seconds.observe,
                        on_synced=server_metrics.sync_seconds.observe,
                        capture=False,  # the API thread drains (below): its sync thread imports
                    )
            hub.live = live
            app.state.server = ServerState(
                home, nt, hub, server_metrics, live, keepalive_s, WriteGroup(nt)
            )
            async with contextlib.AsyncExitStack() as stack:
                await stack.enter_async_context(CapturePump(nt))
                if live is not None:
                    await stack.enter_async_context(live)
                await hub.start()
                try:
                    yield
                finally:
                    await hub.stop()

    return Starlette(routes=_routes(), lifespan=lifespan)


async def _dataset_of(home: Path, wall_ms: Callable[[], int]) -> str:
    """The home's dataset (opening it once checks it is a node home)."""

    def read() -> str:
        with Node.open(home) as node:
            return node.dataset

    return await asyncio.to_thread(read)
