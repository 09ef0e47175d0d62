"""engine.store.turns: writers of one store file in one process take turns
in arrival order."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from engine.store.turns import WriteTurns, turns_of


def test_a_waiting_thread_writes_before_the_holder_writes_again() -> None:
    turns = WriteTurns()
    order: list[str] = []
    assert turns.take(1)
    waiter = threading.Thread(target=lambda: (turns.take(5), order.append("B"), turns.give()))
    waiter.start()
    while turns.waiting() == 0:
        time.sleep(0.001)
    turns.give()
    # Taking again at once, as a catch-up does slice after slice: B goes first.
    assert turns.take(5)
    order.append("A")
    turns.give()
    waiter.join()
    assert order == ["B", "A"]


def test_a_turn_not_had_in_time_is_given_up() -> None:
    turns = WriteTurns()
    assert turns.take(1)
    got: list[bool] = []
    other = threading.Thread(target=lambda: got.append(turns.take(0.05)))
    other.start()
    other.join()
    assert got == [False]
    assert turns.waiting() == 0
    turns.give()
    assert turns.take(0.05)  # the one that gave up is not in the way
    turns.give()


def test_stores_of_one_file_share_turns(tmp_path: Path) -> None:
    a = turns_of(tmp_path / "x.db")
    assert turns_of(tmp_path / "." / "x.db") is a
    assert turns_of(tmp_path / "y.db") is not a
