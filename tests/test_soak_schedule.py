"""The soak's fault schedule (harness.soak.schedule): a seed replays it, and
with several relays or PostgreSQL it names faults those runs can apply."""

from __future__ import annotations

import random

from harness.soak import schedule


def test_one_relay_on_sqlite_draws_what_it_always_drew() -> None:
    names = ["N0", "N1", "N2"]
    plain = schedule(random.Random(5), 120, 2.0, names)
    again = schedule(random.Random(5), 120, 2.0, names, relays=1, pg=False)
    assert plain == again and plain
    assert {f.targets[0] for f in plain if f.kind == "kill_relay"} == {"relay"}
    assert not any(f.kind == "pg_terminate" for f in plain)


def test_several_relays_on_postgresql_kill_each_relay_and_cut_the_database() -> None:
    faults = schedule(random.Random(5), 300, 1.0, ["N0", "N1", "N2"], relays=2, pg=True)
    killed = {f.targets[0] for f in faults if f.kind == "kill_relay"}
    assert killed == {"relay0", "relay1"}
    assert any(f.kind == "pg_terminate" for f in faults)


def test_only_a_run_that_owns_its_server_restarts_postgresql() -> None:
    names = ["N0", "N1", "N2"]
    shared = schedule(random.Random(5), 600, 1.0, names, relays=2, pg=True)
    owned = schedule(random.Random(5), 600, 1.0, names, relays=2, pg=True, pg_restarts=True)
    assert not any(f.kind == "pg_restart" for f in shared)
    restarts = [f for f in owned if f.kind == "pg_restart"]
    assert restarts and all(0.5 <= f.hold_s <= 6.0 for f in restarts)
    assert owned == schedule(random.Random(5), 600, 1.0, names, relays=2, pg=True, pg_restarts=True)
