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
