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

With ``relays`` > 1 several ``relay serve`` processes share the store and
every node is given all of them (``--relay`` with a comma-separated list, one
proxy per relay, in an order of its own): relay kills make the nodes fail
over. ``store`` set to a ``postgresql://`` server URL puts the relay store in
a database of the run's own (created there, dropped after a passing run) and
adds a fault: the relays' PostgreSQL connections are terminated
(``pg_terminate_backend``, as a PostgreSQL restart would cut them).

Then it heals every fault, restarts whatever is down, stops the workload and
waits (at most ``converge_timeout_s``) until every home has an empty outbox
and the same resolved records and conflicts. It stops the processes (SIGTERM)
and runs the checks of ``harness.soak.checks``.

The schedule and the workload are drawn from ``random.Random(seed)`` (two
derived generators), so a seed replays the same sequence of operations and
faults; what real processes make of it (timing, interleavings) varies.
"""

from __future__ import annotations

import contextlib
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
from urllib.parse import urlsplit, urlunsplit

from engine.node import Node
from engine.relay.pg_store import is_pg_url
from engine.relay.stores import create_store
from engine.schema import load_schema
from engine.store.node_store import STORE_FILE
from harness.net import free_port as _free_port
from harness.pg_server import PrivateServer, server_bindir

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
#: Faults of a run on PostgreSQL only (added to FAULTS there).
PG_FAULTS: dict[str, int] = {"pg_terminate": 2}
#: Faults of a run on a private PostgreSQL server (``--store private``) only.
PRIVATE_PG_FAULTS: dict[str, int] = {"pg_restart": 1}
PRIVATE = "private"


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
    relays: int = 1
    # "": a SQLite file in the work directory; a postgresql:// server URL; or
    # "private": a PostgreSQL server of the run's own, which it restarts.
    store: str = ""
    schema: Path | None = None  # a user's schema file (default: the built-in accounting)

    def replay_command(self) -> str:
        extra = f" --relays {self.relays}" if self.relays > 1 else ""
        extra += f" --store {self.store}" if self.store else ""
        return (
            f"{sys.executable} -m harness.soak --duration {self.duration_s:g} --seed {self.seed} "
            f"--nodes {self.nodes} --rate {self.rate:g} --fault-every {self.fault_every_s:g}"
            + extra
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
    rng: random.Random,
    duration_s: float,
    every_s: float,
    names: list[str],
    relays: int = 1,
    pg: bool = False,
    pg_restarts: bool = False,
) -> list[Fault]:
    """The faults of a run, drawn from ``rng`` only (a seed replays them;
    with one relay on SQLite, as it always did). ``pg_restarts``: the run
    owns its PostgreSQL server and may stop and start it."""
    faults = FAULTS | PG_FAULTS if pg else FAULTS
    faults = faults | PRIVATE_PG_FAULTS if pg and pg_restarts else faults
    kinds, weights = list(faults), list(faults.values())
    out: list[Fault] = []
    t = rng.expovariate(1 / every_s)
    while t < duration_s:
        kind = rng.choices(kinds, weights)[0]
        if kind == "kill_relay":
            target = f"relay{rng.randrange(relays)}" if relays > 1 else "relay"
            fault = Fault(t, kind, [target], rng.uniform(0.2, 3.0))
        elif kind == "pg_terminate":
            fault = Fault(t, kind, ["postgresql"], 0.0)
        elif kind == "pg_restart":
            fault = Fault(t, kind, ["postgresql"], rng.uniform(0.5, 6.0))
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
    pg_backends_terminated: int = 0  # relays' PostgreSQL connections cut (pg_terminate)
    pg_restarts: int = 0  # the private PostgreSQL server stopped and started (pg_restart)


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
        self.pg_server: PrivateServer | None = None
        if config.store == PRIVATE:
            bindir = server_bindir()
            if bindir is None:
                raise SoakFailure(EXIT_CRASH, "--store private needs PostgreSQL's initdb")
            self.pg_server = PrivateServer(bindir, _free_port())
        self.pg_admin = (
            self.pg_server.url
            if self.pg_server is not None
            else config.store
            if is_pg_url(config.store)
            else ""
        )
        # A database of the run's own; its connections are told apart by name.
        self.pg_name = f"bl_soak_{random.SystemRandom().getrandbits(32):08x}"
        self.relay_store = (
            _pg_database(self.pg_admin, self.pg_name, f"?application_name={self.pg_name}")
            if self.pg_admin
            else str(self.relay_db)
        )
        self.cli = _cli()
        self.state = SoakState()
        self.relay_ports = [_free_port() for _ in range(config.relays)]
        self.proxies: dict[str, list[FaultProxy]] = {}  # per node: one per relay
        self.host: ProxyHost | None = None
        self.relays: list[Proc] = []
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
        if self.pg_server is not None:
            self.pg_server.init()
            self.pg_server.start()
        if self.pg_admin:
            _pg_admin(self.pg_admin, f'CREATE DATABASE "{self.pg_name}"')
        with contextlib.closing(create_store(self.relay_store)) as store:
            tokens = {n: store.enroll(DATASET, n).token for n in self.names}
        self.tokens = tokens
        self.host = ProxyHost(self.proxy_rng)
        for n in self.names:
            self.proxies[n] = [self.host.add(port) for port in self.relay_ports]
            Node.create(
                self.homes[n],
                dataset=DATASET,
                node=n,
                relay=self._url(n),
                token=tokens[n],
                schema=self.schema or "accounting",
            ).close()
        several = len(self.relay_ports) > 1
        for i, port in enumerate(self.relay_ports):
            self.relays.append(
                Proc(
                    f"relay{i}" if several else "relay",
                    [*self.cli, "relay", "serve", self.relay_store, "--port", str(port)],
                    self.root / (f"relay{i}.log" if several else "relay.log"),
                )
            )
            self._start_relay(self.relays[-1])
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

    def _url(self, name: str) -> str:
        """The node's relay setting: its proxy to every relay, starting from
        one of its own (so the nodes spread over the relays)."""
        proxies = self.proxies[name]
        first = self.names.index(name) % len(proxies)
        turn = proxies[first:] + proxies[:first]
        return ",".join(f"ws://127.0.0.1:{p.port}/" for p in turn)

    def _start_relay(self, relay: Proc) -> None:
        relay.start()
        port = self.relay_ports[self.relays.index(relay)]
        deadline = time.monotonic() + 30
        while not _listening(port):
            if not relay.running or time.monotonic() > deadline:
                raise SoakFailure(
                    EXIT_CRASH, f"{relay.name} did not start listening:\n{relay.tail()}"
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
        assert self.host is not None
        kind = fault.kind
        self.state.faults[kind] += 1
        if kind == "kill_relay":
            relay = next(r for r in self.relays if r.name == fault.targets[0])
            relay.kill()
            return [(fault.hold_s, partial(self._restart_relay, relay))]
        if kind == "pg_restart":
            assert self.pg_server is not None
            if not self.pg_server.running:
                return []
            self.pg_server.stop()
            self.state.pg_restarts += 1
            return [(fault.hold_s, self._start_pg)]
        if kind == "pg_terminate":
            if self.pg_server is not None and not self.pg_server.running:
                return []  # a restart holds: nothing to cut
            cut = _pg_admin(
                self.pg_admin,
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = %s",
                self.pg_name,
            )
            self.state.pg_backends_terminated += cut
            return []
        if kind == "kill_node":
            proc = self.runs[fault.targets[0]]
            proc.kill()
            return [(fault.hold_s, partial(self._restart, proc))]
        if kind == "rebuild_node":
            self._rebuild(fault.targets[0])
            return []
        undo: list[tuple[float, Callable[[], None]]] = []
        for name, proxy in ((n, p) for n in fault.targets for p in self.proxies[n]):
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
            url = self._url(name)
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
            for proxy in self.proxies[name]:
                self.host_call(proxy.resume)

    def _unrefuse(self, name: str) -> None:
        self._refuse_depth[name] -= 1
        if self._refuse_depth[name] <= 0:
            self._refuse_depth[name] = 0
            for proxy in self.proxies[name]:
                self.host_call(partial(proxy.refuse, False))

    def _start_pg(self) -> None:
        if self.pg_server is not None and not self.pg_server.running:
            self.pg_server.start()

    def _restart(self, proc: Proc) -> None:
        if not proc.running:
            proc.start()

    def _restart_relay(self, relay: Proc) -> None:
        if not relay.running:
            self._start_relay(relay)

    def _check_processes(self) -> None:
        for proc in [*self.relays, *self.runs.values()]:
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
        plan = schedule(
            self.fault_rng,
            self.config.duration_s,
            self.config.fault_every_s,
            names,
            relays=self.config.relays,
            pg=bool(self.pg_admin),
            pg_restarts=self.pg_server is not None,
        )
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
        assert self.host is not None
        for proxy in (p for ps in self.proxies.values() for p in ps):
            self.host.call(proxy.heal)
        self._cut_depth.clear()
        self._refuse_depth.clear()
        self._start_pg()
        for relay in self.relays:
            self._restart_relay(relay)
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
        where = f"PostgreSQL database {self.pg_name}" if self.pg_admin else "SQLite"
        self.say(f"soak: seed {self.config.seed}, {self.config.nodes} nodes, "
                 f"{self.config.relays} relay(s) on {where}, "
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
            if self.pg_admin and self.pg_server is None:
                _pg_admin(self.pg_admin, f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)')
        if self.pg_server is not None and (code == EXIT_OK or not self.config.keep):
            self.pg_server.remove()
        return summary, code

    def _stop_all(self, *, strict: bool) -> None:
        for proc in self.runs.values():
            rc = proc.stop()
            if strict and rc not in (0, None):
                raise SoakFailure(EXIT_CRASH, f"{proc.name} exited {rc} on SIGTERM:\n{proc.tail()}")
        for relay in self.relays:
            rc = relay.stop()
            if strict and rc not in (0, None):
                raise SoakFailure(
                    EXIT_CRASH, f"{relay.name} exited {rc} on SIGTERM:\n{relay.tail()}"
                )

    def _checks(self) -> dict[str, list[str]]:
        stores = [h / STORE_FILE for h in self.homes.values()]
        stores += [] if self.pg_admin else [self.relay_db]
        return {
            "replicas_identical": checks.replicas_identical(self.homes),
            "lost_writes": checks.lost_writes(self.workload.acked, self.homes),
            "voucher_numbers_unique": checks.voucher_numbers_unique(self.homes),
            "voucher_numbers_kept": checks.voucher_numbers_kept(self.workload.issued, self.homes),
            "gap_journal_complete": checks.gap_journals_complete(self.homes),
            "relay_no_duplicates": checks.relay_duplicates(self.relay_store),
            "relay_holds_everything": checks.relay_holds_everything(
                self.relay_store, DATASET, self.homes
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
            n: {key: sum(getattr(p.counters, key) for p in ps)
                for key in ("connections", "resets", "refused", "bytes_up", "bytes_down")}
            for n, ps in self.proxies.items()
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
            "relays": self.config.relays,
            "store": (
                f"postgresql (database {self.pg_name}"
                + (", a private server it restarts)" if self.pg_server else ")")
                if self.pg_admin
                else "sqlite"
            ),
            "operations": sum(w.ops.values()),
            "operations_by_kind": dict(sorted(w.ops.items())),
            "refused_by_kind": dict(sorted(w.refused.items())),
            "acknowledged_writes": len(w.acked),
            "lost_writes": checks.count_lost(lost) if "lost_writes" in problems else None,
            "faults": sum(self.state.faults.values()),
            "faults_by_kind": dict(sorted(self.state.faults.items())),
            "rebuilds_synced_later": self.state.late_first_syncs,
            "pg_backends_terminated": self.state.pg_backends_terminated,
            "pg_restarts": self.state.pg_restarts,
            "process_starts": {
                **{r.name: r.starts for r in self.relays},
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


def _pg_database(server: str, database: str, query: str = "") -> str:
    """``server`` (a postgresql:// URL) naming ``database`` instead, with ``query``."""
    parts = urlsplit(server)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", "", "")) + query


def _pg_admin(server: str, sql: str, *args: object) -> int:
    """Run one statement on ``server`` (autocommit); the first column of its
    first row when it returns one, else 0."""
    import psycopg

    with psycopg.connect(server, autocommit=True, connect_timeout=10) as conn:
        cur = conn.execute(sql.encode(), args or None)
        row = cur.fetchone() if cur.description else None
        return int(row[0]) if row else 0


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
        f"{summary['nodes']} nodes, {summary['relays']} relay(s) on {summary['store']}, "
        f"{summary['duration_s']:g} s of faults, "
        f"{summary['wall_s']:g} s in all",
        f"  operations: {summary['operations']} "
        f"({', '.join(f'{k} {v}' for k, v in summary['operations_by_kind'].items())})",
        f"  acknowledged writes: {summary['acknowledged_writes']}; "
        f"lost acknowledged writes: {summary['lost_writes']}",
        f"  faults: {summary['faults']} ({faults})"
        + (
            f"; PostgreSQL restarts: {summary['pg_restarts']}" if summary.get("pg_restarts") else ""
        ),
        f"  convergence after heal: {summary['convergence_s']} s",
        f"  records: {summary['records']}; open conflicts: {summary['open_conflicts']}; "
        f"resolutions: {summary['resolutions']}",
    ]
    for name, result in summary["checks"].items():
        lines.append(f"  check {name}: {'ok' if result == 'ok' else result}")
    if summary["failure"]:
        lines.append(f"  failure: {summary['failure']}")
    return "\n".join(lines)
