"""One simulated world: a relay and a few nodes on one thread, virtual time,
a seeded network and a seeded nemesis.

Everything real is used as it is: ``Node`` on real SQLite homes, the
``SyncDriver`` and ``ClientSession`` on the node side, the relay core
(``RelayHub``, the same object the asyncio server drives), its
``StoreRunner`` and ``SqliteRelayStore`` on the relay side. Only the event
loop, the sockets and the wall clock are replaced: ``SimRelay`` drives the
core synchronously (hello and lease answered as their frame arrives, sync
requests right after, a group commit once per tick), so every frame a node
sees is one the server would have sent for the same inputs.

With the simulator's own schema, a run may also have an app writing SQL
(drawn from a generator of its own, so other seeds play as they did): each
node captures ``customers`` from an app table (engine.capture) that the app
inserts into, updates and deletes from directly, crashes or not; in half of
those runs it also saves rows without their code (refused) and later gives
some a code. After healing, every queue is empty, exactly the rows without
a code are quarantined, and every node's table shows the same rows with a
code, each key's record.

A run has two phases. **Safety**: a random workload while the faults chosen
for this seed (swarm testing: each kind on or off, with a random intensity)
hit the network, the nodes and the relay; a node may also lose its disk and
be rebuilt from an export (the one it wrote as its disk failed, or its last
backup export) as docs/operations.md says. **Heal**: faults off, every node
up; the nodes must converge within a bounded number of ticks. Then the
checks (``check``) run; a failure raises ``SimFailure`` with a kind that
maps to a distinct exit code.
"""

from __future__ import annotations

import random
import re
import shutil
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.clock import ManualClock
from engine.errors import (
    BranchlineError,
    UserError,
)
from engine.exchange import export_to_file, import_from_file
from engine.node import Node
from engine.protocol import SessionState
from engine.relay.hub import HubLimits, RelayHub
from engine.relay.runner import StoreRunner
from engine.relay.sqlite_store import SqliteRelayStore
from engine.schema import GAPS, parse_schema
from engine.series import PROVISIONAL_TEMPLATE
from engine.store import NodeStore
from engine.sync import SyncDriver

from ..soak.checks import gap_journal_problems
from .order import OrderedSession, OrderLedger
from .schema_workload import SchemaWorkload

TICK_MS = 20
START_MS = 1_790_000_000_000  # 2026-09-21, a fixed day: periods do not depend on today
DATASET = "sim"
HEAL_TICKS = 3_000  # 60 s of virtual time to converge once faults stop

SCHEMA = """
schema = "sim"
version = 1

[collections.customers]
fields.code = { type = "text", required = true }
fields.name = "text"
fields.note = "text"

[collections.items]
fields.code = { type = "text", required = true }
fields.price = "decimal"

[collections.sales]
kind = "voucher"
partition = "month"
on_duplicate = "renumber"
series = { prefix = "HD", strategy = "node" }
fields.date = { type = "date", required = true }
fields.customer = { type = "ref", to = "customers", required = true }
fields.lines.type = "lines"
fields.lines.fields = { item = { type = "ref", to = "items" }, qty = "decimal" }

[collections.receipts]
kind = "voucher"
series.prefix = "PT"
series.strategy = "blocks"
series.template = "{prefix}{seq:06}"
series.reserve = 4
series.block_size = 5
fields.customer = { type = "ref", to = "customers", required = true }
fields.amount = "decimal"
"""
CODES = ("K1", "K2", "K3", "K4")
ITEMS = ("T1", "T2")
DATES = ("2026-09-02", "2026-09-21", "2026-10-01")
FINAL_RECEIPT = re.compile(r"^PT\d{6}\Z")  # provisional numbers look like PT-N0-P000001
FINAL_SALE = re.compile(r"^HDN\d+-\d{6}\Z")  # provisional: HD-N0-P000001
#: In runs with urgent receipts: receipts marked ``rush`` go up first.
URGENT_RECEIPTS = '[collections.receipts]\nurgent_when = { rush = true }\nfields.rush = "bool"\n'
#: The app table captured into ``customers`` in runs with an app writing SQL.
APP_TABLE = "app_customers"
APP_TABLE_SQL = f"CREATE TABLE IF NOT EXISTS {APP_TABLE} (code TEXT UNIQUE, name TEXT, note TEXT)"


class SimFailure(Exception):
    """A run broke an invariant: ``kind`` is ``crash``, ``liveness`` or ``correctness``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Faults:
    """The faults of one run (swarm testing: each kind is on or off)."""

    loss: float = 0.0  # per message
    duplication: float = 0.0  # per message
    reorder: float = 0.0  # per message: delivered late, after later ones
    max_delay_ticks: int = 0
    partitions: float = 0.0  # per tick: a partition starts
    node_crashes: float = 0.0  # per tick and node
    relay_crashes: float = 0.0  # per tick
    skew_ms: tuple[int, ...] = ()  # per node
    rebuilds: float = 0.0  # per tick and node: its disk is lost, it is rebuilt from an export

    @classmethod
    def draw(cls, rng: random.Random, nodes: int) -> Faults:
        def on(p: float) -> bool:
            return rng.random() < p

        return cls(
            loss=rng.uniform(0, 0.3) if on(0.5) else 0.0,
            duplication=rng.uniform(0, 0.5) if on(0.5) else 0.0,
            reorder=rng.uniform(0, 0.3) if on(0.5) else 0.0,
            max_delay_ticks=rng.randint(1, 10) if on(0.6) else 0,
            partitions=rng.uniform(0.002, 0.02) if on(0.5) else 0.0,
            node_crashes=rng.uniform(0.001, 0.01) if on(0.5) else 0.0,
            relay_crashes=rng.uniform(0.001, 0.006) if on(0.4) else 0.0,
            skew_ms=tuple(
                rng.randint(-3_600_000, 3_600_000) if on(0.5) else 0 for _ in range(nodes)
            ),
        )

    def with_rebuilds(self, rng: random.Random) -> Faults:
        """These faults plus disk losses, drawn from their own generator so
        that adding them left every earlier seed's schedule as it was."""
        return replace(self, rebuilds=rng.uniform(0.0005, 0.003) if rng.random() < 0.35 else 0.0)

    def describe(self) -> str:
        parts = [
            f"{name}={value:.3f}" if isinstance(value, float) else f"{name}={value}"
            for name, value in vars(self).items()
            if value and name != "skew_ms"
        ]
        skewed = sum(1 for s in self.skew_ms if s)
        return ", ".join(parts + ([f"skewed_nodes={skewed}"] if skewed else [])) or "none"


@dataclass
class Link:
    """One connection: frames in flight each way as (due tick, order, frame)."""

    id: int
    up: list[tuple[int, int, bytes]] = field(default_factory=list)
    down: list[tuple[int, int, bytes]] = field(default_factory=list)
    closed: bool = False
    reordered: bool = False  # a frame arrived after one sent later (either way)
    delivered: dict[int, int] = field(default_factory=dict)  # queue id -> last order


@dataclass
class Stats:
    ticks: int = 0
    ops: int = 0
    acked_writes: int = 0
    followed: int = 0  # updates a relay read back from another relay's commits
    urgent_passes: int = 0  # passes that sent urgent documents, then others (checked order)
    faults: Counter[str] = field(default_factory=Counter)


class Network:
    """Seeded delivery with loss, duplication, delay and reordering.

    A lost frame resets its connection: websockets run over TCP, which never
    drops a frame and carries on. Duplicated and reordered frames are
    delivered as such (a hostile or broken middlebox): the sessions must
    detect them or shrug them off."""

    def __init__(self, rng: random.Random, faults: Faults, stats: Stats) -> None:
        self.rng = rng
        self.faults = faults
        self.stats = stats
        self.active = True
        self._order = 0

    def send(
        self, link: Link, queue: list[tuple[int, int, bytes]], tick: int, frames: list[bytes]
    ) -> None:
        f = self.faults if self.active else Faults()
        for frame in frames:
            if f.loss and self.rng.random() < f.loss:
                self.stats.faults["message lost (connection reset)"] += 1
                link.closed = True
                return
            copies = 1
            if f.duplication and self.rng.random() < f.duplication:
                self.stats.faults["message duplicated"] += 1
                copies = 2
            for _ in range(copies):
                delay = self.rng.randint(0, f.max_delay_ticks) if f.max_delay_ticks else 0
                if f.reorder and self.rng.random() < f.reorder:
                    self.stats.faults["message reordered"] += 1
                    delay += self.rng.randint(1, 5)
                self._order += 1
                queue.append((tick + 1 + delay, self._order, frame))

    @staticmethod
    def due(link: Link, queue: list[tuple[int, int, bytes]], tick: int) -> list[bytes]:
        """Frames of ``link``'s ``queue`` due by ``tick``; notes on the link
        when one arrives after a frame sent later."""
        ready = sorted(item for item in queue if item[0] <= tick)
        if ready:
            queue[:] = [item for item in queue if item[0] > tick]
            last = link.delivered.get(id(queue), 0)
            for _, order, _ in ready:
                link.reordered = link.reordered or order < last
                last = max(last, order)
            link.delivered[id(queue)] = last
        return [frame for _, _, frame in ready]


class NodeCrashed(BaseException):
    """A node's process died at one of its store's commit points. Not an
    Exception: no handler in the node's own code may take it for an error it
    can handle and go on."""

    def __init__(self, node: str, point: str) -> None:
        super().__init__(f"{node} crashed at {point}")
        self.node, self.point = node, point


#: "mid_materialize" lands inside the bulk apply of received updates too.
COMMIT_POINTS = ("before_commit", "mid_materialize", "after_commit")


def _crash_at(node: str, point: str) -> Callable[[str], None]:
    def hook(at: str) -> None:
        if at == point:
            raise NodeCrashed(node, point)

    return hook


class SimRelay:
    """The relay: the real core (``RelayHub``) and store runner over a real
    ``SqliteRelayStore``, driven synchronously on the simulator's clock. The
    simulator's links stand in for the server's sockets: hello and lease
    calls are answered as their frame arrives, sync requests right after,
    and updates are group-committed once per tick (``commit``)."""

    def __init__(self, path: Path, limits: HubLimits | None = None, *, create: bool = True) -> None:
        self.path = path
        self.limits = limits or HubLimits()
        opened = SqliteRelayStore.create(path) if create else SqliteRelayStore.open(path)
        self.store: SqliteRelayStore | None = opened
        self.now_ms = START_MS
        self.hub = RelayHub(self.limits)
        self.runner = StoreRunner(self.store, now_s=self._now_s)
        self.links: dict[int, tuple[int, Link]] = {}  # link id -> (core connection, link)
        #: Crash in the next group commit, once the store has committed the
        #: batch and before any ack or fan-out leaves.
        self.crash_in_commit = False

    @property
    def up(self) -> bool:
        return self.store is not None

    def _now_s(self) -> float:
        return self.now_ms / 1000

    def connect(self, link: Link, now_ms: int) -> None:
        self.now_ms = now_ms
        self.links[link.id] = (self.hub.connect(now_ms, f"link {link.id}"), link)

    def receive(self, link: Link, frame: bytes) -> None:
        entry = self.links.get(link.id)
        if entry is None or self.store is None:
            return
        hub, runner, cid = self.hub, self.runner, entry[0]
        for call in hub.receive(cid, frame, self.now_ms):
            hub.answer(call, runner.run(call))
        while (diff := hub.next_sync(cid)) is not None:
            hub.answer(diff, runner.diff(diff))

    def commit(self) -> bool:
        """Group commit of everything received this tick, then acks and
        fan-out. True when it crashed in it (``crash_in_commit``)."""
        if self.store is None:
            return False
        while (batch := self.hub.take_batch()) is not None:
            outcome = self.runner.commit(batch)
            if self.crash_in_commit:
                self.crash_in_commit = False
                self.crash()  # stored, never acknowledged: the nodes send it again
                return True
            self.hub.settle(batch, outcome)
        return False

    def follow(self) -> int:
        """Read what other relays on the store committed to the datasets
        this relay has connections of, and fan it out (as the server's
        follower does when the store wakes it); how many it fanned out."""
        if self.store is None:
            return 0
        hub = self.hub
        before = hub.metrics.updates_followed
        for dataset in hub.followed():
            while (call := hub.follow(dataset)) is not None:
                hub.remote_committed(call, self.runner.follow(call))
                if not hub.behind(dataset):
                    break
        return hub.metrics.updates_followed - before

    def tick(self, now_ms: int) -> None:
        self.now_ms = now_ms
        self.hub.tick(now_ms)

    def outgoing(self) -> list[tuple[Link, list[bytes], bool]]:
        out = []
        for link_id, (cid, link) in list(self.links.items()):
            frames = self.hub.data_to_send(cid)
            done = self.hub.closed(cid)
            out.append((link, frames, done))
            if done:
                self.drop(link_id)
        return out

    def drop(self, link_id: int) -> None:
        entry = self.links.pop(link_id, None)
        if entry is not None:
            self.hub.disconnect(entry[0])

    def crash(self) -> None:
        """Everything in memory is gone (unacknowledged updates too); the file stays."""
        for _, link in self.links.values():
            link.closed = True
        self.links.clear()
        self.hub = RelayHub(self.limits)
        if self.store is not None:
            self.store.close()
        self.store = None

    def restart(self) -> None:
        self.store = SqliteRelayStore.open(self.path)
        self.runner = StoreRunner(self.store, now_s=self._now_s)


@dataclass
class SimNode:
    name: str
    home: Path
    token: str
    clock: ManualClock
    seed: int
    node: Node | None = None
    driver: SyncDriver | None = None
    link: Link | None = None
    down_until: int = 0  # crashed until this tick
    retry_at: int = 0  # next connection attempt
    failures: int = 0  # connection failures in a row (backoff)
    backup: Path | None = None  # its last backup export (export --unsynced)
    lives: int = 1  # homes it has had (rebuilds + 1)
    at: int = 0  # the relay it connects to (several relays: it moves between them)


class World:
    """``relays`` relays on one store and ``nodes`` nodes; ``run`` plays one
    seed. With several relays, each node connects to one, moves to another
    now and then when it reconnects, and each relay crashes on its own; the
    relays' choices come from a generator of their own, so a seed with one
    relay plays as it always did."""

    def __init__(
        self,
        seed: int,
        nodes: int = 3,
        ops: int = 120,
        workdir: Path | None = None,
        relays: int = 1,
        schema: tuple[str, str] | None = None,
        urgent: bool | None = None,
        bad_rows: bool | None = None,
    ):
        """``schema``: (TOML text, where it came from) of a user's schema to
        run on instead of the simulator's own; records are then generated
        from its fields (harness.sim.schema_workload). ``urgent``: whether
        receipts can be urgent (None: drawn from the seed; False replays a
        seed found before urgent receipts existed as it played then).
        ``bad_rows``: whether the app also writes rows the schema refuses
        (None: drawn; False as for ``urgent``)."""
        if relays < 1:
            raise ValueError(f"relays must be at least 1, got {relays}")
        self.seed = seed
        self.rng = random.Random(seed)
        self.ops = ops
        self.tick = 0
        self.stats = Stats()
        # Disk losses have a generator of their own (see Faults.with_rebuilds).
        self.disk_rng = random.Random(f"disks-{seed}")
        self.faults = Faults.draw(self.rng, nodes).with_rebuilds(self.disk_rng)
        self.net = Network(random.Random(self.rng.getrandbits(64)), self.faults, self.stats)
        self._own_dir = workdir is None
        # In memory where the OS offers it: fsync there costs nothing, and a
        # simulated crash drops the objects, not the page cache, anyway.
        shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix=f"branchline-sim-{seed}-", dir=shm))
        path = self.dir / "relay.db"
        self.relays = [SimRelay(path, create=i == 0) for i in range(relays)]
        self.relay_rng = random.Random(f"relays-{seed}")
        self.relay = self.relays[0]  # enrolls the nodes; the checks read its file
        assert self.relay.store is not None
        # Urgent receipts (issue 15), with a generator of their own: a run
        # without them plays as it did before they existed.
        self.urgent_rng = random.Random(f"urgent-{seed}")
        drawn = self.urgent_rng.random() < 0.5
        self.urgent = schema is None and (drawn if urgent is None else urgent)
        self.order = OrderLedger()
        own = SCHEMA.replace("[collections.receipts]\n", URGENT_RECEIPTS) if self.urgent else SCHEMA
        text, origin = schema or (own, "simulator schema")
        self.schema = parse_schema(text, origin=origin)
        # Its own generator: the simulator's schema keeps its seeds' streams.
        self.custom = (
            SchemaWorkload(self.schema, random.Random(f"workload-{seed}")) if schema else None
        )
        # An app writing SQL (engine.capture), with a generator of its own.
        self.app_rng = random.Random(f"app-{seed}")
        self.app = self.custom is None and self.app_rng.random() < 0.4
        # Rows without their code (refused: a failing item), and their fixing,
        # from a generator of their own too.
        self.bad_rng = random.Random(f"bad-rows-{seed}")
        drawn = self.bad_rng.random() < 0.5
        self.bad_rows = self.app and (drawn if bad_rows is None else bad_rows)
        self.nodes: list[SimNode] = []
        for i in range(nodes):
            name = f"N{i}"
            token = self.relay.store.enroll(DATASET, name).token
            clock = ManualClock(START_MS + (self.faults.skew_ms[i] if self.faults.skew_ms else 0))
            sim = SimNode(name, self.dir / name, token, clock, self.rng.getrandbits(64))
            sim.node = Node.create(
                sim.home,
                dataset=DATASET,
                node=name,
                schema=self.schema,
                clock=clock,
                rng=random.Random(sim.seed),
            )
            self._capture(sim)
            self.nodes.append(sim)
        self._links = 0
        self.partitioned: set[str] = set()
        self.partition_until = 0
        self.relay_back = [0] * relays  # tick at which each crashed relay restarts
        self.acked: dict[str, str] = {}  # record id -> collection, as returned to a caller
        # Voucher id -> (number, provisional) as post_voucher returned it, for
        # series numbers (not typed by hand).
        self.issued: dict[str, tuple[str, bool]] = {}
        # Records whose last changes may have gone with a lost disk (not in
        # the export it was rebuilt from, maybe never acknowledged).
        self.excused: set[str] = set()
        if self.custom is not None:
            first = self.nodes[0].node
            assert first is not None
            for written in self.custom.seed(first):
                self._acked(written.collection, written.id)

    @staticmethod
    def check_schema(text: str, origin: str) -> None:
        """Raises SchemaError when ``text`` is no schema the simulator can run."""
        parse_schema(text, origin=origin)

    # -- running -------------------------------------------------------------------

    def run(self) -> Stats:
        """Safety phase, heal phase, checks. Raises SimFailure."""
        try:
            self.safety()
            self.heal()
            self.check()
            self.stats.urgent_passes = self.order.passes
            return self.stats
        except SimFailure:
            raise
        except Exception as exc:
            raise SimFailure("crash", f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.close()

    def safety(self) -> None:
        """The workload under this run's faults, spread over about 30 s."""
        per_op = max(1, 1500 // self.ops)
        while self.stats.ops < self.ops:
            if self.tick % per_op == 0:
                self._guarded(self._operate)
                if self.app:
                    self._app_write()
            self._guarded(self._nemesis)
            self._guarded(self._step)

    def _guarded(self, part: Callable[[], None]) -> None:
        """Run ``part``; a node that crashes at a commit point meanwhile is
        dropped as a killed process is (no close, the rest of the tick
        skipped): what was committed stays, the rest is gone."""
        try:
            part()
        except NodeCrashed as crash:
            sim = next(s for s in self.nodes if s.name == crash.node)
            self._disconnect(sim)
            if sim.node is not None:
                sim.node.store.close()
            sim.node = None
            sim.down_until = self.tick + self.rng.randint(1, 100)
            self.stats.faults[f"node crash {crash.point.replace('_', ' ')}"] += 1

    def close(self) -> None:
        for sim in self.nodes:
            if sim.node is not None:
                sim.node.close()
                sim.node = None
        for relay in self.relays:
            if relay.store is not None:
                relay.store.close()
                relay.store = None
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _step(self) -> None:
        self.tick += 1
        self.stats.ticks += 1
        now = START_MS + self.tick * TICK_MS
        for sim in self.nodes:
            sim.clock.advance(TICK_MS)
        if self.tick >= self.partition_until:
            self.partitioned.clear()
        for sim in self.nodes:
            self._node_step(sim, now)
        for relay in self.relays:
            if relay.up:
                relay.tick(now)
                self._send_down(relay)
                if relay.commit():
                    self.stats.faults["relay crash in a group commit"] += 1
                    if len(self.relays) == 1:
                        return
                    continue
                self._send_down(relay)
        if len(self.relays) > 1:
            for relay in self.relays:
                self.stats.followed += relay.follow()
                self._send_down(relay)

    def _send_down(self, relay: SimRelay) -> None:
        for link, frames, done in relay.outgoing():
            self.net.send(link, link.down, self.tick, frames)
            if done:
                link.closed = True

    def _node_step(self, sim: SimNode, now: int) -> None:
        if sim.node is None:
            if self.tick >= sim.down_until:
                sim.node = Node.open(
                    sim.home, clock=sim.clock, rng=random.Random(sim.seed + self.tick)
                )
            else:
                return
        if self.app:
            sim.node.drain_captured()  # what node run's capture pump does
        if sim.link is None or sim.driver is None:
            if self.tick >= sim.retry_at:
                self._connect(sim, now)
            return
        link, driver = sim.link, sim.driver
        relay = self.relays[sim.at]
        cut = sim.name in self.partitioned or not relay.up or link.closed
        try:
            if not cut:
                for frame in self.net.due(link, link.up, self.tick):
                    relay.receive(link, frame)
                for frame in self.net.due(link, link.down, self.tick):
                    driver.receive(frame)
            driver.tick(now)
            driver.poll()
            frames = driver.data_to_send()
            # Cut off, frames wait in the link as TCP buffers them; the
            # heartbeat ends the connection if the cut lasts.
            self.net.send(link, link.up, self.tick, frames)
            if driver.synced and sim.name not in self.partitioned:
                sim.failures = 0
            if driver.session.state is SessionState.CLOSED or link.closed:
                raise _LinkDown()
        except (_LinkDown, BranchlineError):
            self._disconnect(sim)

    def _connect(self, sim: SimNode, now: int) -> None:
        assert sim.node is not None
        if len(self.relays) > 1:
            up = [i for i, r in enumerate(self.relays) if r.up]
            if sim.at not in up or self.relay_rng.random() < 0.3:
                moved = self.relay_rng.choice(up) if up else sim.at
                if moved != sim.at:
                    self.stats.faults["node moved to another relay"] += 1
                sim.at = moved
        relay = self.relays[sim.at]
        if not relay.up or sim.name in self.partitioned:
            self._backoff(sim)
            return
        self._links += 1
        link = Link(self._links)
        session = OrderedSession(
            sim.node.urgent_docs,
            lambda: not link.reordered,
            self.order,
            sim.name,
            dataset=DATASET,
            node=sim.name,
            token=sim.token,
        )
        sim.driver = SyncDriver(sim.node, session, wall_ms=sim.clock.wall_ms)
        sim.link = link
        relay.connect(link, now)
        sim.driver.tick(now)
        self.net.send(link, link.up, self.tick, sim.driver.data_to_send())

    def _disconnect(self, sim: SimNode) -> None:
        if sim.link is not None:
            self.relays[sim.at].drop(sim.link.id)
            sim.link.closed = True
        sim.link = None
        sim.driver = None
        self._backoff(sim)

    def _backoff(self, sim: SimNode) -> None:
        sim.failures += 1
        cap = min(50, 2 ** min(sim.failures, 6))  # ticks: capped exponential, with jitter
        sim.retry_at = self.tick + self.rng.randint(1, cap)

    # -- the nemesis -------------------------------------------------------------------

    def _nemesis(self) -> None:
        f = self.faults
        if f.partitions and not self.partitioned and self.rng.random() < f.partitions:
            shape = self.rng.choice(("one", "half", "all"))
            names = [s.name for s in self.nodes]
            if shape == "one":
                self.partitioned = {self.rng.choice(names)}
            elif shape == "half":
                self.partitioned = set(self.rng.sample(names, len(names) // 2 or 1))
            else:
                self.partitioned = set(names)
            self.partition_until = self.tick + self.rng.randint(10, 200)
            self.stats.faults[f"partition ({shape})"] += 1
        for sim in self.nodes:
            if sim.node is not None and f.node_crashes and self.rng.random() < f.node_crashes:
                if self.rng.random() < 0.5:
                    # At the next commit of this node: a local write, an apply
                    # of received updates (a bulk one too), an ack.
                    point = self.rng.choice(COMMIT_POINTS)
                    sim.node.store.commit_points = _crash_at(sim.name, point)
                    continue
                self._disconnect(sim)
                sim.node.close()
                sim.node = None
                sim.down_until = self.tick + self.rng.randint(1, 100)
                self.stats.faults["node crash"] += 1
        if f.rebuilds:
            for sim in self.nodes:
                if sim.node is None:
                    continue
                if self.disk_rng.random() < f.rebuilds:
                    self._rebuild(sim)
                elif self.disk_rng.random() < 0.01:
                    self._backup(sim)
        for i, relay in enumerate(self.relays):
            if relay.up and f.relay_crashes and self.rng.random() < f.relay_crashes:
                self.relay_back[i] = self.tick + self.rng.randint(1, 100)
                if self.rng.random() < 0.5:
                    relay.crash_in_commit = True  # at its next batch
                else:
                    relay.crash()
                    self.stats.faults["relay crash"] += 1
            elif not relay.up and self.tick >= self.relay_back[i]:
                relay.restart()

    def _backup(self, sim: SimNode) -> None:
        """The node's periodic backup: an unsynced export beside its home."""
        assert sim.node is not None
        path = self.dir / f"{sim.name}-backup.blx"
        export_to_file(sim.node, path, created_ms=sim.clock.wall_ms(), unsynced=True)
        sim.backup = path
        self.stats.faults["backup export"] += 1

    def _rebuild(self, sim: SimNode) -> None:
        """The node's disk is lost: a new home of the same node id (not new:
        its numbering is unconfirmed) imports the export written as the disk
        failed or, half the time, the last backup export (work after it that
        the relay never acknowledged is lost with the disk), and goes on."""
        node = sim.node
        assert node is not None
        self._disconnect(sim)
        from_backup = self.disk_rng.random() < 0.5
        if from_backup:
            since = sim.backup
            lost = node.store.conn.execute("SELECT DISTINCT record FROM pending_records").fetchall()
            self.excused.update(str(r[0]) for r in lost)
            # An outbox row imported from an earlier life's export that has not
            # integrated yet (it waits for changes the relay holds) names no
            # record in pending_records: it is unacknowledged work all the
            # same. Its records are found by their ids in its bytes (Yjs
            # keeps map keys as text).
            blobs = [data for _, _, data in node.outbox(limit=1_000_000)]
            self.excused.update(r for r in self.acked if any(r.encode() in b for b in blobs))
        else:
            since = self.dir / f"{sim.name}-failing.blx"
            export_to_file(node, since, created_ms=sim.clock.wall_ms(), unsynced=True)
        node.close()
        sim.node = None
        shutil.rmtree(sim.home)
        sim.lives += 1
        sim.home = self.dir / f"{sim.name}.{sim.lives}"
        sim.node = Node.create(
            sim.home,
            dataset=DATASET,
            node=sim.name,
            schema=self.schema,
            clock=sim.clock,
            rng=random.Random(sim.seed + sim.lives),
            new_node=False,
        )
        if since is not None:
            import_from_file(sim.node, since)
        self._capture(sim)  # the app's table went with the disk: it starts anew
        kind = "from its last backup" if from_backup else "from its failing disk"
        self.stats.faults[f"disk lost, rebuilt {kind}"] += 1

    # -- the workload ------------------------------------------------------------------

    def _operate(self) -> None:
        up = [s for s in self.nodes if s.node is not None]
        if not up:
            return
        sim = self.rng.choice(up)
        node = sim.node
        assert node is not None
        self.stats.ops += 1
        r = self.rng.random()
        if self.custom is not None:
            self._operate_custom(node, r)
            return
        try:
            if r < 0.3:
                coll = self.rng.choice(("customers", "items"))
                pool = CODES if coll == "customers" else ITEMS
                fields: dict[str, Any] = {"code": self.rng.choice(pool)}
                if coll == "customers":
                    fields[self.rng.choice(("name", "note"))] = f"v{self.rng.randint(0, 9)}"
                else:
                    fields["price"] = str(self.rng.randint(1, 99))
                self._acked(coll, node.put(coll, fields))
            elif r < 0.55:
                fields = {
                    "date": self.rng.choice(DATES),
                    "customer": self.rng.choice(CODES),
                    "lines": [{"item": self.rng.choice(ITEMS), "qty": str(self.rng.randint(1, 5))}],
                }
                if self.rng.random() < 0.2:
                    fields["number"] = f"TAY-{self.rng.randint(1, 3)}"  # typed by hand
                posted = node.post_voucher("sales", fields)
                if "number" not in fields:
                    self.issued[posted.id] = (posted.number, posted.provisional)
                self._acked("sales", posted.id)
            elif r < 0.7:
                fields = {"customer": self.rng.choice(CODES), "amount": "10"}
                if self.urgent and self.urgent_rng.random() < 0.5:
                    fields["rush"] = True
                self._acked("receipts", node.post_voucher("receipts", fields).id)
            elif r < 0.8:
                coll = self.rng.choice(("customers", "items", "sales"))
                live = node.list(coll)
                if live:
                    node.delete(coll, self.rng.choice(live)["id"])
            else:
                self._resolve_one(node)
        except UserError:
            pass  # a reference to a code this node has not received yet, say

    def _operate_custom(self, node: Node, r: float) -> None:
        assert self.custom is not None
        try:
            if r < 0.12:
                self._resolve_one(node)
                return
            _, written = self.custom.step(node)
            if written is not None:
                if written.issued is not None:
                    self.issued[written.id] = written.issued
                self._acked(written.collection, written.id)
        except UserError:
            pass  # a reference to a code this node has not received yet, say

    def _capture(self, sim: SimNode) -> None:
        if not self.app:
            return
        assert sim.node is not None
        with closing(self._app_conn(sim)) as conn:
            conn.execute(APP_TABLE_SQL)
        sim.node.enable_capture(APP_TABLE, "customers")

    @staticmethod
    def _app_conn(sim: SimNode) -> sqlite3.Connection:
        return sqlite3.connect(NodeStore.file_in(sim.home), isolation_level=None, timeout=30)

    def _app_write(self) -> None:
        """The app on one node writes its table directly (its node may be
        down: the change waits in the queue)."""
        rng = self.app_rng
        sim = rng.choice(self.nodes)
        code, value = rng.choice(CODES), f"app{rng.randint(0, 9)}"
        r = rng.random()
        with closing(self._app_conn(sim)) as conn:
            if not conn.execute(
                "SELECT 1 FROM sqlite_master WHERE name = ?", (APP_TABLE,)
            ).fetchone():
                return  # the node is being rebuilt: the app waits for its table
            if r < 0.4:
                conn.execute(
                    f"INSERT INTO {APP_TABLE} (code, name) VALUES (?, ?) "
                    "ON CONFLICT (code) DO NOTHING",
                    (code, value),
                )
            elif r < 0.8:
                column = rng.choice(("name", "note"))
                conn.execute(f"UPDATE {APP_TABLE} SET {column} = ? WHERE code = ?", (value, code))
            elif r < 0.9:
                conn.execute(
                    f"UPDATE OR IGNORE {APP_TABLE} SET code = ? WHERE code = ?",
                    (rng.choice(CODES), code),
                )
            else:
                conn.execute(f"DELETE FROM {APP_TABLE} WHERE code = ?", (code,))
            if self.bad_rows and self.bad_rng.random() < 0.1:
                self._bad_row(conn)
        self.stats.faults["app write to its table"] += 1

    def _bad_row(self, conn: sqlite3.Connection) -> None:
        """The app saves a customer without its code (the schema requires
        one: the change is quarantined, and nothing else may wait for it),
        or a person gives such a row a code (its change brings the whole row
        and is written)."""
        if self.bad_rng.random() < 0.7:
            conn.execute(f"INSERT INTO {APP_TABLE} (name) VALUES (?)", ("no code",))
            self.stats.faults["app row without its code"] += 1
        else:
            conn.execute(
                f"UPDATE OR IGNORE {APP_TABLE} SET code = ? WHERE rowid = "
                f"(SELECT min(rowid) FROM {APP_TABLE} WHERE code IS NULL)",
                (self.bad_rng.choice(CODES),),
            )
            self.stats.faults["app row given its code"] += 1

    def _check_app_tables(self) -> None:
        """Queues drained, quarantined exactly the rows without a code (each
        failing row held alone: the changes after it were written), every
        table the same but for those, each key shown by its record (the
        earliest created of a duplicate)."""
        shown = []
        for sim in self.nodes:
            node = sim.node
            assert node is not None
            status = node.capture_status()
            held = {f.change.row for f in node.capture_failures()}
            with closing(self._app_conn(sim)) as conn:
                bad = {
                    r[0] for r in conn.execute(f"SELECT rowid FROM {APP_TABLE} WHERE code IS NULL")
                }
                rows = conn.execute(
                    f"SELECT code, name, note FROM {APP_TABLE} WHERE code IS NOT NULL ORDER BY code"
                )
                table = [tuple(r) for r in rows]
            if status["queued"] or held != bad:
                why = [f.reason for f in node.capture_failures()][:3]
                raise SimFailure(
                    "correctness",
                    f"{sim.name} capture left {status}, rows {sorted(held)} quarantined, "
                    f"rows {sorted(bad)} without a code: {why}",
                )
            expected = []
            live = node.list("customers")
            for code in sorted({r["code"] for r in live if "alias_of" not in r}):
                record = node.get("customers", code)
                assert record is not None
                expected.append((code, record.get("name"), record.get("note")))
            if table != expected:
                raise SimFailure(
                    "correctness", f"{sim.name}'s app table differs from its records: {table}"
                )
            shown.append(table)
        if any(t != shown[0] for t in shown[1:]):
            raise SimFailure("correctness", "the app tables differ between nodes")

    def _acked(self, collection: str, rid: str) -> None:
        self.acked[rid] = collection
        self.stats.acked_writes += 1

    def _resolve_one(self, node: Node) -> None:
        open_ = [c for c in node.conflicts() if c["kind"] != "dangling_reference"]
        if not open_:
            return
        c = self.rng.choice(open_)
        if c["kind"] == "duplicate_key":
            coll = self.schema.collections[c["collection"]]
            if coll.is_voucher and coll.series is not None:
                node.resolve(c["id"], renumber=True)
            elif self.rng.random() < 0.5:
                node.resolve(c["id"], merge_into=self.rng.choice(c["records"]))
            else:
                node.resolve(c["id"], rename=f"{c['key']}-{self.rng.randint(10, 99)}")
        elif c["kind"] == "edit_delete":
            node.resolve(c["id"], keep=self.rng.choice(("delete", "edit")))
        else:
            node.resolve(c["id"], keep=self.rng.choice(c["values"])["node"])

    # -- healing and checking -------------------------------------------------------

    def heal(self) -> None:
        """Faults off, everything up; wait for convergence (SimFailure
        ``liveness`` when it does not come within HEAL_TICKS)."""
        self.net.active = False
        self.partitioned.clear()
        for relay in self.relays:
            relay.crash_in_commit = False
            if not relay.up:
                relay.restart()
        for sim in self.nodes:
            sim.down_until = 0
            sim.retry_at = min(sim.retry_at, self.tick + 1)
            if sim.node is not None:
                sim.node.store.commit_points = None  # faults are over
        quiet = 0
        for _ in range(HEAL_TICKS):
            self._step()
            if self._converged():
                quiet += 1
                if quiet >= 5:
                    return
            else:
                quiet = 0
        states = {s.name: (s.driver.synced if s.driver else None) for s in self.nodes}
        raise SimFailure("liveness", f"no convergence {HEAL_TICKS} ticks after healing: {states}")

    def _converged(self) -> bool:
        if any(s.node is None or s.driver is None or not s.driver.synced for s in self.nodes):
            return False
        first, *rest = (self._snapshot(s) for s in self.nodes)
        return all(first == other for other in rest)

    def _snapshot(self, sim: SimNode) -> Any:
        node = sim.node
        assert node is not None
        node.refresh()
        return (
            {c: node.list(c) for c in sorted(self.schema.collections)},
            node.conflicts(),
            node.conflicts(resolved=True),
        )

    def check(self) -> None:
        """After healing: the invariants. Raises SimFailure("correctness", ...)."""
        if self.order.problems:
            raise SimFailure("correctness", f"urgent records not first: {self.order.problems[0]}")
        first = self._snapshot(self.nodes[0])
        for sim in self.nodes[1:]:
            if self._snapshot(sim) != first:
                raise SimFailure("correctness", f"{sim.name} differs from N0 after healing")
        for sim in self.nodes:
            assert sim.node is not None
            held = {r[0] for r in sim.node.store.conn.execute("SELECT id FROM records").fetchall()}
            lost = sorted(set(self.acked) - held - self.excused)
            if lost:
                raise SimFailure(
                    "correctness", f"{sim.name} lacks {len(lost)} acknowledged writes: {lost[:3]}"
                )
        if self.custom is None:
            receipts = first[0]["receipts"]
            numbers = [r["number"] for r in receipts if FINAL_RECEIPT.match(r["number"])]
            clash = [n for n, k in Counter(numbers).items() if k > 1]
            if clash:
                raise SimFailure("correctness", f"blocks numbers used twice: {clash[:5]}")
            self._check_numbers(first[0]["sales"])
        else:
            self._check_series()
        self._check_gaps()
        if self.app:
            self._check_app_tables()
        renumbered: dict[str, set[str]] = {}
        for entry in first[2]:
            if entry.get("action") == "renumber" and entry.get("auto"):
                renumbered.setdefault(entry["record"], set()).add(entry["node"])
        twice = {rid: nodes for rid, nodes in renumbered.items() if len(nodes) > 1}
        if twice:
            raise SimFailure(
                "correctness", f"vouchers renumbered automatically by several nodes: {twice}"
            )
        conn = sqlite3.connect(f"file:{self.relay.path}?mode=ro", uri=True)
        try:
            dupes = conn.execute(
                "SELECT COUNT(*) FROM (SELECT 1 FROM updates GROUP BY dataset_id, doc, data "
                "HAVING COUNT(*) > 1)"
            ).fetchone()[0]
        finally:
            conn.close()
        if dupes:
            raise SimFailure("correctness", f"the relay stored {dupes} updates twice")

    def _check_numbers(self, sales: list[dict[str, Any]]) -> None:
        """No series number issued twice, none changed after it was issued
        as final, every provisional number finalized once synced."""
        node = self.nodes[0].node
        assert node is not None
        rows = node.store.conn.execute(
            "SELECT id, key, deleted FROM records WHERE collection = 'sales'"
        ).fetchall()
        numbers = [str(key) for _, key, _ in rows if key and FINAL_SALE.match(str(key))]
        twice = [n for n, k in Counter(numbers).items() if k > 1]
        if twice:
            raise SimFailure("correctness", f"node numbers used twice: {twice[:5]}")
        now = {str(rid): str(key) for rid, key, _ in rows}
        for rid, (number, provisional) in self.issued.items():
            if rid in self.excused or rid not in now:
                continue
            if not provisional and now[rid] != number:
                raise SimFailure(
                    "correctness", f"voucher {rid} was issued {number}, now numbered {now[rid]}"
                )
        left = [r["number"] for r in sales if not FINAL_SALE.match(r["number"])]
        left = [n for n in left if n.startswith("HD-")]
        if left:
            raise SimFailure("correctness", f"provisional numbers never finalized: {left[:5]}")

    def _check_series(self) -> None:
        """Any schema: no number its series issued is held by two vouchers
        (deleted ones included), none changed after it was issued final,
        every provisional one finalized once synced."""
        node = self.nodes[0].node
        assert node is not None
        now = {
            str(rid): (str(coll), str(key))
            for coll, rid, key in node.store.conn.execute(
                "SELECT collection, id, key FROM records WHERE collection != ?", (GAPS,)
            )
        }
        held = Counter(now[rid] for rid in self.issued if rid in now)
        twice = [f"{c} {k}" for (c, k), n in held.items() if n > 1]
        if twice:
            raise SimFailure("correctness", f"series numbers used twice: {twice[:5]}")
        for rid, (number, provisional) in self.issued.items():
            if rid in self.excused or rid not in now:
                continue
            if not provisional and now[rid][1] != number:
                raise SimFailure(
                    "correctness", f"voucher {rid} was issued {number}, now numbered {now[rid][1]}"
                )
        for coll in self.schema.collections.values():
            if coll.series is None:
                continue
            shape = re.compile(
                re.escape(PROVISIONAL_TEMPLATE.split("{node}")[0].format(prefix=coll.series.prefix))
                + r"[A-Za-z0-9_-]+-P\d{6}\Z"
            )
            left = [r["number"] for r in node.list(coll.name) if shape.match(str(r["number"]))]
            if left:
                raise SimFailure("correctness", f"provisional numbers never finalized: {left[:5]}")

    def _check_gaps(self) -> None:
        """The gap journal complete (harness.soak.checks.gap_journal_problems)."""
        node = self.nodes[0].node
        assert node is not None
        problems = gap_journal_problems(node, self.excused)
        if problems:
            raise SimFailure("correctness", "; ".join(problems))


class _LinkDown(Exception):
    """The connection ended (closed by a peer or dropped by the network)."""
