"""``make demo``: two branch servers book offline and converge through files.

Two node homes of one dataset (built-in ``accounting`` schema) are created in a
temporary directory. Both book catalog entries and vouchers while "offline",
including the same customer code at both branches and a concurrent edit of
one field; then they exchange updates through export/state files
(``engine.exchange``), and the demo prints the converged records, the voucher
numbers and the conflicts, and checks that both nodes hold exactly the same.
Run with ``python -m engine.demo [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .errors import DatasetMismatch
from .exchange import Exported, export_to_file, import_from_file, save_state
from .node import Node

DATASET = "demo-company"
HANOI, SAIGON = "hanoi", "saigon"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _money(value: Any) -> str:
    if not isinstance(value, Decimal):
        return ""
    # 17500.0 reads as 17,500: whole amounts without a decimal tail.
    return f"{value.to_integral_value():,}" if value == value.to_integral_value() else f"{value:,}"


def _total(lines: list[dict[str, Any]]) -> Decimal:
    return sum((line["qty"] * line["price"] for line in lines), Decimal(0))


def _step(console: Console, title: str) -> None:
    console.print()
    console.rule(Text(title, style="bold cyan"), align="left")


def _sent(console: Console, what: str, done: Exported) -> None:
    console.print(
        f"  {what}: [bold]{done.path.name}[/] — {done.documents} documents, {done.bytes} bytes"
    )


def _records_table(node: Node, collection: str, columns: list[str], title: str) -> Table:
    # References are stored as ids; show the customer's code and name, so a
    # voucher visibly keeps pointing at its own KH001 after the merge.
    customers = {r["id"]: f"{r['code']} {r['name']}" for r in node.list("customers")}
    warehouses = {r["id"]: r["code"] for r in node.list("warehouses")}
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, justify="right" if col in ("price", "amount", "total") else "left")
    for rec in node.list(collection):
        row = []
        for col in columns:
            value = rec.get(col)
            if col == "total":
                row.append(_money(_total(rec["lines"])))
            elif col in ("price", "amount"):
                row.append(_money(value))
            elif col == "customer":
                row.append(customers.get(value, str(value)))
            elif col == "warehouse":
                row.append(warehouses.get(value, str(value)))
            elif isinstance(value, bool):
                row.append("yes" if value else "no")
            else:
                row.append("" if value is None else str(value))
        table.add_row(*(Text(cell) for cell in row))
    return table


def _conflicts_table(node: Node) -> Table:
    table = Table(title="Conflicts found (identical at both nodes)", title_justify="left")
    table.add_column("kind")
    table.add_column("where")
    table.add_column("competing values (in force first)")
    names = {r["id"]: f"{r['code']} {r['name']}" for r in node.list("customers") if "code" in r}
    for c in node.conflicts():
        if c["kind"] == "duplicate_key":
            where = f"{c['collection']}.{c['field']} = {c['key']}"
            values = [f"{v['node']}: {names.get(v['value'], v['value'])}" for v in c["values"]]
        else:
            record = names.get(c["records"][0], c["records"][0])
            where = f"{c['collection']} {record}, field {c['field']}"
            values = [f"{v['node']}: {v['value']}" for v in c["values"]]
        marked = [("✔ " if i == 0 else "  ") + v for i, v in enumerate(values)]
        table.add_row(Text(c["kind"]), Text(where), Text("\n".join(marked)))
    return table


def snapshot(node: Node) -> dict[str, Any]:
    """Everything a user can read from ``node``: records of every collection and conflicts."""
    return {
        "records": {name: node.list(name) for name in sorted(node.schema.collections)},
        "conflicts": node.conflicts(),
    }


def run(workdir: Path, console: Console) -> dict[str, Any]:
    """Play the scenario in ``workdir``; returns the converged snapshot.

    Raises AssertionError if the two nodes do not end identical.
    """
    started = time.perf_counter()
    hanoi = Node.create(workdir / HANOI, dataset=DATASET, node=HANOI)
    saigon = Node.create(workdir / SAIGON, dataset=DATASET, node=SAIGON)
    files = workdir / "exchange"
    files.mkdir()
    console.print(
        Panel(
            Text(
                f"Dataset '{DATASET}', two branch servers: '{HANOI}' and '{SAIGON}'\n"
                f"Node homes and exchange files in {workdir}"
            ),
            title="Branchline demo",
        )
    )

    _step(console, "1. Hanoi sets up the catalogs; Saigon receives them by file")
    hanoi.put("warehouses", {"code": "KHO-HN", "name": "Kho Hà Nội"})
    hanoi.put("items", {"code": "SP01", "name": "Bút bi", "unit": "cây", "price": "5000"})
    hanoi.put("items", {"code": "SP02", "name": "Vở kẻ ngang", "unit": "quyển", "price": "12000"})
    hanoi.put("customers", {"code": "KH002", "name": "Công ty Minh Long", "address": "1 Hàng Bài"})
    first = export_to_file(hanoi, files / "1-hanoi-full.blx", created_ms=_now_ms())
    _sent(console, "hanoi exports everything", first)
    report = import_from_file(saigon, first.path).report
    console.print(f"  saigon imports it: {report.records} records")

    _step(console, "2. The link is down: both branches keep working offline")
    # The same customer code at both branches: two real customers, one code.
    hanoi.put("customers", {"code": "KH001", "name": "Công ty An Phát"})
    saigon.put("customers", {"code": "KH001", "name": "Cửa hàng Bình Minh"})
    # One field edited at both: a conflict. Different fields: both survive.
    hanoi.put("customers", {"code": "KH002", "address": "12 Tràng Tiền, Hà Nội"})
    saigon.put("customers", {"code": "KH002", "address": "45 Lê Lợi, TP.HCM"})
    hanoi.put("items", {"code": "SP01", "price": "5500"})
    saigon.put("items", {"code": "SP01", "unit": "hộp"})
    saigon.put("warehouses", {"code": "KHO-SG", "name": "Kho Sài Gòn"})
    vouchers: list[tuple[Node, str, dict[str, Any]]] = [
        (
            hanoi,
            "sales_invoice",
            {
                "date": "2024-05-06",
                "customer": "KH002",
                "warehouse": "KHO-HN",
                "paid": False,
                "lines": [
                    {"item": "SP01", "qty": "100", "price": "5500", "vat_rate": "0.1"},
                    {"item": "SP02", "qty": "20", "price": "12000", "vat_rate": "0.1"},
                ],
            },
        ),
        (hanoi, "cash_receipt", {"date": "2024-05-07", "customer": "KH002", "amount": "790000"}),
        (
            saigon,
            "sales_invoice",
            {
                "date": "2024-05-06",
                "customer": "KH002",
                "warehouse": "KHO-SG",
                "paid": True,
                "lines": [{"item": "SP02", "qty": "5", "price": "12000"}],
            },
        ),
        (
            saigon,
            "sales_invoice",
            {
                "date": "2024-05-08",
                "customer": "KH001",  # saigon's own KH001, the only one it knows
                "warehouse": "KHO-SG",
                "lines": [{"item": "SP01", "qty": "3.5", "price": "5000"}],
            },
        ),
    ]
    numbers = Table(title="Vouchers booked offline", title_justify="left")
    for col in ("node", "number", "type"):
        numbers.add_column(col)
    for node, kind, fields in vouchers:
        posted = node.post_voucher(kind, fields)
        numbers.add_row(node.node_id, posted.number, kind)
    console.print(numbers)
    console.print(
        "  Each node numbers its own sub-series (node code in the number): no clash, "
        "no renumbering."
    )

    _step(console, "3. The link is back: exchange updates through files")
    state = save_state(saigon, files / "2-saigon.state", created_ms=_now_ms())
    _sent(console, "saigon writes its state", state)
    to_saigon = export_to_file(
        hanoi, files / "3-hanoi-to-saigon.blx", created_ms=_now_ms(), since_state=state.path
    )
    _sent(console, "hanoi exports what saigon lacks", to_saigon)
    state = save_state(hanoi, files / "4-hanoi.state", created_ms=_now_ms())
    _sent(console, "hanoi writes its state", state)
    to_hanoi = export_to_file(
        saigon, files / "5-saigon-to-hanoi.blx", created_ms=_now_ms(), since_state=state.path
    )
    _sent(console, "saigon exports what hanoi lacks", to_hanoi)
    for node, path in ((saigon, to_saigon.path), (hanoi, to_hanoi.path)):
        report = import_from_file(node, path).report
        console.print(
            f"  {node.node_id} imports {path.name}: {report.documents} documents changed, "
            f"{report.records} records updated"
        )
    again = import_from_file(hanoi, to_hanoi.path).report
    console.print(
        f"  hanoi imports {to_hanoi.path.name} a second time: {again.documents} documents "
        f"changed (imports are idempotent)"
    )
    assert again.documents == 0 and again.records == 0

    # A node of another company refuses the file instead of mixing the books.
    other = Node.create(workdir / "other", dataset="other-company", node="hq")
    try:
        import_from_file(other, to_hanoi.path)
    except DatasetMismatch as exc:
        console.print(Text(f"  a node of dataset 'other-company' refuses it: {exc}", "yellow"))
    else:
        raise AssertionError("a node of another dataset accepted the export file")
    finally:
        other.close()

    _step(console, "4. Converged records (as every node now lists them)")
    console.print(
        _records_table(hanoi, "customers", ["code", "name", "address"], "Customers"),
        _records_table(hanoi, "items", ["code", "name", "unit", "price"], "Items"),
        _records_table(
            hanoi,
            "sales_invoice",
            ["number", "date", "customer", "warehouse", "paid", "total"],
            "Sales invoices",
        ),
        _records_table(
            hanoi, "cash_receipt", ["number", "date", "customer", "amount"], "Cash receipts"
        ),
    )
    sp01 = hanoi.get("items", "SP01")
    assert sp01 is not None
    console.print(
        f"  SP01 was edited at both nodes in different fields; both edits survive: "
        f"price {_money(sp01['price'])} (hanoi), unit {sp01['unit']} (saigon)"
    )
    console.print(_conflicts_table(hanoi))
    for c in hanoi.conflicts():
        console.print(Text(f"  • {c['explanation']}"))

    _step(console, "5. Check: both nodes hold identical records and conflicts")
    left, right = snapshot(hanoi), snapshot(saigon)
    assert left == right, "the nodes did not converge"
    assert {c["kind"] for c in left["conflicts"]} == {"duplicate_key", "concurrent_edit"}
    count = sum(len(v) for v in left["records"].values())
    console.print(
        Text(
            f"✔ hanoi and saigon are identical: {count} records, "
            f"{len(left['conflicts'])} conflicts, in {time.perf_counter() - started:.2f} s",
            style="bold green",
        )
    )
    hanoi.close()
    saigon.close()
    return left


def main(argv: list[str] | None = None) -> int:
    """Run the demo in a temporary directory (or ``--keep DIR``); 0 when it converged."""
    parser = argparse.ArgumentParser(prog="python -m engine.demo", description=__doc__)
    parser.add_argument("--keep", type=Path, help="run in this new directory and keep it")
    args = parser.parse_args(argv)
    console = Console(highlight=False)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=False)
        run(args.keep, console)
        return 0
    with tempfile.TemporaryDirectory(prefix="branchline-demo-") as tmp:
        run(Path(tmp), console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
