"""The harness (simulator, soak, fault proxy, demo) sits above the runtime:
no module of ``engine`` or ``adapters`` imports ``harness``, so a branch
server or a relay never loads test machinery."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_runtime_modules_never_import_the_harness() -> None:
    offenders = sorted(
        f"{path.relative_to(ROOT)}: {name}"
        for part in ("engine", "adapters")
        for path in (ROOT / part).rglob("*.py")
        for name in imported(path)
        if name == "harness" or name.startswith("harness.")
    )
    assert offenders == []


def test_the_harness_is_where_the_docs_say() -> None:
    for module in ("sim", "soak", "faults", "demo.py"):
        assert (ROOT / "harness" / module).exists(), module
    assert not (ROOT / "engine" / "sim").exists() and not (ROOT / "engine" / "demo.py").exists()
