"""``python -m harness.sim``: run simulator seeds; a failure prints its seed and
the command that replays it.

Exit codes: 0 all passed, 3 a run crashed (an unexpected exception), 4 a
liveness failure (no convergence after healing), 5 a correctness failure
(replicas differ, an acknowledged write lost, a number used twice, ...).
When several seeds fail, the exit code is the first failure's.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

from engine.errors import BranchlineError

from .world import TICK_MS, SimFailure, Stats, World

EXIT = {"crash": 3, "liveness": 4, "correctness": 5}


@dataclass(frozen=True)
class Outcome:
    """One seed's result, small enough to cross a process boundary."""

    seed: int
    kind: str | None  # None: passed
    message: str
    faults: str
    stats: Stats | None


def run_seed(
    seed: int, nodes: int, ops: int, relays: int = 1, schema: tuple[str, str] | None = None
) -> Outcome:
    """Run one seed (on ``schema``, (TOML text, origin), if given); never raises."""
    world: World | None = None
    try:
        world = World(seed, nodes=nodes, ops=ops, relays=relays, schema=schema)
        return Outcome(seed, None, "", world.faults.describe(), world.run())
    except Exception as exc:
        failure = exc if isinstance(exc, SimFailure) else SimFailure("crash", repr(exc))
        drawn = world.faults.describe() if world is not None else "not drawn"
        return Outcome(seed, failure.kind, str(failure), drawn, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.sim", description=__doc__)
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds to run")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--seed", type=int, default=None, help="run just this seed")
    parser.add_argument("--ops", type=int, default=120, help="operations per run")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument(
        "--relays", type=int, default=1, help="relays on one store (nodes move between them)"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="worker processes (seeds stay independent)"
    )
    parser.add_argument(
        "--schema",
        type=Path,
        default=None,
        help="a schema TOML file: generate the records from its fields instead",
    )
    args = parser.parse_args(argv)
    schema = None
    if args.schema is not None:
        try:
            schema = (args.schema.read_text("utf-8"), str(args.schema))
            World.check_schema(*schema)
        except (OSError, UnicodeDecodeError, BranchlineError) as exc:
            parser.error(f"--schema {args.schema}: {exc}")
    seeds = [args.seed] if args.seed is not None else range(args.start, args.start + args.seeds)
    started = time.perf_counter()
    if args.jobs > 1 and len(seeds) > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            outcomes = list(
                pool.map(
                    run_seed,
                    seeds,
                    repeat(args.nodes),
                    repeat(args.ops),
                    repeat(args.relays),
                    repeat(schema),
                    chunksize=4,
                )
            )
    else:
        outcomes = [run_seed(seed, args.nodes, args.ops, args.relays, schema) for seed in seeds]
    faults: Counter[str] = Counter()
    ticks = ops = acked = followed = urgent = 0
    failed = [o for o in outcomes if o.kind is not None]
    for o in outcomes:
        if o.stats is None:
            print(
                f"seed {o.seed}: {o.kind} failure: {o.message}\n  faults: {o.faults}\n"
                f"  replay: python -m harness.sim --seed {o.seed} --ops {args.ops} "
                f"--nodes {args.nodes}"
                + (f" --relays {args.relays}" if args.relays > 1 else "")
                + (f" --schema {args.schema}" if args.schema else ""),
                flush=True,
            )
            continue
        faults.update(o.stats.faults)
        ticks += o.stats.ticks
        ops += o.stats.ops
        acked += o.stats.acked_writes
        followed += o.stats.followed
        urgent += o.stats.urgent_passes
    took = time.perf_counter() - started
    hours = ticks * TICK_MS / 3_600_000
    print(
        f"{len(seeds)} seeds in {took:.1f} s: {len(seeds) - len(failed)} passed, "
        f"{len(failed)} failed; {hours:.2f} simulated hours, {ops} operations, "
        f"{acked} acknowledged writes, none lost in passing runs"
    )
    if urgent:
        print(f"{urgent} sync passes sent urgent records before the rest, as checked")
    if args.relays > 1:
        print(f"{followed} updates crossed from one relay to another live")
    if faults:
        print("faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(faults.items())))
    return EXIT[str(failed[0].kind)] if failed else 0


if __name__ == "__main__":
    sys.exit(main())
