"""Bulk apply with adapters enabled: ``Node.import_updates`` of received
sales invoices (3 lines each) into a node with no adapter, with
``accounting`` and with ``mirror``; CPU and wall time of the import, median
of the repeats (fresh node each). The adapters are fed the materializer's
changes in the import's transaction, so this is the path that reading the
written records back used to slow down (issue 17).

    python -m bench.apply_adapters [--vouchers 5000] [--repeats 3]

Prints one line; compare commits by running it on each in the same minute.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

from engine.node import Node

from .adapters import build_vouchers, catalogs

SETUPS: list[list[str]] = [[], ["accounting"], ["mirror"]]


def measure(tmp: Path, vouchers: int, repeats: int, adapters: list[str]) -> tuple[float, float]:
    """(CPU s, wall s) of the import, medians over ``repeats`` fresh nodes."""
    cpu, wall = [], []
    for r in range(repeats):
        home = tmp / f"{'+'.join(adapters) or 'none'}-{r}"
        node = Node.create(home, dataset="bench", node="books", adapters=adapters)
        try:
            updates = build_vouchers(vouchers, catalogs(node), 7 + r)
            gc.collect()
            c0, w0 = time.process_time(), time.perf_counter()
            node.import_updates(updates)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
            assert node.count("sales_invoice") == vouchers
        finally:
            node.close()
    return statistics.median(cpu), statistics.median(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vouchers", type=int, default=5_000)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        found = {
            "+".join(a) or "none": measure(Path(tmp), opts.vouchers, opts.repeats, a)
            for a in SETUPS
        }
    print(
        f"import {opts.vouchers:,} vouchers, median of {opts.repeats} (CPU s / wall s): "
        + ", ".join(f"{name} {c:.2f}/{w:.2f}" for name, (c, w) in found.items())
    )


if __name__ == "__main__":
    main()
