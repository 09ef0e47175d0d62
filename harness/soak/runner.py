"""The soak run: real processes, a fault schedule from a seed, checks.

``run_soak(config)`` builds, in a work directory, a relay store with one
enrolled node per node home, starts ``branchline relay serve`` and one
``branchline node run`` per home (each reaching the relay through its own
``FaultProxy``), then for ``duration_s`` seconds:

- the workload (``harness.soak.workload``) writes into the homes;
- the nemesis plays a schedule drawn from the seed: SIGKILL and restart of
  node processes and of the relay, per proxy delays, cuts (partitions, also
  of half the nodes at once), connection resets and refused connections, and
  lost disks: a node's process is killed, its home exported (``export
  --unsynced``), wiped and rebuilt (``node init``, ``import``, ``sync``, as
  docs/operations.md says), and the node goes on in the new home.

Then it heals every fault, restarts whatever is down, stops the workload and
waits (at most ``converge_timeout_s``) until every home has an empty outbox
and the same resolved records and conflicts. It stops the processes (SIGTERM)
and runs the checks of ``harness.soak.checks``.

The schedule and the workload are drawn from ``random.Random(seed)`` (two
derived generators), so a seed replays the same sequence of operations and
faults; what real processes make of it (timing, interleavings) varies.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

from engine.node import Node
from engine.relay.sqlite_store import SqliteRelayStore
from engine.schema import load_schema
from engine.store.node_store import STORE_FILE
from harness.net import free_port as _free_port

from ..faults import FaultProxy, ProxyHost
from . import checks
from .workload import Workload

DATASET = "soak"

#: Exit codes: the run passed, a process or the harness crashed, the replicas
#: did not converge in time, a correctness check failed.
EXIT_OK = 0
EXIT_CRASH = 3
EXIT_LIVENESS = 4
EXIT_CORRECTNESS = 5

VERDICTS = {
    EXIT_OK: "pass",
    EXIT_CRASH: "crash",
    EXIT_LIVENESS: "liveness",
    EXIT_CORRECTNESS: "correctness",
}

#: Fault kinds and their weights in the schedule.
FAULTS: dict[str, int] = {
    "kill_node": 4,
    "kill_relay": 2,
    "delay": 3,
    "cut": 3,
    "partition_half": 1,
    "reset": 3,
    "refuse": 2,
    "rebuild_node": 1,
}


@dataclass(frozen=True)
class SoakConfig:
    """One soak run. ``rate`` is workload operations per second (mean);
    ``fault_every_s`` the mean time between faults."""

    duration_s: float = 60.0
    seed: int = 0
    nodes: int = 3
    rate: float = 12.0
    fault_every_s: float = 2.0
    converge_timeout_s: float = 120.0
    workdir: Path | None = None
    keep: bool = False
    verbose: bool = False
    schema: Path | None = None  # a user's schema file (default: the built-in accounting)

    def replay_command(self) -> str:
        return (
            f"{sys.executable} -m harness.soak --duration {self.duration_s:g} --seed {self.seed} "
            f"--nodes {self.nodes} --rate {self.rate:g} --fault-every {self.fault_every_s:g}"
            + (f" --schema {self.schema}" if self.schema else "")
        )


@dataclass
class Fault:
    """One scheduled fault: at ``at_s`` (from the start), ``kind`` on
    ``targets`` (node names, or ``relay``), undone after ``hold_s``."""

    at_s: float
    kind: str
    targets: list[str]
    hold_s: float
    delay_ms: float = 0.0


def schedule(
    rng: random.Random, duration_s: float, every_s: float, names: list[str]
) -> list[Fault]:
    """The faults of a run, drawn from ``rng`` only (a seed replays them)."""
    kinds, weights = list(FAULTS), list(FAULTS.values())
    out: list[Fault] = []
    t = rng.expovariate(1 / every_s)
    while t < duration_s:
        kind = rng.choices(kinds, weights)[0]
        if kind == "kill_relay":
            fault = Fault(t, kind, ["relay"], rng.uniform(0.2, 3.0))
        elif kind == "partition_half":
            half = rng.sample(names, max(1, len(names) // 2))
            fault = Fault(t, kind, sorted(half), rng.uniform(1.0, 8.0))
        else:
            hold = {"kill_node": (0.2, 3.0), "delay": (2.0, 8.0), "cut": (1.0, 8.0),
                    "reset": (0.0, 0.0), "refuse": (0.5, 4.0),
                    "rebuild_node": (0.0, 0.0)}[kind]  # fmt: skip
            fault = Fault(t, kind, [rng.choice(names)], rng.uniform(*hold))
            if kind == "delay":
                fault.delay_ms = rng.uniform(20, 400)
        out.append(fault)
        t += rng.expovariate(1 / every_s)
    return out


class SoakFailure(Exception):
    """The run failed; ``exit_code`` says how (crash, liveness, correctness)."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "branchline"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "engine.cli"]


class Proc:
    """A child process we may SIGKILL and start again; its output goes to
    ``log`` (appended, one file per process, bounded by ``MAX_LOG_BYTES``
    per incarnation: the log is cut when it is bigger at a restart)."""

    MAX_LOG_BYTES = 8 << 20

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.expected_exit = False
        self.starts = 0
        self._out: IO[bytes] | None = None

    def start(self) -> None:
        if self.log.exists() and self.log.stat().st_size > self.MAX_LOG_BYTES:
            self.log.write_bytes(b"(log cut)\n")
        self._out = self.log.open("ab")
        self.proc = subprocess.Popen(self.argv, stdout=self._out, stderr=subprocess.STDOUT)
        self.expected_exit = False
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.expected_exit = True
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self._close_log()

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait; SIGKILL after ``timeout``. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.expected_exit = True
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self._close_log()
        return self.proc.returncode

    def crashed(self) -> int | None:
        """The exit code when the process ended without being told to."""
        if self.proc is None or self.expected_exit:
            return None
        return self.proc.poll()

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _close_log(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


@dataclass
class SoakState:
    """What happened during a run (the summary is built from it)."""

    faults: Counter[str] = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)
    converge_s: float | None = None
    phase: str = "setup"
    late_first_syncs: int = 0  # rebuilt homes whose first sync waited for a fault to end


class Soak:
    """One run of ``config`` (see the module docstring); ``run`` returns the
    summary and the exit code."""

    def __init__(self, config: SoakConfig, log: Callable[[str], None] = print) -> None:
        self.config = config
        self.say = log
        root = config.workdir or Path(tempfile.mkdtemp(prefix="branchline-soak-"))
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        rng = random.Random(config.seed)
        self.fault_rng = random.Random(rng.getrandbits(64))
        self.work_rng = random.Random(rng.getrandbits(64))
        self.proxy_rng = random.Random(rng.getrandbits(64))
        self.names = [f"N{i}" for i in range(config.nodes)]
        self.homes = {n: self.root / n for n in self.names}
        self.relay_db = self.root / "relay.db"
        self.cli = _cli()
        self.state = SoakState()
        self.relay_port = _free_port()
        self.proxies: dict[str, FaultProxy] = {}
        self.host: ProxyHost | None = None
        self.relay: Proc | None = None
        self.runs: dict[str, Proc] = {}
        self.schema = load_schema(config.schema) if config.schema else None
        self.workload = Workload(self.homes, self.work_rng, self.cli, self.schema)
        self._stop_work = threading.Event()
        self._work_error: BaseException | None = None
        self._cut_depth: Counter[str] = Counter()
        self._refuse_depth: Counter[str] = Counter()
        self.tokens: dict[str, str] = {}
        self.lives: Counter[str] = Counter()

    # -- setup -----------------------------------------------------------------

    def _setup(self) -> None:
        with SqliteRelayStore.create(self.relay_db) as store:
            tokens = {n: store.enroll(DATASET, n).token for n in self.names}
        self.tokens = tokens
        self.host = ProxyHost(self.proxy_rng)
        for n in self.names:
            self.proxies[n] = self.host.add(self.relay_port)
            Node.create(
                self.homes[n],
                dataset=DATASET,
                node=n,
                relay=f"ws://127.0.0.1:{self.proxies[n].port}/",
                token=tokens[n],
                schema=self.schema or "accounting",
            ).close()
        self.relay = Proc(
            "relay",
            [*self.cli, "relay", "serve", str(self.relay_db), "--port", str(self.relay_port)],
            self.root / "relay.log",
        )
        self._start_relay()
        for n in self.names:
            self.runs[n] = Proc(
                n,
                [*self.cli, "node", "run", "--home", str(self.homes[n]), "--backoff-max", "1"],
                self.root / f"{n}.log",
            )
            self.runs[n].start()
        # Nodes are used by the thread that opened them (sqlite3's rule): the
        # workload thread opens its own after this.
        self.workload.open()
        try:
            self.workload.seed_catalogs(self.names[0])
        finally:
            self.workload.close()
        self._wait_converged(60.0, "initial sync")

    def _start_relay(self) -> None:
        assert self.relay is not None
        self.relay.start()
        deadline = time.monotonic() + 30
        while not _listening(self.relay_port):
            if not self.relay.running or time.monotonic() > deadline:
                raise SoakFailure(
                    EXIT_CRASH, f"the relay did not start listening:\n{self.relay.tail()}"
                )
            time.sleep(0.05)

    # -- workload thread ----------------------------------------------------------

    def _work(self) -> None:
        rate = self.config.rate
        try:
            self.workload.open()
            while not self._stop_work.is_set():
                self.workload.serve_pause()
                self.workload.step()
                self._stop_work.wait(self.work_rng.expovariate(rate))
        except BaseException as exc:  # reported by the main thread
            self._work_error = exc
        finally:
            self.workload.close()

    # -- nemesis -------------------------------------------------------------------

    def _apply(self, fault: Fault) -> list[tuple[float, Callable[[], None]]]:
        """Inject ``fault`` now; returns (seconds from now, undo) to schedule."""
        assert self.host is not None and self.relay is not None
        kind = fault.kind
        self.state.faults[kind] += 1
        if kind == "kill_relay":
            self.relay.kill()
            return [(fault.hold_s, self._restart_relay)]
        if kind == "kill_node":
            proc = self.runs[fault.targets[0]]
            proc.kill()
            return [(fault.hold_s, partial(self._restart, proc))]
        if kind == "rebuild_node":
            self._rebuild(fault.targets[0])
            return []
        undo: list[tuple[float, Callable[[], None]]] = []
        for name in fault.targets:
            proxy = self.proxies[name]
            if kind == "delay":
                self.host.call(partial(proxy.delay, fault.delay_ms, fault.delay_ms / 2))
                undo.append((fault.hold_s, partial(self.host_call, partial(proxy.delay, 0))))
            elif kind in ("cut", "partition_half"):
                self._cut_depth[name] += 1
                self.host.call(proxy.cut)
                undo.append((fault.hold_s, partial(self._uncut, name)))
            elif kind == "reset":
                self.host.call(proxy.reset)
            elif kind == "refuse":
                self._refuse_depth[name] += 1
                self.host.call(partial(proxy.refuse, True))
                undo.append((fault.hold_s, partial(self._unrefuse, name)))
        return undo

    def _rebuild(self, name: str) -> None:
        """The node's disk fails: with its process killed and the workload
        holding off it, export its unsynced work, wipe the home, create a
        new one for the same node, import, sync once (which may fail while
        other faults hold) and go on there."""
        with self.workload.paused(name):
            proc = self.runs[name]
            proc.kill()
            old = self.homes[name]
            export = self.root / f"{name}-unsynced.blx"
            self._cli_ok("export", "--home", str(old), str(export), "--unsynced")
            shutil.rmtree(old)
            self.lives[name] += 1
            new = self.root / f"{name}.{self.lives[name] + 1}"
            url = f"ws://127.0.0.1:{self.proxies[name].port}/"
            self._cli_ok(
                "node", "init", "--home", str(new), "--dataset", DATASET, "--node", name,
                "--relay", url, "--token", self.tokens[name],
            )  # fmt: skip
            self._cli_ok("import", "--home", str(new), str(export))
            synced = subprocess.run(
                [*self.cli, "sync", "--home", str(new), "--timeout", "10"],
                capture_output=True,
                timeout=120,
                check=False,
            )
            if synced.returncode != 0:
                self.state.late_first_syncs += 1  # another fault holds: it syncs later
            self.homes[name] = new
            proc.argv = [*self.cli, "node", "run", "--home", str(new), "--backoff-max", "1"]
            proc.start()

    def _cli_ok(self, *args: str) -> None:
        out = subprocess.run(
            [*self.cli, *args], capture_output=True, text=True, timeout=120, check=False
        )
        if out.returncode != 0:
            raise SoakFailure(
                EXIT_CRASH, f"branchline {' '.join(args[:1])} failed: {out.stderr.strip()}"
            )

    def host_call(self, fn: Callable[[], None]) -> None:
        assert self.host is not None
        self.host.call(fn)

    def _uncut(self, name: str) -> None:
        self._cut_depth[name] -= 1
        if self._cut_depth[name] <= 0:
            self._cut_depth[name] = 0
            self.host_call(self.proxies[name].resume)

    def _unrefuse(self, name: str) -> None:
        self._refuse_depth[name] -= 1
        if self._refuse_depth[name] <= 0:
            self._refuse_depth[name] = 0
            self.host_call(partial(self.proxies[name].refuse, False))

    def _restart(self, proc: Proc) -> None:
        if not proc.running:
            proc.start()

    def _restart_relay(self) -> None:
        assert self.relay is not None
        if not self.relay.running:
            self._start_relay()

    def _check_processes(self) -> None:
        procs = [self.relay, *self.runs.values()]
        for proc in procs:
            if proc is None:
                continue
            code = proc.crashed()
            if code is not None:
                raise SoakFailure(
                    EXIT_CRASH,
                    f"{proc.name} exited by itself with code {code} during {self.state.phase}:\n"
                    f"{proc.tail()}",
                )
        if self._work_error is not None:
            err = self._work_error
            raise SoakFailure(EXIT_CRASH, f"workload failed: {type(err).__name__}: {err}")

    def _chaos(self) -> None:
        names = self.names
        plan = schedule(self.fault_rng, self.config.duration_s, self.config.fault_every_s, names)
        undo: list[tuple[float, Callable[[], None]]] = []
        start = time.monotonic()
        i = 0
        while True:
            now = time.monotonic() - start
            if now >= self.config.duration_s:
                break
            due = [u for u in undo if u[0] <= now]
            undo = [u for u in undo if u[0] > now]
            for _, fn in sorted(due, key=lambda u: u[0]):
                fn()
            while i < len(plan) and plan[i].at_s <= now:
                f = plan[i]
                if self.config.verbose:
                    self.say(f"  {now:7.2f} s  {f.kind} {','.join(f.targets)} ({f.hold_s:.2f} s)")
                for hold, fn in self._apply(f):
                    undo.append((now + hold, fn))
                i += 1
            self._check_processes()
            time.sleep(0.05)
        for _, fn in sorted(undo, key=lambda u: u[0]):
            fn()

    # -- healing and convergence -------------------------------------------------

    def _heal(self) -> None:
        assert self.host is not None and self.relay is not None
        for proxy in self.proxies.values():
            self.host.call(proxy.heal)
        self._cut_depth.clear()
        self._refuse_depth.clear()
        if not self.relay.running:
            self._start_relay()
        for proc in self.runs.values():
            self._restart(proc)

    def _wait_converged(self, timeout: float, what: str) -> float:
        start = time.monotonic()
        last: list[tuple[str, int, int, int]] = []
        while time.monotonic() - start < timeout:
            self._check_processes()
            last = [checks.records_digest(h) for h in self.homes.values()]
            if len({d for d, *_ in last}) == 1 and all(p == 0 and w == 0 for _, _, p, w in last):
                return time.monotonic() - start
            time.sleep(0.25)
        detail = ", ".join(
            f"{n}: {r} records, {p} pending, {w} waiting"
            for n, (_, r, p, w) in zip(self.names, last, strict=True)
        )
        raise SoakFailure(EXIT_LIVENESS, f"{what}: no convergence within {timeout:g} s ({detail})")

    # -- the run -------------------------------------------------------------------

    def run(self) -> tuple[dict[str, Any], int]:
        """Run, check and summarize. Never raises for a failed run: the exit
        code (``EXIT_*``) and the summary's ``failure`` say what failed."""
        started = time.monotonic()
        self.say(f"soak: seed {self.config.seed}, {self.config.nodes} nodes, "
                 f"{self.config.duration_s:g} s, work in {self.root}")  # fmt: skip
        code, failure, problems = EXIT_OK, "", {}
        worker = threading.Thread(target=self._work, name="soak-workload", daemon=True)
        try:
            self.state.phase = "setup"
            self._setup()
            self.state.phase = "faults"
            worker.start()
            self._chaos()
            # The workload stops first, so that the convergence time is
            # measured from the heal with nothing new being written.
            self._stop_work.set()
            worker.join(120)
            self.state.phase = "heal"
            self._heal()
            self._check_processes()
            self.state.phase = "convergence"
            self.state.converge_s = self._wait_converged(
                self.config.converge_timeout_s, "after heal"
            )
            self.state.phase = "stop"
            self._stop_all(strict=True)
            self.state.phase = "checks"
            problems = self._checks()
            if any(problems.values()):
                code = EXIT_CORRECTNESS
                failure = "; ".join(f"{k}: {v[0]}" for k, v in problems.items() if v)
        except SoakFailure as exc:
            code, failure = exc.exit_code, str(exc)
        except Exception as exc:
            code, failure = EXIT_CRASH, f"harness error in {self.state.phase}: {exc!r}"
        finally:
            self._stop_work.set()
            if worker.is_alive():
                worker.join(120)
            self._stop_all(strict=False)
            if self.host is not None:
                self.host.close()
        summary = self._summary(code, failure, problems, time.monotonic() - started)
        if code == EXIT_OK and not self.config.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        return summary, code

    def _stop_all(self, *, strict: bool) -> None:
        for proc in self.runs.values():
            rc = proc.stop()
            if strict and rc not in (0, None):
                raise SoakFailure(EXIT_CRASH, f"{proc.name} exited {rc} on SIGTERM:\n{proc.tail()}")
        if self.relay is not None:
            rc = self.relay.stop()
            if strict and rc not in (0, None):
                raise SoakFailure(EXIT_CRASH, f"relay exited {rc} on SIGTERM:\n{self.relay.tail()}")

    def _checks(self) -> dict[str, list[str]]:
        stores = [h / STORE_FILE for h in self.homes.values()] + [self.relay_db]
        return {
            "replicas_identical": checks.replicas_identical(self.homes),
            "lost_writes": checks.lost_writes(self.workload.acked, self.homes),
            "voucher_numbers_unique": checks.voucher_numbers_unique(self.homes),
            "voucher_numbers_kept": checks.voucher_numbers_kept(self.workload.issued, self.homes),
            "gap_journal_complete": checks.gap_journals_complete(self.homes),
            "relay_no_duplicates": checks.relay_duplicates(self.relay_db),
            "relay_holds_everything": checks.relay_holds_everything(
                self.relay_db, DATASET, self.homes
            ),
            "integrity_check": checks.integrity(stores),
            "conflict_indexes_true": checks.conflict_indexes_true(self.homes),
        }

    def _summary(
        self, code: int, failure: str, problems: dict[str, list[str]], wall_s: float
    ) -> dict[str, Any]:
        w = self.workload
        counts: dict[str, int] = {}
        conflicts: dict[str, int] = {}
        resolutions = 0
        if code in (EXIT_OK, EXIT_CORRECTNESS):
            with Node.open(self.homes[self.names[0]]) as node:
                shown = (
                    sorted(node.schema.collections)
                    if self.schema
                    else ("customers", "sales_invoice", "cash_receipt")
                )
                counts = {c: node.count(c) for c in shown}
                for c in node.conflicts():
                    conflicts[str(c["kind"])] = conflicts.get(str(c["kind"]), 0) + 1
                resolutions = len(node.conflicts(resolved=True))
        proxies = {
            n: {"connections": p.counters.connections, "resets": p.counters.resets,
                "refused": p.counters.refused, "bytes_up": p.counters.bytes_up,
                "bytes_down": p.counters.bytes_down}
            for n, p in self.proxies.items()
        }  # fmt: skip
        lost = problems.get("lost_writes", [])
        return {
            "verdict": VERDICTS[code],
            "exit_code": code,
            "failure": failure,
            "seed": self.config.seed,
            "replay": self.config.replay_command(),
            "duration_s": self.config.duration_s,
            "wall_s": round(wall_s, 1),
            "nodes": self.config.nodes,
            "operations": sum(w.ops.values()),
            "operations_by_kind": dict(sorted(w.ops.items())),
            "refused_by_kind": dict(sorted(w.refused.items())),
            "acknowledged_writes": len(w.acked),
            "lost_writes": checks.count_lost(lost) if "lost_writes" in problems else None,
            "faults": sum(self.state.faults.values()),
            "faults_by_kind": dict(sorted(self.state.faults.items())),
            "rebuilds_synced_later": self.state.late_first_syncs,
            "process_starts": {
                "relay": self.relay.starts if self.relay else 0,
                **{n: p.starts for n, p in self.runs.items()},
            },
            "proxies": proxies,
            "convergence_s": None
            if self.state.converge_s is None
            else round(self.state.converge_s, 2),
            "records": counts,
            "open_conflicts": conflicts,
            "resolutions": resolutions,
            "checks": {k: (v or "ok") for k, v in problems.items()},
            "workdir": str(self.root) if code != EXIT_OK or self.config.keep else None,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
        }


def run_soak(config: SoakConfig, out: Path | None = None) -> int:
    """Run ``config``, print the summary (and write it as JSON to ``out``);
    returns the exit code (``EXIT_*``)."""
    summary, code = Soak(config).run()
    print(render(summary))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"soak: summary written to {out}")
    if code != EXIT_OK:
        print(f"soak: FAILED ({summary['verdict']}); replay: {summary['replay']}")
    return code


def render(summary: dict[str, Any]) -> str:
    """The summary as a few readable lines."""
    faults = ", ".join(f"{k} {v}" for k, v in summary["faults_by_kind"].items()) or "none"
    lines = [
        f"soak {summary['verdict'].upper()} (exit {summary['exit_code']}): seed {summary['seed']}, "
        f"{summary['nodes']} nodes, {summary['duration_s']:g} s of faults, "
        f"{summary['wall_s']:g} s in all",
        f"  operations: {summary['operations']} "
        f"({', '.join(f'{k} {v}' for k, v in summary['operations_by_kind'].items())})",
        f"  acknowledged writes: {summary['acknowledged_writes']}; "
        f"lost acknowledged writes: {summary['lost_writes']}",
        f"  faults: {summary['faults']} ({faults})",
        f"  convergence after heal: {summary['convergence_s']} s",
        f"  records: {summary['records']}; open conflicts: {summary['open_conflicts']}; "
        f"resolutions: {summary['resolutions']}",
    ]
    for name, result in summary["checks"].items():
        lines.append(f"  check {name}: {'ok' if result == 'ok' else result}")
    if summary["failure"]:
        lines.append(f"  failure: {summary['failure']}")
    return "\n".join(lines)
