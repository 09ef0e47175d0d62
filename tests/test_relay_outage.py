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
