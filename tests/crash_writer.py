"""Child process of test_crash.py: writes into a node home until it is killed.

Usage: python crash_writer.py HOME SEED ROUND

For every operation it prints ``B <json>`` before calling the API and
``D <json>`` after the call returned (flushed at once), so the parent knows
exactly which writes were reported as done and which one may have been in
flight when the SIGKILL came. Time and randomness come from SEED.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import orjson

from engine import Node
from engine.clock import ManualClock

ALPHABET = "aăâbcdđeêghiklmnoôơpqrstuưvxyạảãấầẩẫậ ÁÀẢÃẠĐ😀👍🏽🇻🇳\x00\t\"'\\{}"


def text(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 24)))


def say(tag: str, payload: dict[str, Any]) -> None:
    sys.stdout.write(f"{tag} {orjson.dumps(payload).decode()}\n")
    sys.stdout.flush()


def main() -> None:
    home, seed, round_no = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    clock = ManualClock(1_767_225_600_000 + round_no * 1_000_000)
    node = Node.open(home, clock=clock, rng=rng)
    customers = [r["id"] for r in node.list("customers")]
    say("R", {"round": round_no})
    i = 0
    while True:
        i += 1
        clock.advance(rng.choice([0, 1, 5]))
        op = rng.random()
        if op < 0.6 or not customers:
            fields = {"code": f"R{round_no}-{i}", "name": text(rng) or "x", "address": text(rng)}
            say("B", {"op": "insert", "fields": fields})
            rid = node.put("customers", fields)
            customers.append(rid)
            say("D", {"op": "insert", "id": rid, "fields": fields})
        elif op < 0.8:
            rid = rng.choice(customers)
            fields = {"id": rid, "name": text(rng) or "y", "tax_code": text(rng)}
            if rng.random() < 0.5:
                del fields["name"]
            say("B", {"op": "update", "id": rid, "fields": fields})
            node.put("customers", fields)
            say("D", {"op": "update", "id": rid, "fields": fields})
        elif op < 0.97:
            fields = {
                "date": rng.choice(["2026-01-31", "2026-02-01", "2027-12-31"]),
                "customer": rng.choice(customers),
                "amount": f"{rng.randint(0, 10**9)}.{rng.randint(0, 99):02d}",
            }
            say("B", {"op": "voucher", "fields": fields})
            posted = node.post_voucher("cash_receipt", fields)
            say("D", {"op": "voucher", "id": posted.id, "number": posted.number, "fields": fields})
        else:
            say("B", {"op": "compact"})
            node.compact()
            say("D", {"op": "compact"})


if __name__ == "__main__":
    main()
