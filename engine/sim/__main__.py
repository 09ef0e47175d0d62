"""``python -m engine.sim``: run simulator seeds; a failure prints its seed and
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

from .world import TICK_MS, SimFailure, World

EXIT = {"crash": 3, "liveness": 4, "correctness": 5}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.sim", description=__doc__)
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds to run")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--seed", type=int, default=None, help="run just this seed")
    parser.add_argument("--ops", type=int, default=120, help="operations per run")
    parser.add_argument("--nodes", type=int, default=3)
    args = parser.parse_args(argv)
    seeds = [args.seed] if args.seed is not None else range(args.start, args.start + args.seeds)
    started = time.perf_counter()
    faults: Counter[str] = Counter()
    ticks = ops = acked = 0
    failed: list[tuple[int, SimFailure]] = []
    for seed in seeds:
        world: World | None = None
        try:
            world = World(seed, nodes=args.nodes, ops=args.ops)
            stats = world.run()
        except Exception as exc:
            failure = exc if isinstance(exc, SimFailure) else SimFailure("crash", repr(exc))
            failed.append((seed, failure))
            drawn = world.faults.describe() if world is not None else "not drawn"
            print(
                f"seed {seed}: {failure.kind} failure: {failure}\n  faults: {drawn}\n"
                f"  replay: python -m engine.sim --seed {seed} --ops {args.ops} "
                f"--nodes {args.nodes}",
                flush=True,
            )
            continue
        faults.update(stats.faults)
        ticks += stats.ticks
        ops += stats.ops
        acked += stats.acked_writes
    took = time.perf_counter() - started
    hours = ticks * TICK_MS / 3_600_000
    print(
        f"{len(seeds)} seeds in {took:.1f} s: {len(seeds) - len(failed)} passed, "
        f"{len(failed)} failed; {hours:.2f} simulated hours, {ops} operations, "
        f"{acked} acknowledged writes, none lost in passing runs"
    )
    if faults:
        print("faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(faults.items())))
    return EXIT[failed[0][1].kind] if failed else 0


if __name__ == "__main__":
    sys.exit(main())
