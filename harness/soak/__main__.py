"""``python -m harness.soak``: one soak run (see harness.soak.runner).

Exit codes: 0 pass, 2 usage, 3 crash, 4 liveness (no convergence),
5 correctness (a check failed). A failed run prints a replay command.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from engine.errors import BranchlineError
from engine.relay.pg_store import is_pg_url
from engine.schema import load_schema

from .runner import SoakConfig, run_soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.soak", description=__doc__)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of faults")
    parser.add_argument("--seed", type=int, default=None, help="default: a random seed (printed)")
    parser.add_argument("--nodes", type=int, default=3, help="node processes (>= 2)")
    parser.add_argument("--rate", type=float, default=12.0, help="workload operations per second")
    parser.add_argument(
        "--fault-every", type=float, default=2.0, help="mean seconds between faults"
    )
    parser.add_argument("--converge-timeout", type=float, default=120.0, help="seconds")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temp directory")
    parser.add_argument("--keep", action="store_true", help="keep the work directory on success")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each fault")
    parser.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    parser.add_argument("--relays", type=int, default=1, help="relay processes on one store")
    parser.add_argument(
        "--store",
        default="",
        help="a postgresql:// server URL: the relay store goes in a database of the run's own; "
        "'private': a PostgreSQL server of the run's own, which the faults also restart "
        "(default: a SQLite file in the work directory)",
    )
    parser.add_argument(
        "--schema", type=Path, default=None, help="a schema TOML file to soak instead of accounting"
    )
    args = parser.parse_args(argv)
    if args.nodes < 2 or args.duration <= 0 or args.rate <= 0 or args.fault_every <= 0:
        parser.error("--nodes must be >= 2; --duration, --rate and --fault-every positive")
    if args.relays < 1:
        parser.error("--relays must be >= 1")
    if args.store and args.store != "private" and not is_pg_url(args.store):
        parser.error("--store takes a postgresql:// URL or 'private' (the default store is SQLite)")
    if args.schema is not None:
        try:
            load_schema(args.schema)
        except BranchlineError as exc:
            parser.error(f"--schema: {exc}")
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    config = SoakConfig(
        duration_s=args.duration,
        seed=seed,
        nodes=args.nodes,
        rate=args.rate,
        fault_every_s=args.fault_every,
        converge_timeout_s=args.converge_timeout,
        workdir=args.workdir,
        keep=args.keep,
        verbose=args.verbose,
        relays=args.relays,
        store=args.store,
        schema=args.schema,
    )
    return run_soak(config, args.out)


if __name__ == "__main__":
    sys.exit(main())
