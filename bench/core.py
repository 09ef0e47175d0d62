"""Core benchmarks against the targets of issue 2 (DESIGN §10).

    python -m bench.core            # full: 100,000 records, a minute or two
    python -m bench.core --quick    # 10,000 records, well under a minute

1. Local durable write: ``Node.put`` of a 10-field record into a node that
   already holds records (inserts, then updates), p50/p99, next to the fsync
   floor of the same filesystem measured in the same process.
2. Apply 100,000 records received from another replica into a fresh node:
   ``import_sliced`` (what a sync does with a received update) until
   ``count()`` is 100,000, in a fresh process per
   repeat, with its peak RSS.
3. RSS of a node process holding those 100,000 records after opening and
   one put into their document.

Each task runs in its own process (``bench.workers``). Results go to
``bench/results/core.json`` (``core-quick.json`` with ``--quick``) and a full
run regenerates the "Core" section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from .report import Target, update_docs
from .stats import ROOT, load_facts, machine_facts, run_facts, spread
from .workload import COLLECTION, FIELD_COUNT, write_schema

RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
WORKER_TIMEOUT_S = 900
SEED = 20260101
PUT_BLOCKS = 10  # puts and fsync-floor rounds alternate in this many blocks


@dataclass(frozen=True)
class Sizes:
    prefill: int  # records the node holds before the timed puts
    warmup: int  # puts (and fsync rounds) before timing starts
    inserts: int
    updates: int
    floor_rounds: int
    records: int  # records applied and held
    repeats: int  # processes for apply and hold
    fidelity_records: int
    big_puts: int  # puts into the held document after its RSS is measured (last run)


FULL = Sizes(10_000, 100, 5_000, 2_000, 2_000, 100_000, 3, 300, 1_200)
QUICK = Sizes(2_000, 50, 1_000, 500, 500, 10_000, 3, 100, 1_200)
TARGET_RECORDS = 100_000  # the size the apply and RSS targets are stated for


def run_worker(task: str, args: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.workers", task, orjson.dumps(args).decode()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"benchmark task {task!r} failed (exit {done.returncode})")
    result: dict[str, Any] = orjson.loads(done.stdout.strip().splitlines()[-1])
    return result


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def bench_put(tmp: Path, sizes: Sizes) -> dict[str, Any]:
    say(
        f"[put] {sizes.inserts} inserts + {sizes.updates} updates into a node "
        f"holding {sizes.prefill} records; fsync floor {sizes.floor_rounds} rounds"
    )
    runs = []
    for i in range(sizes.repeats):
        say(f"[put] run {i + 1}/{sizes.repeats}")
        directory = tmp / f"put-{i}"
        directory.mkdir()
        runs.append(
            run_worker(
                "put",
                {
                    "dir": str(directory),
                    "prefill": sizes.prefill,
                    "warmup": sizes.warmup,
                    "inserts": sizes.inserts,
                    "updates": sizes.updates,
                    "floor_rounds": sizes.floor_rounds,
                    "blocks": PUT_BLOCKS,
                    "seed": SEED + i,
                },
            )
        )
        shutil.rmtree(directory)
    floor = [r["fsync_floor"] for r in runs]
    over_runs = {
        f"{kind}_{q}_ms": spread([r[kind][f"{q}_ms"] for r in runs])
        for kind in ("insert", "update", "insert_cpu", "update_cpu")
        for q in ("p50", "p99")
    }
    over_runs |= {
        f"{probe}_{q}_ms": spread([f[probe][f"{q}_ms"] for f in floor])
        for probe in ("file_write_fsync", "sqlite_wal_full_commit")
        for q in ("p50", "p99")
    }
    # The run whose insert p50 is the median one, shown in full.
    median_run = sorted(runs, key=lambda r: r["insert"]["p50_ms"])[len(runs) // 2]
    return {
        "workload": (
            f"Node.put of a {FIELD_COUNT}-field '{COLLECTION}' record (6 text incl. Vietnamese, "
            "decimal, int, bool, date), each put its own durable SQLite transaction "
            f"(WAL, synchronous=FULL). The node first imports {sizes.prefill:,} records from a "
            f"peer and makes {sizes.warmup} untimed puts. Timed: {sizes.inserts:,} inserts of "
            f"new records and {sizes.updates:,} updates of random records received from the "
            "peer, found by code, every other field given a new value; wall time and "
            "process CPU time per put. The "
            f"fsync floor is measured in the same process and directory: {sizes.floor_rounds:,} "
            "rounds of pwrite(128 B)+fsync of a small file and of a one-row SQLite commit "
            f"(WAL, synchronous=FULL). Puts and floor rounds alternate in {PUT_BLOCKS} blocks, "
            "so both see the same disk."
        ),
        "repeats": (
            f"{len(runs)} runs (one process and node each), {sizes.inserts:,} + "
            f"{sizes.updates:,} samples per run; targets judged on the median of the runs"
        ),
        "runs": runs,
        "median_run": runs.index(median_run),
        "over_runs": over_runs,
    }


def bench_apply(tmp: Path, sizes: Sizes) -> tuple[dict[str, Any], Path | None]:
    n = sizes.records
    say(f"[apply] building the sending replica's update of {n:,} records")
    source = run_worker(
        "source",
        {
            "dir": str(tmp),
            "records": n,
            "seed": SEED,
            "payload": str(tmp / "payload.bin"),
            "samples": str(tmp / "samples.json"),
            "fidelity_records": sizes.fidelity_records,
        },
    )
    schema = write_schema(tmp)
    runs = []
    kept: Path | None = None
    for i in range(sizes.repeats):
        home = tmp / f"receiver-{i}"
        say(f"[apply] run {i + 1}/{sizes.repeats}: import_sliced of {n:,} records")
        runs.append(
            run_worker(
                "apply",
                {
                    "records": n,
                    "payload": str(tmp / "payload.bin"),
                    "samples": str(tmp / "samples.json"),
                    "home": str(home),
                    "schema": str(schema),
                },
            )
        )
        if kept is not None:
            shutil.rmtree(kept)
        kept = home
    (tmp / "payload.bin").unlink()
    return {
        "workload": (
            f"A fresh node receives one update holding {n:,} '{COLLECTION}' records "
            f"({source['bytes']:,} bytes) from another replica, already in memory. Timed: "
            "Node.import_sliced, what a sync does with a received update (split into "
            "slices of 64 KB, each one durable transaction: CRDT apply, update log, "
            f"materialized records) plus count() == {n:,}; "
            f"{runs[0]['verified_samples']} sampled records "
            "checked field by field afterwards. Fresh process and fresh node per run. "
            "The sender's update is built with the engine's write primitives (one Yjs "
            "transaction per record, as Node.put) without its store; see 'fidelity'."
        ),
        "repeats": f"{len(runs)} runs (one process each)",
        "source": source,
        "runs": runs,
        "total_s": spread([r["total_s"] for r in runs]),
        "import_s": spread([r["import_s"] for r in runs]),
        "count_s": spread([r["count_s"] for r in runs]),
        "peak_rss_mb": spread([r["peak_rss_mb"] for r in runs]),
    }, kept


def bench_hold(home: Path, sizes: Sizes) -> dict[str, Any]:
    runs = []
    for i in range(sizes.repeats):
        say(f"[hold] run {i + 1}/{sizes.repeats}: open a node holding {sizes.records:,} records")
        runs.append(
            run_worker(
                "hold",
                {
                    "home": str(home),
                    "records": sizes.records,
                    "touch_code": "P0000000",
                    "touch_value": i,
                    "puts_after": sizes.big_puts if i == sizes.repeats - 1 else 0,
                },
            )
        )
    return {
        "workload": (
            f"A new process opens the node home of the apply benchmark ({sizes.records:,} "
            f"'{COLLECTION}' records, as imported) and updates one field of one record, "
            "which loads the document; RSS from /proc/self/status (VmRSS after gc.collect(), "
            "VmHWM for the peak). Then, in the last run only, "
            f"{sizes.big_puts:,} durable inserts into that document (not a target; shows "
            "the put that folds the update log into a snapshot of the whole document)."
        ),
        "repeats": f"{len(runs)} runs (one process each)",
        "runs": runs,
        "rss_mb": spread([r["rss_mb"] for r in runs]),
        "peak_rss_mb": spread([r["peak_rss_mb"] for r in runs]),
        "open_s": spread([r["open_s"] for r in runs]),
        "first_put_s": spread([r["first_put_s"] for r in runs]),
        "puts_after": runs[-1]["puts_after"],
    }


def targets(results: dict[str, Any], records: int) -> list[Target]:
    pr = results["put"]["over_runs"]
    judged = records >= TARGET_RECORDS
    why = None if judged else f"not judged: {records:,} records (quick), target is for 100,000"
    apply, hold = results["apply"], results["hold"]
    out = [
        Target("Local durable write, insert", "p50", pr["insert_p50_ms"]["median"], "ms", 1.0),
        Target("Local durable write, insert", "p99", pr["insert_p99_ms"]["median"], "ms", 5.0),
        Target("Local durable write, update", "p50", pr["update_p50_ms"]["median"], "ms", 1.0),
        Target("Local durable write, update", "p99", pr["update_p99_ms"]["median"], "ms", 5.0),
        Target(
            f"Apply {records:,} received records",
            "median time",
            apply["total_s"]["median"],
            "s",
            3.0,
            why,
        ),
        Target(
            f"Node holding {records:,} records",
            "RSS held (median)",
            hold["rss_mb"]["median"],
            "MB",
            200.0,
            why,
        ),
        Target(
            f"Node holding {records:,} records",
            "peak RSS opening (median)",
            hold["peak_rss_mb"]["median"],
            "MB",
            200.0,
            why,
        ),
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m bench.core",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, well under a minute")
    parser.add_argument("--records", type=int, help="records to apply and hold (default 100,000)")
    parser.add_argument("--repeats", type=int, help="processes per apply/hold benchmark")
    parser.add_argument(
        "--tmp",
        type=Path,
        default=RESULTS / "tmp",
        help="where node homes are made (default bench/results/tmp)",
    )
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    opts = parser.parse_args(argv)
    sizes = QUICK if opts.quick else FULL
    if opts.records:
        sizes = Sizes(**{**asdict(sizes), "records": opts.records})
    if opts.repeats:
        sizes = Sizes(**{**asdict(sizes), "repeats": opts.repeats})

    started = time.perf_counter()
    opts.tmp.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="core-", dir=opts.tmp))
    try:
        doc: dict[str, Any] = {
            **run_facts(argv),
            "mode": "quick" if opts.quick else "full",
            "sizes": asdict(sizes),
            "machine": machine_facts(tmp),
            "load_at_start": load_facts(),
        }
        results: dict[str, Any] = {"put": bench_put(tmp, sizes)}
        results["apply"], home = bench_apply(tmp, sizes)
        assert home is not None
        results["hold"] = bench_hold(home, sizes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if opts.tmp == RESULTS / "tmp" and not any(opts.tmp.iterdir()):
            opts.tmp.rmdir()
    doc["load_at_end"] = load_facts()
    checked = targets(results, sizes.records)
    doc["benchmarks"] = results
    doc["targets"] = [t.as_dict() for t in checked]
    doc["wall_s"] = time.perf_counter() - started

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / ("core-quick.json" if opts.quick else "core.json")
    out.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
    say(f"wrote {out.relative_to(ROOT)}")
    if not opts.quick and not opts.no_docs and not opts.records and not opts.repeats:
        update_docs(DOCS, doc, checked, out.relative_to(ROOT))
        say(f"regenerated the Core section of {DOCS.relative_to(ROOT)}")
    for t in checked:
        say(t.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
