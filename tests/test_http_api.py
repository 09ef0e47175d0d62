"""The branch server's JSON API through the ASGI test client, on a real
node home: auth, records, vouchers, status, conflicts, failures, errors,
and the OpenAPI description against the app's routes."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from engine import errors
from engine.node import Node
from engine.server import create_app
from engine.server.errors import ERRORS, http_error
from engine.server.openapi import openapi_spec
from engine.sync.failures import record_failure
from engine.users import add_user, remove_user

API = "/api/v1"


class Api:
    def __init__(self, client: TestClient, token: str) -> None:
        self.client = client
        self.h = {"Authorization": f"Bearer {token}"}

    def __call__(self, method: str, path: str, **kw: Any) -> Any:
        return self.client.request(method, API + path, headers=self.h, **kw)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "hn"
    Node.create(h, dataset="acme", node="HN").close()
    return h


@pytest.fixture
def tokens(home: Path) -> dict[str, str]:
    with Node.open(home) as n:
        return {
            "kt": add_user(n, "kt", read_only=False, now_ms=1),
            "ro": add_user(n, "ro", read_only=True, now_ms=1),
        }


@pytest.fixture
def client(home: Path, tokens: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(home)) as c:
        yield c


@pytest.fixture
def api(client: TestClient, tokens: dict[str, str]) -> Api:
    return Api(client, tokens["kt"])


def seed(api: Api) -> None:
    assert (
        api(
            "PUT", "/records/customers", json={"code": "KH001", "name": "Công ty An Phát"}
        ).status_code
        == 200
    )
    assert (
        api("PUT", "/records/warehouses", json={"code": "K1", "name": "Kho 1"}).status_code == 200
    )
    assert (
        api(
            "PUT", "/records/items", json={"code": "SP1", "name": "Bút bi", "price": "5000"}
        ).status_code
        == 200
    )


INVOICE = {
    "date": "2026-11-23", "customer": "KH001", "warehouse": "K1", "paid": False,
    "lines": [{"item": "SP1", "qty": "3", "price": "5000.50", "vat_rate": "0.1"}],
}  # fmt: skip


def test_auth_needed_and_read_only(client: TestClient, tokens: dict[str, str], home: Path) -> None:
    assert client.get(API + "/status").status_code == 401
    bad = client.get(API + "/status", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "unauthorized"
    ro = Api(client, tokens["ro"])
    assert ro("GET", "/me").json() == {"user": "ro", "read_only": True}
    assert ro("GET", "/records/customers").status_code == 200
    refused = ro("PUT", "/records/customers", json={"code": "X", "name": "x"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "read_only"
    assert ro("GET", "/records/customers").json()["total"] == 0  # nothing written
    with Node.open(home) as n:
        remove_user(n, "ro")
    client.app.state.server.hub.touch()  # type: ignore[attr-defined]
    import time

    deadline = time.monotonic() + 5
    while ro("GET", "/me").status_code != 401:
        assert time.monotonic() < deadline, "a removed user's token still works"
        time.sleep(0.05)


def test_records_crud_filter_paging(api: Api) -> None:
    seed(api)
    for i in range(5):
        api("PUT", "/records/customers", json={"code": f"C{i}", "name": f"n{i % 2}"})
    page = api("GET", "/records/customers?limit=2&offset=1").json()
    assert page["total"] == 6 and len(page["items"]) == 2
    found = api("GET", "/records/customers", params={"name": "Công ty An Phát"}).json()
    assert [r["code"] for r in found["items"]] == ["KH001"]
    assert api("GET", "/records/customers?name=n1").json()["total"] == 2
    assert api("GET", "/records/items?price=5000.00").json()["total"] == 1
    one = api("GET", "/records/customers/KH001").json()
    assert one["name"] == "Công ty An Phát"
    assert (
        api("PUT", "/records/customers", json={"code": "KH001", "name": "An Phát 2"}).json()["id"]
        == one["id"]
    )
    assert api("DELETE", "/records/customers/KH001").json() == {"id": one["id"]}
    gone = api("GET", "/records/customers/KH001")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "record_not_found"


def test_errors_write_nothing(api: Api) -> None:
    seed(api)
    cases = [
        (api("GET", "/records/nope"), 404, "unknown_collection"),
        (api("PUT", "/records/nope", json={"code": "x"}), 404, "unknown_collection"),
        (api("PUT", "/records/customers", content=b"{bad"), 400, "bad_json"),
        (api("PUT", "/records/customers", content=b"[1]"), 400, "bad_json"),
        (api("PUT", "/records/customers", content=b'{"code": "a", "code": "b"}'), 400, "bad_json"),
        (api("PUT", "/records/customers", json={"code": "Z", "nope": 1}), 422, "validation_error"),
        (
            api("POST", "/vouchers/sales_invoice", json={**INVOICE, "customer": "KH999"}),
            422,
            "unknown_reference",
        ),
        (api("POST", "/vouchers/customers", json={"code": "x"}), 404, "unknown_collection"),
        (api("GET", "/records/customers?limit=x"), 400, "bad_parameter"),
        (api("GET", "/records/customers?nofield=1"), 422, "validation_error"),
        (api("GET", "/conflicts/zzz"), 404, "conflict_not_found"),
        (api("POST", "/failures/99/retry"), 404, "failure_not_found"),
        (api("POST", "/failures/x/retry"), 400, "bad_parameter"),
        (api("GET", "/failures?direction=sideways"), 400, "bad_parameter"),
        (api("GET", "/reports/nope"), 404, "unknown_report"),
        (api("GET", "/reports/stock_on_hand"), 409, "adapter_not_enabled"),
        (api("POST", "/sync"), 503, "sync_unavailable"),
        (api("POST", "/conflicts/x/resolve", json={"bogus": 1}), 400, "bad_request"),
    ]
    for response, status, code in cases:
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), (
            response.text
        )
        assert response.json()["error"]["message"]
    st = api("GET", "/status").json()
    assert st["pending"]["customers"] == 1 and st["pending"]["sales_invoice"] == 0


def test_vouchers_post_list_void_and_duplicate_number(api: Api) -> None:
    seed(api)
    body = (
        b'{"date": "2026-11-23", "customer": "KH001", "warehouse": "K1", "paid": false, '
        b'"lines": [{"item": "SP1", "qty": 3, "price": 5000.50, "vat_rate": 0.1}]}'
    )
    r = api("POST", "/vouchers/sales_invoice", content=body)
    assert r.status_code == 201
    posted = r.json()
    assert posted["number"] == "HDHN-2026-000001" and posted["provisional"] is False
    items = api("GET", "/vouchers/sales_invoice").json()["items"]
    assert items[0]["lines"][0]["price"] == "5000.50"  # exact, as text
    dup = api("POST", "/vouchers/sales_invoice", json={**INVOICE, "number": "HDHN-2026-000001"})
    assert dup.status_code == 409 and dup.json()["error"]["code"] == "duplicate_key"
    voided = api("POST", "/vouchers/sales_invoice/HDHN-2026-000001/void").json()
    assert voided == {"id": posted["id"], "number": "HDHN-2026-000001"}
    assert api("GET", "/vouchers/sales_invoice").json()["total"] == 0
    gaps = api("GET", "/series/gaps").json()
    assert [(g["series"], g["number"], g["reason"], g["voucher"], g["node"]) for g in gaps] == [
        ("sales_invoice@2026", "HDHN-2026-000001", "void", posted["id"], "HN")
    ]
    assert api("GET", "/series/gaps?series=cash_receipt").json() == []
    assert api("GET", "/series/gaps?series=customers").status_code == 404
    refused = api("PUT", "/records/number_gaps", json={"id": gaps[0]["voucher"]})
    assert refused.status_code == 400 and "Branchline only" in refused.text


def test_status_pending_collections(api: Api) -> None:
    st = api("GET", "/status").json()
    described = openapi_spec()["components"]["schemas"]["Status"]["properties"]
    assert set(st) == set(described)  # the OpenAPI description names every field
    assert st["dataset"] == "acme" and st["node"] == "HN" and st["pending_total"] == 0
    assert st["sync"] == {"running": False, "progress": {}}
    seed(api)
    api("POST", "/vouchers/sales_invoice", json=INVOICE)
    st = api("GET", "/status").json()
    assert st["pending_total"] == 4 and st["pending"]["sales_invoice"] == 1
    assert st["failures"] == {"upload": 0, "download": 0} and st["conflicts"] == 0
    pend = api("GET", "/pending").json()
    assert [p.get("code") or p.get("number") for p in pend] == [
        "KH001",
        "K1",
        "SP1",
        "HDHN-2026-000001",
    ]
    colls = {c["name"]: c for c in api("GET", "/collections").json()}
    assert colls["sales_invoice"]["kind"] == "voucher" and colls["customers"]["key"] == "code"
    assert api("GET", "/conflicts").json() == [] and api("GET", "/failures").json() == []
    off = api("POST", "/offline").json()
    assert off["offline_mode"] is True
    assert api("POST", "/online").json()["offline_mode"] is False


def test_duplicate_code_conflict_resolved_by_rename(tmp_path: Path, home: Path, api: Api) -> None:
    other = tmp_path / "hcm"
    with Node.create(other, dataset="acme", node="HCM") as b:
        b.put("customers", {"code": "KH001", "name": "từ HCM"})
        updates = b.export_updates()
    api("PUT", "/records/customers", json={"code": "KH001", "name": "từ HN"})
    with Node.open(home) as n:
        n.import_updates(updates)
    found = api("GET", "/conflicts").json()
    assert [c["kind"] for c in found] == ["duplicate_key"]
    cid = found[0]["id"]
    assert api("GET", f"/conflicts/{cid[:6]}").json()["id"] == cid
    entry = api("POST", f"/conflicts/{cid[:6]}/resolve", json={"rename": "KH002"})
    assert entry.status_code == 200, entry.text
    assert api("GET", "/conflicts").json() == []
    assert api("GET", "/records/customers").json()["total"] == 2


def test_healthz_metrics_openapi_unauthenticated(client: TestClient, api: Api) -> None:
    api("GET", "/status")
    assert client.get("/healthz").json()["ok"] is True
    text = client.get("/metrics").text
    for name in (
        "branchline_node_api_request_seconds_bucket",
        "branchline_node_pending_records",
        "branchline_node_sync_failures",
        "branchline_node_conflicts",
        "branchline_node_sync_pass_seconds",
        "branchline_node_sync_apply_seconds",
    ):
        assert name in text
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")


def test_openapi_and_docs_describe_every_route(client: TestClient) -> None:
    spec = openapi_spec()["paths"]
    described = {(p, m.upper()) for p, ops in spec.items() for m in ops}
    served = set()
    for route in client.app.routes:  # type: ignore[attr-defined]
        if isinstance(route, Route):
            served |= {(route.path, m) for m in route.methods or () if m != "HEAD"}
    assert served == described
    doc = (Path(__file__).parent.parent / "docs" / "api-http.md").read_text()
    missing = [f"{m} {p}" for p, m in sorted(described) if f"{m} {p}" not in doc]
    assert not missing, f"docs/api-http.md lacks {missing}"


def test_error_table_covers_every_error_in_order() -> None:
    classes = [
        c
        for _, c in inspect.getmembers(errors, inspect.isclass)
        if issubclass(c, errors.BranchlineError)
    ]
    listed = [cls for cls, _, _ in ERRORS]
    for i, cls in enumerate(listed):
        hidden = [base for base in listed[:i] if issubclass(cls, base)]
        assert not hidden, f"{cls.__name__} is hidden by {hidden}"
    for cls in classes:
        assert any(issubclass(cls, row) for row in listed), cls
    assert http_error(errors.UnknownReference("x")) == (422, "unknown_reference")
    assert http_error(errors.ReadOnlyUser("x")) == (403, "read_only")


def test_failures_listed_retried_one_and_all(home: Path, api: Api) -> None:
    with Node.open(home) as n:
        up = record_failure(n, "upload", "sales_invoice/2026-11", "locked_period", "closed", 5)
        down = record_failure(n, "download", "customers", "bad_update", "not an update", 6)
    api("POST", "/offline")  # a status change: the next read computes it again
    assert api("GET", "/status").json()["failures"] == {"upload": 1, "download": 1}
    listed = api("GET", "/failures").json()
    assert sorted(f["id"] for f in listed) == sorted([up, down])
    only_up = api("GET", "/failures?direction=upload").json()
    assert [f["id"] for f in only_up] == [up] and only_up[0]["document"] == "sales_invoice/2026-11"
    assert api("POST", f"/failures/{up}/retry").json() == {"retrying": [up]}
    assert sorted(api("POST", "/failures/retry").json()["retrying"]) == sorted([up, down])


def test_delete_record_and_reports_with_the_accounting_adapter(home: Path, api: Api) -> None:
    with Node.open(home) as n:
        n.enable_adapter("accounting")
    seed(api)
    api("PUT", "/records/customers", json={"code": "KH009", "name": "to delete"})
    gone = api("DELETE", "/records/customers/KH009")
    assert gone.status_code == 200 and api("GET", "/records/customers/KH009").status_code == 404
    assert api("DELETE", "/records/customers/KH009").status_code == 404
    api("POST", "/vouchers/sales_invoice", json=INVOICE)
    stock = api("GET", "/reports/stock_on_hand").json()
    assert stock["columns"] and stock["rows"], stock
    receivables = api("GET", "/reports/receivables").json()
    assert any("KH001" in map(str, row) for row in receivables["rows"]), receivables
    assert api("GET", "/reports/ledger").status_code == 200


def test_concurrent_edit_kept_and_duplicate_merged(tmp_path: Path, home: Path, api: Api) -> None:
    api("PUT", "/records/customers", json={"code": "KH001", "name": "An"})
    other = tmp_path / "hcm"
    with Node.open(home) as n:
        shared = n.export_updates()
    with Node.create(other, dataset="acme", node="HCM") as b:
        b.import_updates(shared)
        b.put("customers", {"code": "KH001", "name": "An (HCM)"})
        b.put("customers", {"code": "KH777", "name": "Bình"})
        ours = b.export_updates()
    api("PUT", "/records/customers", json={"code": "KH001", "name": "An (HN)"})
    api("PUT", "/records/customers", json={"code": "KH777", "name": "Bình HN"})
    with Node.open(home) as n:
        n.import_updates(ours)
    found = {c["kind"]: c for c in api("GET", "/conflicts").json()}
    assert set(found) == {"concurrent_edit", "duplicate_key"}
    kept = api("POST", f"/conflicts/{found['concurrent_edit']['id']}/resolve", json={"keep": "HCM"})
    assert kept.status_code == 200, kept.text
    assert api("GET", "/records/customers/KH001").json()["name"] == "An (HCM)"
    dup = found["duplicate_key"]
    merged = api("POST", f"/conflicts/{dup['id']}/resolve", json={"merge_into": dup["records"][0]})
    assert merged.status_code == 200, merged.text
    assert api("GET", "/conflicts").json() == []
