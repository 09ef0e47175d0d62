"""Authorship: which entries a node may publish through the relay.

A record's document holds one entry per writing node, under the map key
``"{record_id}|{node}"``, and a node only ever writes its own key
(engine/crdt/document.py). The relay checks that rule on every update from a
node that is not a *carrier* (docs/reliability.md "Authorship"): once the
update is integrated into the relay's copy of the document,

1. every entry it changed is the sender's own (``*|sender``);
2. no entry disappeared (Branchline never removes a key: deleting a record
   writes a tombstone into the deleter's own entry);
3. nothing of it waits for changes the relay has not seen: neither items
   (``beyond`` holds structs) nor deletions of items past the document's
   state. A waiting part would take effect later, inside another node's
   update, where rule 1 could no longer tell who wrote it.

An honest node that is not a carrier passes: its local writes touch only its
own key, and its sync answers are own-only diffs (``Node.export_parts``).
A carrier (a head office importing the branches' files) may publish anything.

Pure functions over what ``SqliteRelayStore`` observed while integrating:
no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..crdt.deleteset import beyond as deletions_beyond
from ..crdt.deleteset import delete_set_only
from ..crdt.document import SEP
from ..crdt.statevec import decode_state_vector
from ..errors import NotAuthor, UpdateError

#: Entries named in a refusal message at most.
MAX_NAMED = 3
#: An update with no structs and an empty delete set.
NO_DELETIONS = b"\x00\x00"


def entry_node(key: str) -> str:
    """The node whose entry ``key`` is ("" for a key without a node part)."""
    return key.partition(SEP)[2]


def check(
    node: str, doc: str, changed: Mapping[str, str], state: bytes, beyond: bytes
) -> NotAuthor | None:
    """None when ``node`` may publish the update, else the refusal.

    ``changed``: map key -> yrs action (``add``, ``update``, ``delete``) of the
    update's transaction; ``state``: the document's state vector after it;
    ``beyond``: ``get_update(update, state)`` (what of it the document does
    not cover). Raises UpdateError when ``state`` or ``beyond`` do not decode.
    """
    if beyond[:1] != b"\x00":
        return NotAuthor(
            f"update of {doc!r} from node {node!r} refused: part of it waits for changes "
            "the relay has not seen, so its author cannot be checked (a node that is not "
            "a carrier sends its own changes in order; reconnecting sends them again)"
        )
    removed: list[str] = []
    foreign: list[str] = []
    for key, action in changed.items():
        if action == "delete":
            removed.append(key)
        elif entry_node(key) != node:
            foreign.append(key)
    if removed:
        return NotAuthor(
            f"update of {doc!r} from node {node!r} refused: it removes "
            f"{_name(sorted(removed))}; Branchline never removes an entry"
        )
    if foreign:
        foreign.sort()
        return NotAuthor(
            f"update of {doc!r} from node {node!r} refused: it changes {_name(foreign)} "
            f"of node {entry_node(foreign[0])!r}; only that node, or a node enrolled "
            "as a carrier, may publish them"
        )
    if beyond == NO_DELETIONS:
        return None  # the usual new entry: no delete set to look at
    try:
        late = deletions_beyond(delete_set_only(beyond), decode_state_vector(state))
    except UpdateError as exc:
        raise UpdateError(f"document {doc!r}: {exc}") from None
    if late:
        return NotAuthor(
            f"update of {doc!r} from node {node!r} refused: it deletes items the relay "
            f"has not seen ({len(late)} range(s)), so its author cannot be checked"
        )
    return None


def _name(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:MAX_NAMED])
    more = len(keys) - MAX_NAMED
    return (
        f"entry {shown}"
        if len(keys) == 1
        else f"entries {shown}" + (f" and {more} more" if more > 0 else "")
    )
