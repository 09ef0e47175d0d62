"""``make demo``: a branch-office day on a real relay and three live branch nodes.

Everything runs in a temporary directory on loopback, SQLite everywhere:

1. ``branchline relay init`` / ``relay enroll --json`` / ``relay serve`` (a real
   process, waited on through ``/healthz``); three branch homes of one dataset
   (HN, HCM, DN; built-in ``accounting`` schema) made with ``node init --relay
   --token`` and kept live by ``branchline node run`` processes; DN's by
   ``branchline node serve``, its branch server: the demo prints its URL and
   a token (``node users add``) so the sync screen can be watched while the
   day runs; ``--linger`` (``make demo KEEP=1``) leaves everything running
   after the checks until Ctrl-C.
2. Head office (HN) sets up the catalogs; they reach every branch.
3. The day: every branch books sales invoices (some unpaid), purchases, cash
   receipts and stock transfers into its own home while its ``node run``
   ships them. DN is cut off (``branchline node offline``) for part of the
   day and keeps booking: a customer code HCM creates too, an edit of a
   field HN edits at the same time, edits of and sales to a customer HN
   closes meanwhile, and a receipt number HCM also types by hand.
4. The link returns (``branchline node online``): DN catches up by itself,
   with progress per collection and timings.
5. Every conflict kind has arisen, identically at every node. HCM renumbers
   its clashing receipt by itself (policy ``on_duplicate = "renumber"``);
   the head office settles the rest with ``branchline resolve`` (rename,
   keep a side, reopen), which also clears the dangling references; the
   journal (``conflicts --resolved``) is the same everywhere.
6. Every node's books (stock on hand, receivables, voucher numbers) are
   computed from its own records and checked against the ``accounting``
   adapter's ``stock_on_hand`` SQL view; all three must be identical, records
   and journal included, with no conflict open. Every process is stopped
   cleanly.

Run with ``make demo`` (``make demo KEEP=1`` leaves everything running until
Ctrl-C), or ``python -m harness.demo [--keep DIR] [--seed N] [--linger]``
(``--keep DIR`` runs in a new directory DIR and leaves its files there).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from engine.node import Node
from engine.prefix import short_ids
from engine.transport import run_status
from harness.net import free_port as _free_port

DATASET = "branchline-trading"
DAY = "2024-05-06"
HQ, HCM, DN = "HN", "HCM", "DN"
BRANCHES = (HQ, HCM, DN)
SERVED = DN  # the branch whose branch server (node serve) the demo opens: the one cut off
WAREHOUSE = {HQ: "KHO-HN", HCM: "KHO-HCM", DN: "KHO-DN"}
TIMEOUT_S = 30.0  # generous bound for every wait on a condition

ACCOUNTS = [
    ("111", "Tiền mặt", "asset"),
    ("131", "Phải thu khách hàng", "asset"),
    ("156", "Hàng hóa", "asset"),
    ("331", "Phải trả người bán", "liability"),
    ("511", "Doanh thu bán hàng", "revenue"),
    ("3331", "Thuế GTGT đầu ra", "liability"),
    ("632", "Giá vốn hàng bán", "expense"),
]
CUSTOMERS = [
    ("KH001", "Công ty An Phát", "0101234567", "5 Lý Thường Kiệt, Hà Nội"),
    ("KH002", "Công ty Minh Long", "0309876543", "1 Hàng Bài, Hà Nội"),
    ("KH003", "Siêu thị Bình Minh", "0401112223", "88 Nguyễn Văn Linh, Đà Nẵng"),
    ("KH004", "Nhà sách Phương Nam", "0305556667", "120 Lê Lợi, TP.HCM"),
]
# A customer only DN sells to; head office closes it while DN is cut off.
LOCAL_CUSTOMER = ("KH009", "Quán cà phê Gió", "0401239999", "12 Bạch Đằng, Đà Nẵng")
# A pre-printed receipt book: DN and HCM both type its first number by hand.
TYPED_NUMBER = "PT-TAY-0001"
SUPPLIERS = [
    ("NCC01", "Văn phòng phẩm Thiên Long", "0302223334"),
    ("NCC02", "Giấy Bãi Bằng", "2600112233"),
]
ITEMS = [
    ("SP01", "Bút bi", "cây", Decimal(5000)),
    ("SP02", "Vở kẻ ngang", "quyển", Decimal(12000)),
    ("SP03", "Giấy A4", "ram", Decimal(65000)),
    ("SP04", "Bìa hồ sơ", "cái", Decimal(8000)),
]
BUY_DISCOUNT = Decimal("0.7")  # purchase price as a share of the list price


# -- small helpers -------------------------------------------------------------------


def _branchline() -> list[str]:
    script = Path(sys.executable).parent / "branchline"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from engine.cli import main; main()"]


def _money(value: Decimal) -> str:
    whole = value.to_integral_value()
    return f"{whole:,}" if value == whole else f"{value:,.2f}"


def _wait_for(what: str, predicate: Callable[[], bool], timeout: float = TIMEOUT_S) -> float:
    """Seconds until ``predicate()`` holds; AssertionError naming ``what`` after ``timeout``."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"demo: {what} did not happen within {timeout:.0f} s")
        time.sleep(0.02)


def _step(console: Console, title: str) -> None:
    console.print()
    console.rule(Text(title, style="bold cyan"), align="left")


@dataclass
class Branch:
    name: str
    home: Path
    node: Node
    token: str
    run: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    # Unpaid amounts (incl. VAT) this branch invoiced, per customer code.
    owed: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))

    @property
    def warehouse(self) -> str:
        return WAREHOUSE[self.name]

    def fresh(self) -> Node:
        """The node, caught up with what ``node run`` committed meanwhile."""
        self.node.refresh()
        return self.node


class Processes:
    """Every subprocess the demo starts; ``stop_all`` leaves none behind."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.cmd = _branchline()
        self.started: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [*self.cmd, *args], capture_output=True, text=True, timeout=60, check=False
        )
        if out.returncode != 0:
            raise AssertionError(f"branchline {' '.join(args[:2])} failed: {out.stderr.strip()}")
        return out.stdout

    def start(self, label: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{label}.log").open("wb")
        proc = subprocess.Popen(
            [*self.cmd, *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the demo alone; it stops them itself
        )
        self.started.append((label, proc, log))
        return proc

    def forget(self, proc: subprocess.Popen[bytes]) -> None:
        """Drop a process that already exited on its own (its log stays)."""
        for entry in list(self.started):
            if entry[1] is proc:
                proc.wait()
                entry[2].close()
                self.started.remove(entry)

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def stop_all(self) -> dict[str, int]:
        """SIGTERM every process still running (nodes first, the relay last) and wait."""
        codes: dict[str, int] = {}
        for label, proc, log in reversed(self.started):
            codes[label] = self.stop(proc)
            log.close()
        return codes

    def tail(self, label: str, lines: int = 8) -> str:
        path = self.workdir / f"{label}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# -- books from records --------------------------------------------------------------


def snapshot(node: Node) -> dict[str, Any]:
    """Everything a user can read from ``node``: records of every collection and conflicts."""
    return {
        "records": {name: node.list(name) for name in sorted(node.schema.collections)},
        "conflicts": node.conflicts(),
        "resolved": node.conflicts(resolved=True),
    }


def _invoice_total(lines: list[dict[str, Any]]) -> Decimal:
    return sum(
        (line["qty"] * line["price"] * (1 + (line.get("vat_rate") or 0)) for line in lines),
        Decimal(0),
    )


def books(node: Node) -> dict[str, Any]:
    """Stock on hand, receivables and voucher numbers, computed from ``node``'s records."""
    stock: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for p in node.list("purchase_invoice", codes=True):
        for line in p["lines"]:
            stock[line["item"], p["warehouse"]] += line["qty"]
    for s in node.list("sales_invoice", codes=True):
        for line in s["lines"]:
            stock[line["item"], s["warehouse"]] -= line["qty"]
    for t in node.list("stock_transfer", codes=True):
        for line in t["lines"]:
            stock[line["item"], t["from_warehouse"]] -= line["qty"]
            stock[line["item"], t["to_warehouse"]] += line["qty"]
    # Receivables per customer record (not per code: a duplicated code is two customers).
    invoiced: dict[str, Decimal] = defaultdict(Decimal)
    received: dict[str, Decimal] = defaultdict(Decimal)
    for s in node.list("sales_invoice"):
        if not s.get("paid"):
            invoiced[s["customer"]] += _invoice_total(s["lines"])
    for r in node.list("cash_receipt"):
        received[r["customer"]] += r["amount"]
    receivables = {
        cid: (invoiced[cid], received[cid], invoiced[cid] - received[cid])
        for cid in sorted(set(invoiced) | set(received))
    }
    numbers = {
        coll.name: sorted(r["number"] for r in node.list(coll.name))
        for coll in node.schema.collections.values()
        if coll.kind == "voucher"
    }
    return {"stock": dict(sorted(stock.items())), "receivables": receivables, "numbers": numbers}


def _describe(node: Node, c: dict[str, Any]) -> tuple[str, list[str]]:
    """Where a conflict is and its competing values, in a user's words (codes, names)."""
    coll = c["collection"]
    if c["kind"] == "duplicate_key":
        names = {r["id"]: r.get("name", r["id"]) for r in node.list(coll)}
        return (
            f"{coll}.{c['field']} = {c['key']}",
            [f"{v['node']}: {names.get(v['value'], v['value'])}" for v in c["values"]],
        )
    rows = node.store.conn.execute(
        "SELECT key FROM records WHERE collection = ? AND id = ?", (coll, c["records"][0])
    ).fetchone()
    label = f"{coll} {rows[0] if rows else c['records'][0]}.{c['field']}"
    if c["kind"] == "dangling_reference":
        target = c["target"]
        return label, [f"→ {target['collection']} {target['id'][-6:]} ({target['state']})"]
    if c["kind"] == "edit_delete":
        values = [f"{c['values'][0]['node']}: deleted"]
        values += [f"{v['node']}: edited {_show_edit(v['value'])}" for v in c["values"][1:]]
        return label, values
    return label, [f"{v['node']}: {v['value']}" for v in c["values"]]


def _show_edit(value: Any) -> str:
    return (
        ", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else str(value)
    )


def _identical(branches: list[Branch]) -> bool:
    first, *rest = (snapshot(b.fresh()) for b in branches)
    return all(first == other for other in rest)


# -- the scenario --------------------------------------------------------------------


class Day:
    def __init__(self, workdir: Path, console: Console, seed: int) -> None:
        self.workdir = workdir
        self.console = console
        self.rng = random.Random(seed)
        self.procs = Processes(workdir)
        self.branches: dict[str, Branch] = {}
        self.url = ""
        self.relay: subprocess.Popen[bytes] | None = None
        self.served_url = ""
        self.served_token = ""
        self.figures: list[tuple[str, str]] = []

    # 1. relay and branch nodes ------------------------------------------------------

    def start_relay(self) -> None:
        store = self.workdir / "relay.db"
        self.procs.cli("relay", "init", str(store))
        tokens = {
            b: json.loads(self.procs.cli("relay", "enroll", str(store), DATASET, b, "--json"))[
                "token"
            ]
            for b in BRANCHES
        }
        self.relay, self.url = self._listening(
            "relay", lambda port: ("relay", "serve", str(store), "--port", str(port))
        )
        ws = self.url.replace("http://", "ws://") + "/"
        for b in BRANCHES:
            home = self.workdir / b
            self.procs.cli(
                "node", "init", "--home", str(home), "--dataset", DATASET, "--node", b,
                "--relay", ws, "--token", tokens[b],
            )  # fmt: skip
            # The accounting adapter keeps SQL books next to the records.
            self.procs.cli("adapters", "enable", "--home", str(home), "accounting")
            self.branches[b] = Branch(b, home, Node.open(home, dataset=DATASET), tokens[b])
        for branch in self.branches.values():
            if branch.name == SERVED:
                continue
            branch.run = self.procs.start(
                f"node-{branch.name}", "node", "run", "--home", str(branch.home),
                "--backoff-max", "1",
            )  # fmt: skip
        self.serve_branch(self.branches[SERVED])
        took = _wait_for("every branch online", lambda: all(self._online(b) for b in BRANCHES))
        self.console.print(
            f"  relay [bold]{ws}[/] (healthz ok, store relay.db); "
            f"nodes {', '.join(BRANCHES)} enrolled, homes made, [bold]node run[/] "
            f"({SERVED}: [bold]node serve[/]) online after {took:.2f} s"
        )
        self.console.print(
            Panel(
                Text.assemble(
                    (f"{SERVED}'s branch server (the sync screen and its JSON API): ", ""),
                    (self.served_url + "/", "bold"),
                    "\nsign in with the token ",
                    (self.served_token, "bold"),
                    " (user 'demo'; shown once, valid while the demo runs)",
                ),
                title="Look while the demo runs",
            )
        )

    def _listening(
        self, label: str, args: Callable[[int], tuple[str, ...]]
    ) -> tuple[subprocess.Popen[bytes], str]:
        """Start a server process on a free loopback port and wait for its
        /healthz; another port when it exits first (the port was taken)."""
        for attempt in range(3):
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            proc = self.procs.start(f"{label}-{attempt}", *args(port))
            started = time.monotonic()
            while proc.poll() is None and not _healthy(url):
                if time.monotonic() - started > TIMEOUT_S:
                    raise AssertionError(f"demo: {label} did not answer /healthz")
                time.sleep(0.05)
            if proc.poll() is None:
                return proc, url
            self.procs.forget(proc)  # exited (port taken): try another port
        raise AssertionError(f"demo: {label} did not start:\n{self.procs.tail(f'{label}-2')}")

    def serve_branch(self, branch: Branch) -> None:
        """``node serve`` for ``branch`` (its sync loop too) with a user for the screen."""
        added = self.procs.cli("node", "users", "add", "--home", str(branch.home), "demo", "--json")
        self.served_token = json.loads(added)["token"]
        branch.run, self.served_url = self._listening(
            f"serve-{branch.name}",
            lambda port: (
                "node", "serve", "--home", str(branch.home), "--listen", f"127.0.0.1:{port}",
            ),
        )  # fmt: skip
        # The screen is there and the API answers the token as this branch.
        with urllib.request.urlopen(self.served_url + "/", timeout=10) as resp:
            page = resp.read().decode("utf-8")
        assert "<title>Branchline" in page, "demo: the branch server does not serve its page"
        status = self.served_api("/status")
        assert status["node"] == branch.name, f"demo: the branch server answers as {status['node']}"

    def served_api(self, path: str) -> Any:
        req = urllib.request.Request(
            f"{self.served_url}/api/v1{path}",
            headers={"Authorization": f"Bearer {self.served_token}"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def _online(self, name: str) -> bool:
        status = run_status(self.branches[name].node, time.time_ns() // 1_000_000)
        return bool(status["online"])

    def status_json(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(
            self.procs.cli("status", "--home", str(self.branches[name].home), "--json")
        )
        return out

    # 2. catalogs --------------------------------------------------------------------

    def catalogs(self) -> None:
        hq = self.branches[HQ].fresh()
        for code, name, kind in ACCOUNTS:
            hq.put("accounts", {"code": code, "name": name, "kind": kind})
        for code, name, tax, address in [*CUSTOMERS, LOCAL_CUSTOMER]:
            hq.put("customers", {"code": code, "name": name, "tax_code": tax, "address": address})
        for code, name, tax in SUPPLIERS:
            hq.put("suppliers", {"code": code, "name": name, "tax_code": tax})
        for code, name, unit, price in ITEMS:
            hq.put("items", {"code": code, "name": name, "unit": unit, "price": str(price)})
        for b, code in WAREHOUSE.items():
            hq.put("warehouses", {"code": code, "name": f"Kho chi nhánh {b}"})
        want = {
            c: hq.count(c) for c in ("accounts", "customers", "suppliers", "items", "warehouses")
        }
        took = _wait_for(
            "catalogs reaching every branch",
            lambda: all(
                self.branches[b].fresh().count(c) == n for b in BRANCHES for c, n in want.items()
            ),
        )
        counts = ", ".join(f"{n} {c}" for c, n in want.items())
        self.console.print(f"  HN (head office) creates {counts}")
        self.console.print(f"  on HCM and DN {took:.2f} s later, shipped live by [bold]node run[/]")

    # 3. the day ---------------------------------------------------------------------

    def _lines(self, with_price: bool, vat: bool) -> list[dict[str, Any]]:
        picked = self.rng.sample(ITEMS, self.rng.randint(1, 3))
        lines = []
        for code, _name, _unit, price in picked:
            line: dict[str, Any] = {"item": code, "qty": str(self.rng.randint(1, 6))}
            if with_price:
                line["price"] = str(price if vat else price * BUY_DISCOUNT)
            if vat:
                line["vat_rate"] = self.rng.choice(("0.1", "0.1", "0.08"))
            lines.append(line)
        return lines

    def purchase(self, branch: Branch) -> str:
        lines = [
            {"item": code, "qty": str(self.rng.randint(60, 90)), "price": str(price * BUY_DISCOUNT)}
            for code, _name, _unit, price in ITEMS
        ]
        fields = {
            "date": DAY,
            "supplier": self.rng.choice(SUPPLIERS)[0],
            "warehouse": branch.warehouse,
        }
        return branch.fresh().post_voucher("purchase_invoice", {**fields, "lines": lines}).number

    def sale(self, branch: Branch, customer: str, paid: bool | None = None) -> str:
        paid = self.rng.random() < 0.5 if paid is None else paid
        lines = self._lines(with_price=True, vat=True)
        fields = {"date": DAY, "customer": customer, "warehouse": branch.warehouse, "paid": paid}
        posted = branch.fresh().post_voucher("sales_invoice", {**fields, "lines": lines})
        if not paid:
            branch.owed[customer] += _invoice_total(
                [{k: Decimal(v) if k != "item" else v for k, v in ln.items()} for ln in lines]
            )
        return posted.number

    def receipt(self, branch: Branch) -> str | None:
        owing = sorted(c for c, v in branch.owed.items() if v > 0)
        if not owing:
            return None
        customer = self.rng.choice(owing)
        amount = (branch.owed[customer] * Decimal(self.rng.choice((1, 1, "0.5")))).quantize(1)
        branch.owed[customer] -= amount
        fields = {"date": DAY, "customer": customer, "amount": str(amount)}
        return branch.fresh().post_voucher("cash_receipt", fields).number

    def transfer(self, branch: Branch, to: str) -> str:
        lines = self._lines(with_price=False, vat=False)
        for line in lines:
            line["qty"] = str(int(line["qty"]) * 3)
        fields = {"date": DAY, "from_warehouse": branch.warehouse, "to_warehouse": WAREHOUSE[to]}
        return branch.fresh().post_voucher("stock_transfer", {**fields, "lines": lines}).number

    def book_round(self, names: tuple[str, ...], customers: list[str], i: int) -> list[str]:
        booked = []
        for name in names:
            branch = self.branches[name]
            booked.append(self.sale(branch, self.rng.choice(customers)))
            if i % 2 == 1 and (number := self.receipt(branch)):
                booked.append(number)
            if i % 4 == 3:
                others = [b for b in BRANCHES if b != name]
                booked.append(self.transfer(branch, others[(i // 4) % 2]))
        return booked

    def morning(self) -> None:
        codes = [c[0] for c in CUSTOMERS]
        booked = [self.purchase(self.branches[b]) for b in BRANCHES]
        for i in range(6):
            booked += self.book_round(BRANCHES, codes, i)
        took = _wait_for(
            "the morning reaching every node", lambda: _identical(list(self.branches.values()))
        )
        self.console.print(
            f"  opening purchases {', '.join(booked[:3])}, then {len(booked) - 3} sales, receipts "
            f"and transfers at the three tills; all three nodes identical {took:.2f} s after the "
            "last one"
        )

    def cut_off(self) -> None:
        dn, hcm, hq = self.branches[DN], self.branches[HCM], self.branches[HQ]
        self.procs.cli("node", "offline", "--home", str(dn.home))
        took = _wait_for("DN dropping its link", lambda: not self._online(DN))
        self.console.print(
            f"  [yellow]branchline node offline --home DN[/]: DN's node run drops the link "
            f"({took:.2f} s)"
        )
        codes = [c[0] for c in CUSTOMERS]
        # The same new customer code at two branches: two real customers, one code.
        dn.fresh().put(
            "customers", {"code": "KH005", "name": "Cửa hàng Hoa Mai", "address": "Đà Nẵng"}
        )
        hcm.fresh().put(
            "customers", {"code": "KH005", "name": "Công ty Sao Việt", "address": "TP.HCM"}
        )
        # One field edited at two branches at the same time: a concurrent edit.
        dn.fresh().put("customers", {"code": "KH003", "address": "200 Bạch Đằng, Đà Nẵng"})
        hq.fresh().put("customers", {"code": "KH003", "address": "15 Trần Phú, Đà Nẵng"})
        # Head office closes a customer DN is still serving: edit vs delete, and
        # DN's invoice then refers to a deleted customer.
        dn.fresh().put("customers", {"code": LOCAL_CUSTOMER[0], "address": "14 Bạch Đằng"})
        hq.fresh().delete("customers", LOCAL_CUSTOMER[0])
        self.purchase(dn)
        self.sale(dn, "KH005", paid=False)  # DN's own KH005, the only one it knows
        self.sale(hcm, "KH005", paid=False)
        self.sale(dn, LOCAL_CUSTOMER[0], paid=False)
        # The same hand-typed receipt number at two branches (DN's first).
        for branch in (dn, hcm):
            fields = {"date": DAY, "customer": "KH001", "amount": "100000"}
            branch.fresh().post_voucher("cash_receipt", {**fields, "number": TYPED_NUMBER})
        for i in range(10):
            self.book_round(BRANCHES, codes, i)
        self.receipt(dn)
        online = [self.branches[HQ], self.branches[HCM]]
        took = _wait_for("HN and HCM staying in step", lambda: _identical(online))
        self.console.print(
            "  meanwhile every branch keeps booking; HN and HCM stay in step "
            f"(identical {took:.2f} s after their last voucher)"
        )
        self.console.print(
            "  DN and HCM both create customer [bold]KH005[/] (Hoa Mai / Sao Việt); DN and HN "
            f"both change KH003's address; HN closes {LOCAL_CUSTOMER[0]} while DN edits it "
            f"and sells to it; DN and HCM both type receipt number {TYPED_NUMBER}"
        )
        own = books(dn.fresh())["stock"]
        on_hand = ", ".join(f"{code} {own.get((code, dn.warehouse), 0)}" for code, *_ in ITEMS)
        self.console.print(
            f"  DN, cut off, still shows stock on hand in {dn.warehouse} as of its last sync "
            f"plus its own work: {on_hand}"
        )
        status = self.status_json(DN)
        table = Table(title="branchline status --home DN (while cut off)", title_justify="left")
        table.add_column("field")
        table.add_column("value")
        table.add_row("online / state", f"{status['online']} / {status['state']}")
        pending = {c: n for c, n in status["pending"].items() if n}
        table.add_row("pending", "\n".join(f"{c}: {n}" for c, n in pending.items()))
        table.add_row("conflicts", str(status["conflicts"]))
        self.console.print(table)
        assert status["online"] is False and pending, "DN should have pending local work"

    def restore(self) -> None:
        dn = self.branches[DN]
        hq = self.branches[HQ].fresh()
        up_total = {c: n for c, n in dn.fresh().pending().items() if n}
        missing = {
            c: {r["id"] for r in hq.list(c)} - {r["id"] for r in dn.node.list(c)}
            for c in sorted(hq.schema.collections)
        }
        down_total = {c: ids for c, ids in missing.items() if ids}
        self.procs.cli("node", "online", "--home", str(dn.home))
        restored = time.monotonic()
        marks: dict[str, float] = {}
        progress = Progress(
            TextColumn("{task.description:<30}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=self.console,
            transient=False,
        )
        up = {c: progress.add_task(f"DN → relay  {c}", total=n) for c, n in up_total.items()}
        down = {
            c: progress.add_task(f"relay → DN  {c}", total=len(ids))
            for c, ids in down_total.items()
        }
        branches = list(self.branches.values())
        with progress:
            while True:
                now = time.monotonic() - restored
                node = dn.fresh()
                pending = node.pending()
                for c, task in up.items():
                    progress.update(task, completed=up_total[c] - pending.get(c, 0))
                got = 0
                for c, task in down.items():
                    have = {r["id"] for r in node.list(c)} & down_total[c]
                    got += len(have)
                    progress.update(task, completed=len(have))
                if "online" not in marks and self._online(DN):
                    marks["online"] = now
                if "first" not in marks and got:
                    marks["first"] = now
                if "outbox" not in marks and not any(pending.values()):
                    marks["outbox"] = now
                if (
                    "outbox" in marks
                    and got == sum(len(v) for v in down_total.values())
                    and _identical(branches)
                ):
                    marks["identical"] = time.monotonic() - restored
                    break
                if now > TIMEOUT_S:
                    raise AssertionError(f"demo: DN did not catch up within {TIMEOUT_S:.0f} s")
                time.sleep(0.05)
        self.figures += [
            ("link restored → DN online again", f"{marks.get('online', marks['identical']):.2f} s"),
            (
                "link restored → first HN/HCM record on DN",
                f"{marks.get('first', marks['identical']):.2f} s",
            ),
            ("link restored → DN's outbox empty (acked)", f"{marks['outbox']:.2f} s"),
            ("link restored → all three nodes identical", f"{marks['identical']:.2f} s"),
        ]
        status = self.status_json(DN)
        assert status["online"] and not any(status["pending"].values())
        self.console.print(
            f"  branchline status --home DN --json now: online {status['online']}, pending "
            f"{sum(status['pending'].values())}, conflicts {status['conflicts']}, failures "
            f"{status['failures']}"
        )
        self.console.print(
            f"  [green]branchline node online --home DN[/]: DN catches up by itself, "
            f"all three nodes identical [bold]{marks['identical']:.2f} s[/] after the link returned"
        )

    # 4. the conflicts ---------------------------------------------------------------

    def settle_conflicts(self) -> None:
        branches = list(self.branches.values())
        hq = self.branches[HQ]
        # HCM's typed receipt came second, so HCM (and only HCM) renumbers it.
        took = _wait_for(
            "the clashing receipt number being renumbered everywhere",
            lambda: (
                all(b.fresh().conflicts(resolved=True) for b in branches) and _identical(branches)
            ),
        )
        node = hq.fresh()
        conflicts = node.conflicts()
        kinds = sorted({c["kind"] for c in conflicts})
        expected = ["concurrent_edit", "dangling_reference", "duplicate_key", "edit_delete"]
        assert kinds == expected, f"unexpected conflicts {kinds}"  # dangling: one per voucher
        table = Table(title="Conflicts that arose (identical at every node)", title_justify="left")
        for col in ("kind", "where", "competing values (in force first)"):
            table.add_column(col)
        for c in conflicts:
            where, values = _describe(node, c)
            marked = [("✔ " if i == 0 else "  ") + v for i, v in enumerate(values)]
            table.add_row(Text(c["kind"]), Text(where), Text("\n".join(marked)))
        self.console.print(table)
        for c in conflicts:
            self.console.print(Text(f"  • {c['explanation']}"))
        # The head office accountant settles the rest by hand.
        choices = {
            "duplicate_key": ("--rename", "KH006"),  # two real customers: give one a new code
            "concurrent_edit": ("--keep", DN),  # the branch knows the new address
            "edit_delete": ("--keep", "edit"),  # DN still serves it: reopen the customer
        }
        # The ids as 'branchline conflicts' shows them: unique prefixes, which
        # resolve takes like whole ids.
        shown = short_ids(c["id"] for c in conflicts)
        for c in conflicts:
            if c["kind"] in choices:
                short = shown[c["id"]]
                self.procs.cli("resolve", "--home", str(hq.home), short, *choices[c["kind"]])
                self.console.print(
                    f"  [cyan]branchline resolve --home HN {short} "
                    f"{' '.join(choices[c['kind']])}[/]  ({c['kind']})"
                )
        settled = _wait_for(
            "the resolutions reaching every node",
            lambda: _identical(branches) and not hq.fresh().conflicts(),
        )
        journal = Table(
            title="branchline conflicts --resolved (the journal, identical at every node)",
            title_justify="left",
        )
        for col in ("node", "kind", "action", "old → new", "how"):
            journal.add_column(col)
        entries = hq.fresh().conflicts(resolved=True)
        for e in entries:
            journal.add_row(
                e["node"],
                e["kind"],
                e["action"],
                Text(f"{e['old']} → {e['new']}"),
                "automatic" if e["auto"] else "by hand",
            )
        self.console.print(journal)
        self.console.print(
            "  the dangling reference needed no choice of its own: reopening the customer "
            f"resolved it; no conflict is left at any node ({settled:.2f} s after the last "
            "choice)"
        )
        self.figures.append(
            ("clash renumbered automatically (after the link returned)", f"{took:.2f} s")
        )

    # 5. the books -------------------------------------------------------------------

    def show_books(self) -> None:
        branches = list(self.branches.values())
        node = branches[0].fresh()
        every = {b.name: books(b.fresh()) for b in branches}
        snaps = {b.name: snapshot(b.node) for b in branches}
        first = every[HQ]
        for name in BRANCHES[1:]:
            assert every[name] == first, f"the books of {name} differ from HN's"
            assert snaps[name] == snaps[HQ], f"the records or conflicts of {name} differ from HN's"

        stock = Table(
            title="Stock on hand (purchases in, sales out, transfers between)", title_justify="left"
        )
        stock.add_column("item")
        for wh in WAREHOUSE.values():
            stock.add_column(wh, justify="right")
        stock.add_column("total", justify="right")
        for code, name, unit, _price in ITEMS:
            qty = [first["stock"].get((code, wh), Decimal(0)) for wh in WAREHOUSE.values()]
            stock.add_row(
                f"{code} {name} ({unit})", *(_money(q) for q in qty), _money(sum(qty, Decimal(0)))
            )
        customers = {r["id"]: r for r in node.list("customers")}
        # The same stock, as the accounting adapter's SQL view has it on each node.
        for b in branches:
            rows = b.fresh().query("SELECT item, warehouse, qty FROM stock_on_hand").rows
            view = {(item, wh): Decimal(qty) for item, wh, qty in rows if Decimal(qty)}
            mine = {k: v for k, v in first["stock"].items() if v}
            assert view == mine, f"{b.name}'s stock_on_hand view differs from its records"
        self.console.print(
            "  every node's [bold]stock_on_hand[/] SQL view (accounting adapter, "
            "[cyan]branchline query[/]) gives the same figures"
        )
        recv = Table(
            title="Receivables per customer (unpaid invoices incl. VAT − cash receipts)",
            title_justify="left",
        )
        for col in ("customer", "invoiced", "received", "balance"):
            recv.add_column(col, justify="left" if col == "customer" else "right")
        total = Decimal(0)
        for cid, (inv, rec, bal) in first["receivables"].items():
            cust = customers[cid]
            label = f"{cust['code']} {cust['name']}"
            recv.add_row(Text(label), _money(inv), _money(rec), _money(bal))
            total += bal
        recv.add_row(Text("total", style="bold"), "", "", Text(_money(total), style="bold"))
        self.console.print(stock, recv)

        numbers = Table(
            title="Voucher numbers (each node numbers its own series)", title_justify="left"
        )
        numbers.add_column("book")
        numbers.add_column("count", justify="right")
        numbers.add_column("ranges")
        everything: list[str] = []
        for coll, nums in first["numbers"].items():
            if not nums:
                continue
            everything += nums
            by_prefix: dict[str, list[str]] = defaultdict(list)
            for n in nums:
                by_prefix[n.rsplit("-", 1)[0]].append(n)
            ranges = "  ".join(
                v[0] if len(v) == 1 else f"{v[0]}…{v[-1].rsplit('-', 1)[1]}"
                for v in by_prefix.values()
            )
            numbers.add_row(coll, str(len(nums)), Text(ranges))
        self.console.print(numbers)
        assert len(everything) == len(set(everything)), "two vouchers share a number"
        renumbered = [e for e in node.conflicts(resolved=True) if e["action"] == "renumber"]
        self.console.print(
            f"  {len(everything)} vouchers, {len(set(everything))} distinct numbers "
            f"({len(renumbered)} typed-in clash renumbered)"
        )

        assert node.conflicts() == [], "a conflict is left open"
        count = sum(len(v) for v in snaps[HQ]["records"].values())
        self.figures.insert(0, ("records at every node", str(count)))
        metrics = _metrics(self.url)
        self.figures.append(
            (
                "relay: updates stored / duplicates / fanned out",
                " / ".join(
                    f"{metrics.get(name, 0):.0f}"
                    for name in (
                        'branchline_relay_updates_in_total{result="stored"}',
                        'branchline_relay_updates_in_total{result="duplicate"}',
                        "branchline_relay_updates_fanned_out_total",
                    )
                ),
            )
        )
        self.console.print(
            Text(
                f"✔ HN, HCM and DN are identical: {count} records, the same stock, receivables "
                "and voucher numbers, no open conflict",
                style="bold green",
            )
        )

    def linger(self) -> None:
        """Keep everything running until Ctrl-C, for a look at the screen; then stop as usual."""
        self.console.print(
            Text.assemble(
                f"  {SERVED}'s branch server stays up at ",
                (self.served_url + "/", "bold"),
                " (token ",
                (self.served_token, "bold"),
                "); press Ctrl-C to stop everything",
            )
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            self.console.print("  Ctrl-C: stopping")

    # 5. the end ---------------------------------------------------------------------

    def shut_down(self) -> None:
        for branch in self.branches.values():
            branch.node.close()
        codes = self.procs.stop_all()
        bad = {label: code for label, code in codes.items() if code != 0}
        assert not bad, f"processes did not stop cleanly (exit codes): {bad}"
        self.console.print(
            f"  SIGTERM to {len(codes)} processes ({', '.join(sorted(codes))}): all exited 0"
        )


@contextmanager
def _day(workdir: Path, console: Console, seed: int) -> Iterator[Day]:
    day = Day(workdir, console, seed)
    try:
        yield day
    finally:
        # Runs on success and on error: no process survives the demo.
        for branch in day.branches.values():
            branch.node.close()
        day.procs.stop_all()


def run(workdir: Path, console: Console, seed: int = 2024, linger: bool = False) -> None:
    """Play the branch-office day in ``workdir``. Raises AssertionError when something
    does not hold (the nodes differ, a wait times out, a process fails)."""
    started = time.perf_counter()
    console.print(
        Panel(
            Text(
                f"Dataset '{DATASET}': a relay and three branch servers HN (head office), HCM "
                f"and DN, live over loopback websockets.\nEverything (relay store, node homes, "
                f"logs) lives in {workdir}"
            ),
            title="Branchline demo: a branch-office day",
        )
    )
    with _day(workdir, console, seed) as day:
        try:
            _step(console, "1. Relay and branch nodes (real processes)")
            day.start_relay()
            _step(console, "2. Head office sets up the catalogs")
            day.catalogs()
            _step(console, "3. Morning: every branch books, every node sees everything")
            day.morning()
            _step(console, "4. Midday: DN's link is cut; everyone keeps booking")
            day.cut_off()
            _step(console, "5. The link returns: DN catches up by itself")
            day.restore()
            _step(console, "6. Conflicts: what arose, and how each was settled")
            day.settle_conflicts()
            _step(console, "7. Closing: the books as every node computes them")
            day.show_books()
            if linger:
                day.linger()
            _step(console, "8. Stopping")
            day.shut_down()
        except Exception:
            for label, _proc, _log in day.procs.started:
                tail = day.procs.tail(label)
                if tail:
                    console.print(Panel(Text(tail), title=f"{label}.log (last lines)"))
            raise
    figures = Table(title="Figures", title_justify="left", show_header=False)
    figures.add_column()
    figures.add_column(justify="right")
    for name, value in day.figures:
        figures.add_row(name, value)
    figures.add_row("whole demo", f"{time.perf_counter() - started:.1f} s")
    console.print()
    console.print(figures)
    console.print(
        Text("✔ every node shows identical books; everything stopped cleanly", style="bold green")
    )


def main(argv: list[str] | None = None) -> int:
    """Run the demo in a temporary directory (or ``--keep DIR``); 0 when the day held."""
    parser = argparse.ArgumentParser(prog="python -m harness.demo", description=__doc__)
    parser.add_argument("--keep", type=Path, help="run in this new directory and keep it")
    parser.add_argument("--seed", type=int, default=2024, help="seed of the day's bookings")
    parser.add_argument(
        "--linger",
        action="store_true",
        help="after the checks, leave the relay, the nodes and the branch server running "
        "until Ctrl-C (make demo KEEP=1)",
    )
    args = parser.parse_args(argv)
    console = Console(highlight=False)
    os.environ.pop("BRANCHLINE_HOME", None)  # every command names its --home
    # SIGTERM unwinds like Ctrl-C does, so the finally blocks stop every process.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(128 + signal.SIGTERM))
    try:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=False)
            run(args.keep, console, args.seed, args.linger)
        else:
            with tempfile.TemporaryDirectory(prefix="branchline-demo-") as tmp:
                run(Path(tmp), console, args.seed, args.linger)
    except AssertionError as exc:
        console.print(Text(f"✘ the demo failed: {exc}", style="bold red"))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
