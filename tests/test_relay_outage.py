"""``Outage``: calls fail at once while a store's server is down, and it is
tried again on a backoff; a lost connection is retried at once."""

from __future__ import annotations

import pytest

from engine.errors import StoreUnavailable
from engine.relay.outage import Outage


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_calls_fail_fast_until_the_retry_then_back_off_to_the_cap() -> None:
    clock = Clock()
    outage = Outage(clock, first_s=1.0, max_s=4.0)  # steps exact in binary
    outage.check("store")  # no outage: a connection may be tried
    assert outage.failed("refused") is True  # starts it: log once
    with pytest.raises(
        StoreUnavailable, match=r"store: PostgreSQL unreachable for 0\.0 s \(refused\)"
    ):
        outage.check("store")
    waits = []
    for _ in range(4):
        start = clock.now
        while True:
            try:
                outage.check("store")
                break
            except StoreUnavailable:
                clock.now += 0.5
        waits.append(round(clock.now - start, 2))
        assert outage.failed("refused") is False  # the same outage: not logged again
    assert waits == [1.0, 2.0, 4.0, 4.0]
    clock.now += 1
    with pytest.raises(StoreUnavailable, match=r"unreachable for 12\.0 s"):
        outage.check("store")


def test_a_working_connection_ends_it_and_tells_how_long() -> None:
    clock = Clock()
    outage = Outage(clock)
    assert outage.ended() is None
    outage.failed("refused")
    clock.now += 3.5
    assert outage.ended() == pytest.approx(3.5)
    outage.check("store")
    assert outage.failed("again") is True  # a new outage starts from the first wait


def test_a_lost_connection_is_tried_again_at_once() -> None:
    clock = Clock()
    outage = Outage(clock)
    assert outage.failed("terminated", retry_now=True) is True
    outage.check("store")  # no wait: the server usually takes the next session
    assert outage.failed("refused") is False
    with pytest.raises(StoreUnavailable):
        outage.check("store")


def test_serve_waits_for_the_store_at_start_then_gives_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from engine.relay import cli

    clock = Clock()
    tries: list[float] = []
    naps: list[float] = []

    def unreachable(spec: str) -> None:
        tries.append(clock.now)
        raise StoreUnavailable("PostgreSQL at 127.0.0.1:5432 cannot be reached")

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        clock.now += seconds

    monkeypatch.setattr(cli, "open_store", unreachable)
    with pytest.raises(StoreUnavailable, match=r"waited 2 s, --wait-store"):
        cli.open_store_waiting("postgresql://x", 2.0, clock, sleep)
    assert len(tries) == 5  # at 0, 0.5, 1, 1.5 and 2 s
    assert naps == [0.5, 0.5, 0.5, 0.5]


def test_serve_opens_the_store_once_it_is_back(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.relay import cli

    clock = Clock()
    opened = object()
    tries: list[float] = []

    def back_at_the_third_try(spec: str) -> object:
        tries.append(clock.now)
        if len(tries) < 3:
            raise StoreUnavailable("down")
        return opened

    def sleep(seconds: float) -> None:
        clock.now += seconds

    monkeypatch.setattr(cli, "open_store", back_at_the_third_try)
    assert cli.open_store_waiting("postgresql://x", 60.0, clock, sleep) is opened
    assert tries == [100.0, 100.5, 101.0]
