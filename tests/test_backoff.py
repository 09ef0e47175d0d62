"""Reconnect timing policy (engine.transport.client): the backoff caps at
``link_cap_s`` when nothing answered and at ``cap_s`` when the relay did;
what counts as "nothing answered"."""

from __future__ import annotations

import random

from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosedError, InvalidMessage, InvalidStatus
from websockets.frames import Close
from websockets.http11 import Response

from engine.transport.client import Backoff, _nothing_answered


def test_the_cap_depends_on_whether_the_relay_answered() -> None:
    b = Backoff(rng=random.Random(1))
    late = [b.delay(12) for _ in range(200)]
    assert min(late) >= 1.5 and max(late) <= 3.0
    unanswered = [b.delay(12, link=True) for _ in range(200)]
    assert min(unanswered) >= 0.25 and max(unanswered) <= 0.5
    assert Backoff(cap_s=0.3, rng=random.Random(1)).delay(12, link=True) <= 0.3
    first = [b.delay(0, link=True) for _ in range(50)]
    assert min(first) >= 0.1 and max(first) <= 0.2


def test_what_counts_as_no_answer() -> None:
    assert _nothing_answered(ConnectionRefusedError(111, "refused"))
    assert _nothing_answered(TimeoutError())
    cut_short = InvalidMessage("did not receive a valid HTTP response")
    cut_short.__cause__ = EOFError("connection closed while reading HTTP status line")
    assert _nothing_answered(cut_short)
    status = InvalidStatus(Response(503, "Service Unavailable", Headers()))
    assert not _nothing_answered(status)
    assert not _nothing_answered(ConnectionClosedError(Close(1011, "internal"), None))
    assert not _nothing_answered(ValueError("a bug is not a dead link"))
