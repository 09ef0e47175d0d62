"""Child process of test_multiprocess.py: one of several writers to one home.

Usage: python mp_writer.py HOME WORKER COUNT SEED

Waits for a line on stdin (so all writers start together), then COUNT times:
creates its own record, partially updates its own field of the shared record,
and overwrites the one field all writers fight over; worker 0 also
acknowledges the outbox and compacts now and then. After each write returns
it prints ``<op> <json>`` (flushed).
"""

from __future__ import annotations

import random
import sys

import orjson

from engine import Node
from engine.clock import ManualClock


def say(op: str, payload: dict[str, object]) -> None:
    sys.stdout.write(f"{op} {orjson.dumps(payload).decode()}\n")
    sys.stdout.flush()


def main() -> None:
    home, worker, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    clock = ManualClock(1_767_225_600_000 + worker)
    node = Node.open(home, clock=clock, rng=rng)
    say("ready", {"worker": worker})
    sys.stdin.readline()
    for i in range(count):
        clock.advance(rng.choice([0, 1, 3]))
        value = f"{worker}-{i}"
        rid = node.put("things", {"code": f"W{worker}-{i}", "label": value})
        say("create", {"id": rid, "code": f"W{worker}-{i}", "label": value})
        node.put("things", {"code": "SHARED", f"w{worker}": value})
        say("field", {"field": f"w{worker}", "value": value})
        node.put("things", {"code": "HOT", "label": value})
        say("hot", {"value": value})
        if worker == 0 and i % 15 == 14:
            # As if the relay acknowledged the outbox: compaction may now fold
            # and delete rows the other writers are reading.
            node.ack(seq for seq, _, _ in node.outbox())
            node.compact()
    node.close()
    say("done", {"worker": worker})


if __name__ == "__main__":
    main()
