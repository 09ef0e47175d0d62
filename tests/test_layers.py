"""Layering of the engine: SQLite only in the store modules, PostgreSQL only
in the PostgreSQL relay store, pycrdt only in engine/crdt (exceptions listed
with their reason), no import cycle, and the callers of ``Node`` use its
public interface (and the store's) only."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "engine"

#: Modules outside the store that import sqlite3, and why.
SQLITE_ELSEWHERE = {
    # Voucher numbering: its functions run SQL inside the caller's write
    # transaction (series tables); moving it into engine/store is a follow-up.
    "engine/series.py",
    # Conflict listing: reads the conflict index and the journal on the
    # node's connection (engine/store/conflict_index.py keeps the index).
    "engine/conflicts.py",
    # A user's read-only query on a connection of its own, with an authorizer
    # (and a scratch database to name the adapter owning a missing table).
    "engine/query.py",
}
#: Modules outside engine/crdt that import pycrdt, and why.
PYCRDT_ELSEWHERE = {
    # The relay stores keep the documents they serve as pycrdt Docs (one
    # cache and integration for every store backend).
    "engine/relay/doccache.py",
    # The store acceptance suite builds raw Yjs updates to offer a store.
    "engine/relay/testing.py",
}
#: Modules that must use Node's (and the store's) public interface only.
FACADE_USERS = ["resolution.py", "cli.py", "status.py", "sync/*.py", "server/*.py"]


def _module(path: Path) -> str:
    rel = path.relative_to(ENGINE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level: bool) -> set[str]:
    """Absolute names of what ``path`` imports (``from . import x`` names
    the submodule ``x`` when there is one). With ``top_level``, only what
    runs at import time: imports inside functions and ``TYPE_CHECKING``
    blocks are left out."""
    tree = ast.parse(path.read_text())
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    if top_level:
        nodes: list[ast.AST] = []
        for stmt in tree.body:
            if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
                continue
            if isinstance(stmt, ast.ClassDef):
                nodes.extend(n for n in stmt.body if isinstance(n, ast.Import | ast.ImportFrom))
            elif not isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                nodes.extend(ast.walk(stmt))
    else:
        nodes = list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            for alias in node.names:
                sub = f"{name}.{alias.name}"
                if (ENGINE.parent / sub.replace(".", "/")).with_suffix(".py").is_file() or (
                    ENGINE.parent / sub.replace(".", "/") / "__init__.py"
                ).is_file():
                    out.add(sub)
    return out


def _engine_files() -> list[Path]:
    return sorted(ENGINE.rglob("*.py"))


def _rel(path: Path) -> str:
    return str(path.relative_to(ENGINE.parent))


def _importers(top: str) -> set[str]:
    return {
        _rel(p) for p in _engine_files() if any(n.split(".")[0] == top for n in _imports(p, False))
    }


def test_sqlite3_is_imported_by_store_modules_only() -> None:
    importers = _importers("sqlite3")
    store = {
        r
        for r in importers
        if r.startswith("engine/store/")
        or (r.startswith("engine/relay/") and "store" in Path(r).name)
    }
    assert store, "the store modules import sqlite3"
    assert importers - store == SQLITE_ELSEWHERE


def test_psycopg_is_imported_by_the_postgresql_relay_store_only() -> None:
    assert _importers("psycopg") == {"engine/relay/pg_store.py"}


def test_pycrdt_is_imported_by_engine_crdt_only() -> None:
    importers = _importers("pycrdt")
    inside = {r for r in importers if r.startswith("engine/crdt/")}
    assert inside
    assert importers - inside == PYCRDT_ELSEWHERE


def test_the_node_side_has_no_import_cycle() -> None:
    """No cycle among the modules that run at import time (a package's
    ``__init__`` importing its own submodules is not a cycle)."""
    graph = {
        _module(p): {n for n in _imports(p, True) if n.startswith("engine")}
        for p in _engine_files()
    }
    for mod, deps in graph.items():
        graph[mod] = {d for d in deps if d in graph and d != mod and not mod.startswith(d + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(mod: str) -> None:
        state[mod] = 1
        stack.append(mod)
        for dep in sorted(graph[mod]):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep) :], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_callers_use_node_and_store_public_names_only() -> None:
    files = [p for pattern in FACADE_USERS for p in sorted(ENGINE.glob(pattern))]
    assert len(files) >= 8
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                private = [a.name for a in node.names if _private(a.name)]
                assert not private, f"{_rel(path)} imports {private} from {node.module}"
            if (
                isinstance(node, ast.Attribute)
                and _private(node.attr)
                and isinstance(node.value, ast.Name | ast.Attribute)
                and ast.unparse(node.value).split(".")[-1] in {"node", "n", "store", "w"}
            ):
                raise AssertionError(f"{_rel(path)}:{node.lineno} uses {ast.unparse(node)}")
