"""Where the time and memory of the core benchmarks go.

    python -m bench.profile put       # pyinstrument over durable puts
    python -m bench.profile apply     # pyinstrument over import_updates + count
    python -m bench.profile hold      # pyinstrument over open + first put
    python -m bench.profile memory    # RSS, stage by stage, each variant in its own process
    python -m bench.profile wal       # WAL frames per put, checkpoint cost, p99 with/without
    python -m bench.profile stages    # import_updates stage by stage, wall and CPU time
    python -m bench.profile all

``--records N`` (default 100,000) sets the size. Reports are printed and
written to ``bench/results/profiles/<name>.txt``; temporary node homes live
under ``bench/results/tmp`` and are removed.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from pyinstrument import Profiler

from engine.node import Node

from .stats import ROOT, latency_summary, load_facts, machine_facts, rss_mb
from .workload import COLLECTION, DATASET, build_source, record, write_schema

OUT = ROOT / "bench" / "results" / "profiles"
TMP = ROOT / "bench" / "results" / "tmp"
SEED = 7
PUT_PREFILL = 10_000
PUT_SAMPLES = 2_000


@contextmanager
def workdir() -> Iterator[Path]:
    TMP.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="profile-", dir=TMP))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if not any(TMP.iterdir()):
            TMP.rmdir()


def profiled(fn: Callable[[], Any]) -> tuple[str, float]:
    profiler = Profiler(interval=0.0005)
    t0 = time.perf_counter()
    profiler.start()
    fn()
    profiler.stop()
    seconds = time.perf_counter() - t0
    text = profiler.output_text(
        unicode=True,
        color=False,
        time="percent_of_total",
        # pycrdt's Python layer is where its observers run: keep it visible.
        processor_options={"show_regex": r".*/pycrdt/.*"},
    )
    return text, seconds


def received_node(directory: Path, n: int) -> tuple[Node, bytes]:
    payload, _ = build_source(n, seed=SEED)
    node = Node.create(
        directory / "home", dataset=DATASET, node="receiver", schema=write_schema(directory)
    )
    return node, payload


def prof_put(n: int) -> str:
    out = []
    with workdir() as d:
        node, payload = received_node(d, PUT_PREFILL)
        node.import_updates({COLLECTION: payload})
        rng = random.Random(SEED)
        for i in range(100):
            node.put(COLLECTION, record(PUT_PREFILL + i, rng))
        batches = {
            "inserts": [record(PUT_PREFILL + 100 + i, rng) for i in range(PUT_SAMPLES)],
            "updates (records from the peer, found by code)": [
                record(rng.randrange(PUT_PREFILL), rng, revision=1) for _ in range(PUT_SAMPLES)
            ],
        }
        for what, batch in batches.items():

            def run(batch: list[dict[str, Any]] = batch) -> None:
                for fields in batch:
                    node.put(COLLECTION, fields)

            text, seconds = profiled(run)
            out.append(
                f"{PUT_SAMPLES} durable Node.put {what} into a node holding "
                f"{PUT_PREFILL:,} records: {seconds:.2f} s, "
                f"{seconds / PUT_SAMPLES * 1000:.3f} ms per put (under the profiler)\n\n{text}"
            )
        node.close()
    return "\n".join(out)


def prof_apply(n: int) -> str:
    with workdir() as d:
        node, payload = received_node(d, n)

        def run() -> None:
            node.import_updates({COLLECTION: payload})
            if node.count(COLLECTION) != n:
                raise AssertionError("not all records materialized")

        text, seconds = profiled(run)
        node.close()
    head = f"import_updates + count of {n:,} records ({len(payload):,} bytes): {seconds:.2f} s"
    return head + "\n\n" + text


def prof_hold(n: int) -> str:
    with workdir() as d:
        node, payload = received_node(d, n)
        node.import_updates({COLLECTION: payload})
        node.close()
        del payload
        gc.collect()

        def run() -> None:
            opened = Node.open(d / "home")
            opened.put(COLLECTION, {"code": "P0000000", "visits": 1})
            opened.close()

        text, seconds = profiled(run)
    head = f"Node.open + first put into a document of {n:,} records: {seconds:.2f} s"
    return head + "\n\n" + text


def prof_wal(n: int) -> str:
    """Why a few puts take several ms: WAL frames per put and the cost of the
    automatic checkpoint that runs inside the committing put."""
    lines = []
    with workdir() as d:
        node, payload = received_node(d, PUT_PREFILL)
        node.import_updates({COLLECTION: payload})
        conn = node.store.conn
        wal = d / "home" / "branchline.db-wal"
        page = int(conn.execute("PRAGMA page_size").fetchone()[0])
        auto = int(conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        rng = random.Random(SEED)
        nxt = PUT_PREFILL
        frames: dict[str, list[int]] = {"insert": [], "update": []}
        for kind in ("insert", "update"):
            for _ in range(50):
                if kind == "insert":
                    fields = record(nxt, rng)
                    nxt += 1
                else:
                    fields = record(rng.randrange(PUT_PREFILL), rng, revision=1)
                before = wal.stat().st_size
                node.put(COLLECTION, fields)
                frames[kind].append((wal.stat().st_size - before) // (page + 24))
        for kind, counts in frames.items():
            counts.sort()
            lines.append(
                f"WAL frames ({page} B pages) written per {kind} put: median "
                f"{counts[len(counts) // 2]}, min {counts[0]}, max {counts[-1]} (50 puts)"
            )
        per_put = sorted(frames["insert"])[len(frames["insert"]) // 2]
        every = max(1, auto // per_put)
        lines.append(
            f"wal_autocheckpoint = {auto} pages: a checkpoint runs inside about one put in {every}"
        )
        cost = []
        for _ in range(20):
            for _ in range(every):
                node.put(COLLECTION, record(nxt, rng))
                nxt += 1
            t0 = time.perf_counter()
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            cost.append((time.perf_counter() - t0) * 1000)
        cost.sort()
        lines.append(
            f"checkpoint after {every} puts: median {cost[len(cost) // 2]:.2f} ms, "
            f"min {cost[0]:.2f} ms, max {cost[-1]:.2f} ms (20 checkpoints)"
        )
        for setting in (auto, 0):
            conn.execute(f"PRAGMA wal_autocheckpoint = {setting}")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            lat = []
            for _ in range(PUT_SAMPLES):
                fields = record(nxt, rng)
                nxt += 1
                t0 = time.perf_counter()
                node.put(COLLECTION, fields)
                lat.append(time.perf_counter() - t0)
            s = latency_summary(lat, 5.0)
            lines.append(
                f"{PUT_SAMPLES} inserts with wal_autocheckpoint = {setting}: p50 "
                f"{s['p50_ms']:.3f} ms, p99 {s['p99_ms']:.3f} ms, max {s['max_ms']:.1f} ms, "
                f"{s['over_5ms']} over 5 ms"
            )
        node.close()
    return "\n".join(lines)


# -- memory: each variant in a fresh process --------------------------------

_trim = ctypes.CDLL("libc.so.6").malloc_trim


def _stage(stages: list[dict[str, Any]], name: str) -> None:
    gc.collect()
    stages.append({"stage": name, **rss_mb()})


def mem_variant(variant: str, payload_path: Path, home: Path) -> list[dict[str, Any]]:
    """Run in a child: load the document one way, RSS after each stage."""
    from pycrdt import Doc, Map

    from engine.crdt import RecordDoc

    stages: list[dict[str, Any]] = []
    _stage(stages, "interpreter + engine imported")
    keep: list[Any] = []
    if variant in ("node", "snapshot"):
        node = Node.open(home if variant == "node" else home.with_name("home-snapshot"))
        _stage(stages, "Node.open")
        node.put(COLLECTION, {"code": "P0000000", "visits": 2})
        _stage(stages, "first put (document loaded from the store)")
        _trim(0)
        _stage(stages, "malloc_trim(0): freed heap given back to the OS")
        node.store.conn.execute("PRAGMA shrink_memory")
        _trim(0)
        _stage(stages, "PRAGMA shrink_memory + malloc_trim: SQLite page cache emptied")
        loaded = node._doc(COLLECTION)  # the one document loaded
        index = loaded.doc._index
        index_bytes = sys.getsizeof(index) + sum(
            sys.getsizeof(k) + sys.getsizeof(v) + sum(sys.getsizeof(x) for x in v)
            for k, v in index.items()
        )
        stages.append({"stage": "RecordDoc._index size (sys.getsizeof)", "mb": index_bytes / 1e6})
        node.close()
        return stages
    blob = payload_path.read_bytes()
    _stage(stages, f"update read ({len(blob) / 1e6:.0f} MB)")
    if variant == "recorddoc":
        doc = RecordDoc(COLLECTION, 12345)
        doc.apply(blob)
        keep.append(doc)
        _stage(stages, "RecordDoc.apply (as Node loads a document)")
        doc.release()
        _stage(stages, "RecordDoc.release(): entry texts of the apply dropped")
    else:
        bare: Doc[Any] = Doc()
        root: Map[Any] = bare.get("r", type=Map)
        if variant == "update_observer":
            bare.observe(lambda e: keep.append(e.update))
        elif variant == "map_observer":
            root.observe(lambda e: keep.append(e.keys))  # type: ignore[attr-defined]
        bare.apply_update(blob)
        _stage(stages, f"pycrdt Doc.apply_update ({variant})")
        keep[:] = [bare]
        _stage(stages, "observer's copies dropped")
    del blob
    _stage(stages, "update bytes dropped")
    _trim(0)
    _stage(stages, "malloc_trim(0)")
    return stages


MEM_VARIANTS = {
    "bare": "pycrdt Doc + Map, no observers",
    "update_observer": "pycrdt Doc with a transaction observer reading event.update",
    "map_observer": "pycrdt Doc with a Map observer reading event.keys",
    "recorddoc": "engine RecordDoc.apply (both observers, index, fresh-value cache)",
    "node": "Node.open + first put, the document in one 42 MB log row (as import_updates wrote it)",
    "snapshot": "Node.open + first put, the document compacted into its snapshot (stored in parts)",
}


def prof_memory(n: int) -> str:
    lines = [f"RSS by stage, {n:,} records; each variant in a fresh process (MB = 10^6 B)", ""]
    with workdir() as d:
        node, payload = received_node(d, n)
        (d / "payload.bin").write_bytes(payload)
        node.import_updates({COLLECTION: payload})
        node.close()
        del payload
        shutil.copytree(d / "home", d / "home-snapshot")
        with Node.open(d / "home-snapshot") as compacted:
            compacted.compact()
        for variant, title in MEM_VARIANTS.items():
            done = subprocess.run(
                [sys.executable, "-m", "bench.profile", "_memchild", variant, str(d)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            stages = orjson.loads(done.stdout.strip().splitlines()[-1])
            lines.append(f"## {variant}: {title}")
            for s in stages:
                if "mb" in s:
                    lines.append(f"  {s['stage']:<62} {s['mb']:8.1f} MB")
                else:
                    lines.append(
                        f"  {s['stage']:<62} RSS {s['rss_mb']:7.1f}  peak {s['peak_rss_mb']:7.1f}"
                    )
            lines.append("")
    return "\n".join(lines)


def prof_stages(n: int) -> str:
    """Each stage of one bulk import timed by wrapping the engine function
    that does it (no sampling profiler: its overhead hides the proportions).
    Per-record stages (parse, merge, checks) include ~1 µs per call of timer."""
    from engine.crdt.document import RecordDoc
    from engine.store import records as records_mod
    from engine.store.conflict_index import ConflictIndex
    from engine.store.doclog import DocLog
    from engine.writes import Writer

    stages = [
        ("CRDT apply (pycrdt apply + map observer)", RecordDoc, "apply"),
        ("  of which the map observer (changed keys)", RecordDoc, "_on_map"),
        ("update log append", DocLog, "append"),
        ("materialize (below, then rows and SQL)", records_mod.Materializer, "materialize"),
        ("  parse entries (orjson)", RecordDoc, "states"),
        ("  merge (resolve)", records_mod, "resolve"),
        ("  schema checks of values", records_mod, "valid_values"),
        ("  conflict index (before + after)", ConflictIndex, "before"),
        ("  conflict index (before + after)", ConflictIndex, "after"),
        ("adapters", Writer, "_deliver"),
    ]
    spent: dict[str, list[float]] = {}
    originals = []
    with workdir() as d:
        node, payload = received_node(d, n)  # the sender's work is not timed
        # The map observer is bound when a document loads: wrap before.
        for label, owner, attr in stages:
            fn = getattr(owner, attr)
            originals.append((owner, attr, fn))
            setattr(owner, attr, _timed(fn, spent.setdefault(label, [0.0, 0.0, 0])))
        try:
            w0, c0 = time.perf_counter(), time.process_time()
            node.import_updates({COLLECTION: payload})
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        finally:
            for owner, attr, fn in originals:
                setattr(owner, attr, fn)
        if node.count(COLLECTION) != n:
            raise AssertionError("not all records materialized")
        node.close()
    top = [label for label, _, _ in stages if not label.startswith(" ")]
    rest_wall = wall - sum(spent[label][0] for label in dict.fromkeys(top))
    rest_cpu = cpu - sum(spent[label][1] for label in dict.fromkeys(top))
    lines = [
        f"Node.import_updates of {n:,} received records ({len(payload):,} bytes), "
        f"one process: {wall:.2f} s wall, {cpu:.2f} s CPU; load after {load_facts()}",
        "",
        "| stage | wall s | CPU s | calls |",
        "|---|---|---|---|",
    ]
    for label in dict.fromkeys(label for label, _, _ in stages):
        w, c, calls = spent[label]
        lines.append(f"| {label} | {w:.3f} | {c:.3f} | {int(calls):,} |")
    lines.append(f"| transaction begin + commit, the rest | {rest_wall:.3f} | {rest_cpu:.3f} | |")
    return "\n".join(lines)


def _timed(fn: Callable[..., Any], acc: list[float]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[0] += time.perf_counter() - w0
            acc[1] += time.process_time() - c0
            acc[2] += 1

    return timed


PROFILES: dict[str, Callable[[int], str]] = {
    "put": prof_put,
    "apply": prof_apply,
    "hold": prof_hold,
    "memory": prof_memory,
    "wal": prof_wal,
    "stages": prof_stages,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_memchild":
        stages = mem_variant(argv[1], Path(argv[2]) / "payload.bin", Path(argv[2]) / "home")
        sys.stdout.write(orjson.dumps(stages).decode() + "\n")
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("what", choices=[*PROFILES, "all"])
    parser.add_argument("--records", type=int, default=100_000)
    opts = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    for name in PROFILES if opts.what == "all" else [opts.what]:
        with workdir() as d:
            facts = machine_facts(d)
        load = load_facts()
        text = PROFILES[name](opts.records)
        header = (
            f"# bench.profile {name} --records {opts.records}\n"
            f"# {time.strftime('%Y-%m-%d %H:%M:%S %z')}; {facts['cpu_model']}, "
            f"{facts['cpus_usable']} CPUs; Python {facts['python']}, pycrdt {facts['pycrdt']}, "
            f"SQLite {facts['sqlite']}; load at start {load}\n\n"
        )
        (OUT / f"{name}.txt").write_text(header + text + "\n", encoding="utf-8")
        print(header + text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
