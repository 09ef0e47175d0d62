"""Urgent-first order, as the simulator checks it (issue 15).

``OrderedSession`` is the ``ClientSession`` a simulated node syncs through.
At every sync pass it asks the node which documents hold urgent pending
records (and what they refer to, ``Node.urgent_docs``: the same answer the
driver got a moment before, nothing runs in between) and notes a problem
when the pass

- asks for another document before one of those (downloads), or
- answers the relay's state of another document with updates before one of
  those (uploads; answers follow the relay's answers, so this also checks
  that the relay answers in request order). Checked while the link has
  delivered every frame in order, as TCP does: the simulator's network also
  delays frames past later ones, and then no order is promised.

``OrderLedger.passes`` counts passes that answered with updates both urgent
documents and others, so a run can tell the check was exercised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.protocol import ClientSession


@dataclass
class OrderLedger:
    """What the sessions of one run found: problems, and passes checked."""

    problems: list[str] = field(default_factory=list)
    passes: int = 0


class OrderedSession(ClientSession):
    """A ``ClientSession`` that checks urgent-first order (module docstring)
    into ``ledger``; ``urgent`` tells the node's urgent documents now,
    ``in_order`` whether the link has kept every frame in order so far."""

    def __init__(
        self,
        urgent: Callable[[], set[str]],
        in_order: Callable[[], bool],
        ledger: OrderLedger,
        name: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._urgent = urgent
        self._in_order = in_order
        self._ledger = ledger
        self._name = name
        self._first: set[str] = set()
        self._other: str | None = None  # the first other document answered with updates
        self._urgent_answered = False

    def start_sync(self, states: Iterable[tuple[str, bytes]]) -> int:
        states = list(states)
        self._first = self._urgent()
        self._other = None
        self._urgent_answered = False
        other = None
        for doc, _ in states:
            if doc not in self._first:
                other = other or doc
            elif other is not None:
                self._ledger.problems.append(
                    f"{self._name} asked for {other} before {doc}, which holds urgent records"
                )
                break
        return super().start_sync(states)

    def answer_state(self, doc: str, updates: Sequence[tuple[int, bytes]] = ()) -> None:
        if updates and self._in_order():
            if doc in self._first:
                if self._other is not None:
                    self._ledger.problems.append(
                        f"{self._name} sent {self._other} before {doc}, which holds urgent records"
                    )
                self._urgent_answered = True
            elif self._other is None:
                self._other = doc
                if self._urgent_answered:
                    self._ledger.passes += 1
        super().answer_state(doc, updates)
