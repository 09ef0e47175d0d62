"""The pure merge core (engine.merge) against the five merge musts of DESIGN §3.

A record is ``{node: NodeState}`` (see engine.merge.record); ``resolve`` must give the
same answer for the same entries on every node, whatever order they come in.
The Hypothesis model below simulates nodes that write with partial knowledge
and exchange entries, and checks ``resolve`` against ground truth kept
outside the merge core (which write events each writer had observed).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.merge import CREATED, DELETED, Competitor, new_state, resolve, seen_by
from engine.merge.record import NodeState, entries

States = dict[str, NodeState]


def write(states: States, node: str, values: dict[str, Any], hlc: int) -> States:
    """``node`` writes ``values`` having observed exactly ``states``."""
    out = dict(states)
    out[node] = new_state(states.get(node), values, hlc, seen_by(states, node))
    return out


def merged(*views: States) -> States:
    """The union of several nodes' views (newest entry of each writer)."""
    out: States = {}
    for view in views:
        for node, state in view.items():
            have = out.get(node)
            if have is None or _newest(state) > _newest(have):
                out[node] = state
    return out


def _fields(state: NodeState) -> dict[str, Any]:
    """field -> (hlc, seen, value) of one entry ({} for none)."""
    return entries(state) if state else {}


def _newest(state: NodeState) -> int:
    return max((entry[0] for entry in _fields(state).values()), default=0)


def shuffled(states: States, rng: random.Random) -> States:
    """The same entries, in another order (dicts and entry dicts alike)."""
    nodes = list(states)
    rng.shuffle(nodes)
    out = {}
    for node in nodes:
        names = list(states[node]["f"])
        rng.shuffle(names)
        out[node] = {"w": states[node]["w"], "f": {name: states[node]["f"][name] for name in names}}
    return out


def conflict_of(r: Any, kind: str, fld: str) -> Any:
    found = [c for c in r.conflicts if c.kind == kind and c.field == fld]
    assert len(found) <= 1
    return found[0] if found else None


# -- must 1: different fields both survive -----------------------------------


def test_concurrent_edits_of_different_fields_both_survive() -> None:
    base = write({}, "A", {CREATED: True, "name": "An", "addr": "Hanoi"}, 10)
    at_a = write(base, "A", {"name": "An Nguyen"}, 20)
    at_b = write(base, "B", {"addr": "Da Nang"}, 15)
    for states in (merged(at_a, at_b), merged(at_b, at_a)):
        r = resolve(states)
        assert r.values == {"name": "An Nguyen", "addr": "Da Nang"}
        assert r.conflicts == []
        assert r.writers["name"] == ("A", 20)
        assert r.writers["addr"] == ("B", 15)


# -- must 2: same field, same winner everywhere, loser kept --------------------


def test_concurrent_edits_of_one_field_later_hlc_wins_and_loser_is_kept() -> None:
    base = write({}, "A", {CREATED: True, "name": "An"}, 10)
    # B's clock is ahead: its edit is later by HLC although A's node id sorts first.
    at_a = write(base, "A", {"name": "from A"}, 20)
    at_b = write(base, "B", {"name": "from B"}, 30)
    r = resolve(merged(at_a, at_b))
    assert r.values["name"] == "from B"
    c = conflict_of(r, "concurrent_edit", "name")
    assert c is not None
    assert c.competitors == (Competitor("B", 30, "from B"), Competitor("A", 20, "from A"))
    assert resolve(merged(at_b, at_a)) == r


def test_equal_hlc_ties_are_broken_by_node_id() -> None:
    base = write({}, "A", {CREATED: True, "name": "An"}, 10)
    at_b = write(base, "B", {"name": "from B"}, 20)
    at_c = write(base, "C", {"name": "from C"}, 20)
    r = resolve(merged(at_b, at_c))
    assert r.values["name"] == "from C"
    assert r.writers["name"] == ("C", 20)
    assert [c.node for c in conflict_of(r, "concurrent_edit", "name").competitors] == ["C", "B"]


def test_concurrent_writes_of_the_same_value_are_not_a_conflict() -> None:
    base = write({}, "A", {CREATED: True, "name": "An"}, 10)
    r = resolve(
        merged(
            write(base, "A", {"name": "same"}, 20),
            write(base, "B", {"name": "same"}, 25),
        )
    )
    assert r.values["name"] == "same"
    assert r.conflicts == []


def test_a_write_that_saw_an_edit_supersedes_it_without_conflict() -> None:
    base = write({}, "A", {CREATED: True, "name": "An"}, 10)
    at_b = write(base, "B", {"name": "B's"}, 20)
    # A saw B's edit, then wrote: sequential, not concurrent, even with a lower wall clock.
    at_a = write(at_b, "A", {"name": "A's"}, 21)
    r = resolve(merged(at_a, at_b))
    assert r.values["name"] == "A's"
    assert r.conflicts == []


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(st.sampled_from("ABCDEFG"), st.integers(1, 6), st.sampled_from("xyz")),
        min_size=1,
        max_size=7,
        unique_by=lambda t: t[0],
    ),
    st.randoms(use_true_random=False),
)
def test_concurrent_writers_agree_on_the_winner(
    writes: list[tuple[str, int, str]], rng: random.Random
) -> None:
    """Writers that saw nothing of each other: the highest (hlc, node) wins on
    every node, and every different losing value is kept as a conflict."""
    states: States = {}
    for node, hlc, value in writes:
        states[node] = new_state(None, {"f": value}, hlc, {})
    r = resolve(states)
    winner = max(writes, key=lambda w: (w[1], w[0]))
    assert r.values["f"] == winner[2]
    assert r.writers["f"] == (winner[0], winner[1])
    losers = {(n, h, v) for n, h, v in writes if v != winner[2]}
    c = conflict_of(r, "concurrent_edit", "f")
    if losers:
        assert c.competitors[0] == Competitor(winner[0], winner[1], winner[2])
        assert {(x.node, x.hlc, x.value) for x in c.competitors[1:]} == losers
    else:
        assert c is None
    for _ in range(3):
        assert resolve(shuffled(states, rng)) == r


# -- must 3: edit concurrent with delete ---------------------------------------


def test_edit_concurrent_with_delete_is_detected() -> None:
    base = write({}, "A", {CREATED: True, "name": "An", "addr": "Hue"}, 10)
    at_a = write(base, "A", {DELETED: True}, 20)
    at_b = write(base, "B", {"addr": "Hoi An"}, 25)
    for states in (merged(at_a, at_b), merged(at_b, at_a)):
        r = resolve(states)
        assert r.deleted
        assert r.values["addr"] == "Hoi An"  # the edit is kept, not lost
        c = conflict_of(r, "edit_delete", DELETED)
        assert c is not None
        assert c.competitors[0] == Competitor("A", 20, True)
        assert c.competitors[1:] == (Competitor("B", 25, {"addr": "Hoi An"}),)


def test_edit_with_a_lower_hlc_than_the_delete_is_still_detected() -> None:
    base = write({}, "A", {CREATED: True, "name": "An"}, 10)
    at_a = write(base, "A", {DELETED: True}, 50)
    at_b = write(base, "B", {"name": "Binh"}, 11)
    r = resolve(merged(at_a, at_b))
    assert r.deleted
    assert conflict_of(r, "edit_delete", DELETED) is not None


def test_delete_that_saw_the_edit_is_not_a_conflict() -> None:
    base = write({}, "A", {CREATED: True, "name": "An"}, 10)
    at_b = write(base, "B", {"name": "Binh"}, 20)
    at_a = write(at_b, "A", {DELETED: True}, 30)
    r = resolve(merged(at_a, at_b))
    assert r.deleted
    assert r.conflicts == []


def test_delete_versus_restore_is_a_register_with_a_visible_conflict() -> None:
    base = write({}, "A", {CREATED: True, "name": "An"}, 10)
    deleted = write(base, "A", {DELETED: True}, 20)
    at_b = write(deleted, "B", {DELETED: False}, 30)  # B restores
    at_a = write(deleted, "A", {DELETED: True, "name": "gone"}, 25)  # A, unaware, again
    r = resolve(merged(at_a, at_b))
    assert not r.deleted
    assert conflict_of(r, "concurrent_edit", DELETED) is not None


# -- must 4: lines are atomic --------------------------------------------------


LINES_A = [{"item": "I1", "qty": "1", "price": "10"}, {"item": "I2", "qty": "2", "price": "5"}]
LINES_B = [{"item": "I1", "qty": "3", "price": "10"}, {"item": "I3", "qty": "1", "price": "7"}]


def test_lines_edited_at_two_sites_are_never_merged() -> None:
    base = write({}, "A", {CREATED: True, "lines": [{"item": "I0", "qty": "1", "price": "1"}]}, 10)
    at_a = write(base, "A", {"lines": LINES_A}, 20)
    at_b = write(base, "B", {"lines": LINES_B}, 21)
    r = resolve(merged(at_a, at_b))
    assert r.values["lines"] == LINES_B  # exactly one site's list, whole
    c = conflict_of(r, "concurrent_edit", "lines")
    assert [x.value for x in c.competitors] == [LINES_B, LINES_A]


@settings(max_examples=100)
@given(
    st.lists(
        st.lists(
            st.fixed_dictionaries(
                {"item": st.sampled_from(["I1", "I2", "I3"]), "qty": st.sampled_from(["1", "2"])}
            ),
            max_size=4,
        ),
        min_size=2,
        max_size=4,
    ),
    st.lists(st.integers(11, 15), min_size=4, max_size=4),
)
def test_lines_value_is_always_one_written_list(lists: list[Any], hlcs: list[int]) -> None:
    base = write({}, "A", {CREATED: True, "lines": []}, 10)
    views = [
        write(base, node, {"lines": ls}, hlcs[i])
        for i, (node, ls) in enumerate(zip("ABCD", lists, strict=False))
    ]
    r = resolve(merged(*views))
    assert r.values["lines"] in lists


# -- must 5 and resolution: conflicts are a function of state ------------------


def test_created_is_the_earliest_creation_and_records_without_it_are_incomplete() -> None:
    partial = write({}, "B", {"name": "edit before the create arrived"}, 30)
    assert not resolve(partial).complete
    full = merged(partial, write({}, "A", {CREATED: True, "name": "An"}, 10))
    r = resolve(full)
    assert r.complete and r.created == (10, "A")
    assert CREATED not in r.values


def test_a_later_write_that_saw_all_competitors_resolves_the_conflict() -> None:
    base = write({}, "A", {CREATED: True, "name": "An"}, 10)
    at_a = write(base, "A", {"name": "from A"}, 20)
    at_b = write(base, "B", {"name": "from B"}, 30)
    at_c = write(base, "C", {"name": "from C"}, 25)
    everything = merged(at_a, at_b, at_c)
    assert len(conflict_of(resolve(everything), "concurrent_edit", "name").competitors) == 3
    # C saw all three and chose the losing value of A: no conflict anywhere.
    fixed = write(everything, "C", {"name": "from A"}, 40)
    for states in (fixed, merged(at_a, at_b, fixed), merged(fixed, at_b, at_a)):
        r = resolve(states)
        assert r.values["name"] == "from A"
        assert r.conflicts == []
    # Seeing only part of the competitors resolves only that part.
    partly = write(merged(at_a, at_c), "C", {"name": "C again"}, 41)
    r = resolve(merged(partly, at_b))
    c = conflict_of(r, "concurrent_edit", "name")
    assert {(x.node, x.value) for x in c.competitors} == {("B", "from B"), ("C", "C again")}


def test_a_write_to_another_field_does_not_resolve_a_conflict() -> None:
    base = write({}, "A", {CREATED: True, "name": "An", "addr": "x"}, 10)
    everything = merged(
        write(base, "A", {"name": "from A"}, 20), write(base, "B", {"name": "from B"}, 30)
    )
    r = resolve(write(everything, "C", {"addr": "y"}, 40))
    assert conflict_of(r, "concurrent_edit", "name") is not None


def test_edit_delete_conflict_is_resolved_by_a_restore_or_delete_that_saw_everything() -> None:
    base = write({}, "A", {CREATED: True, "name": "An"}, 10)
    everything = merged(write(base, "A", {DELETED: True}, 20), write(base, "B", {"name": "B"}, 30))
    assert conflict_of(resolve(everything), "edit_delete", DELETED) is not None
    restored = resolve(write(everything, "C", {DELETED: False}, 40))
    assert not restored.deleted and restored.conflicts == []
    redeleted = resolve(write(everything, "B", {DELETED: True}, 40))
    assert redeleted.deleted and redeleted.conflicts == []


@settings(max_examples=200)
@given(st.data())
def test_edit_delete_conflict_does_not_depend_on_entry_order(data: st.DataObject) -> None:
    """Several nodes edit fields concurrently with a delete: every order of the
    same entries gives the same conflict, competitors in the same order."""
    editors = data.draw(st.lists(st.sampled_from("BCDEF"), min_size=2, max_size=5, unique=True))
    base = write({}, "A", {CREATED: True, "name": "An", "addr": "x"}, 10)
    views = [write(base, "A", {DELETED: True}, 20)]
    for node in editors:
        fields = data.draw(st.sets(st.sampled_from(["name", "addr"]), min_size=1))
        hlc = data.draw(st.integers(11, 30))
        views.append(write(base, node, {f: f"{node}{f}" for f in sorted(fields)}, hlc))
    order = data.draw(st.permutations(views))
    expected = resolve(merged(*views))
    assert resolve(merged(*order)) == expected


# -- model: nodes with partial knowledge, checked against ground truth ---------

FIELDS = ("name", "addr", "lines", DELETED)
VALUES = {
    "name": st.sampled_from(["An", "Binh", "Chi", "Dung"]),
    "addr": st.sampled_from(["Hanoi", "Hue", "Saigon"]),
    "lines": st.lists(
        st.fixed_dictionaries(
            {"item": st.sampled_from(["I1", "I2"]), "qty": st.sampled_from(["1", "2.5"])}
        ),
        max_size=3,
    ),
    DELETED: st.booleans(),
}


@dataclass
class Version:
    """One version of a writer's entry, with the write events it contains:
    field -> event id of the write that put the field's value there."""

    state: NodeState
    events: dict[str, int]
    every: frozenset[int]  # every event this writer's entry has ever held

    @property
    def newest(self) -> int:
        return _newest(self.state)


@dataclass
class Model:
    nodes: str
    views: dict[str, dict[str, Version]] = field(default_factory=dict)
    last: dict[str, int] = field(default_factory=dict)
    # event id -> ids of every write event the writer had observed (other nodes)
    observed: dict[int, frozenset[int]] = field(default_factory=dict)
    next_event: int = 0

    def states(self, node: str) -> States:
        return {w: v.state for w, v in self.views[node].items()}

    def write(self, node: str, values: dict[str, Any], wall: int) -> None:
        view = self.views.setdefault(node, {})
        states = self.states(node)
        current = resolve(states)
        hlc = max(wall, self.last.get(node, 0) + 1, current.newest + 1)
        self.last[node] = hlc
        observed = frozenset(e for w, v in view.items() if w != node for e in v.every)
        own = view.get(node, Version({}, {}, frozenset()))
        events = dict(own.events)
        for name in values:
            events[name] = self.next_event
            self.observed[self.next_event] = observed
            self.next_event += 1
        state = new_state(own.state, values, hlc, seen_by(states, node))
        view[node] = Version(state, events, own.every | frozenset(events.values()))

    def deliver(self, src: str, dst: str, writers: list[str]) -> None:
        for w in writers:
            have = self.views.get(src, {}).get(w)
            if have is None:
                continue
            mine = self.views.setdefault(dst, {}).get(w)
            if mine is None or have.newest > mine.newest:
                self.views[dst][w] = have

    def check(self, node: str) -> None:
        """``resolve`` of this node's view against ground truth."""
        view = self.views.get(node, {})
        if not view:
            return
        r = resolve(self.states(node))
        for name in FIELDS:
            found = [
                (w, _fields(v.state)[name], v.events[name])
                for w, v in view.items()
                if name in _fields(v.state)
            ]
            if not found:
                assert name not in r.writers
                continue
            survivors = [
                (w, e)
                for w, e, ev in found
                if not any(ev in self.observed[ev2] for w2, _, ev2 in found if w2 != w)
            ]
            survivors.sort(key=lambda we: (we[1][0], we[0]), reverse=True)
            top_node, top = survivors[0]
            assert r.writers[name] == (top_node, top[0])
            if name == DELETED:
                assert r.deleted == bool(top[2])
            else:
                assert r.values[name] == top[2]
            losers = {(w, e[0]) for w, e in survivors[1:] if e[2] != top[2]}
            c = conflict_of(r, "concurrent_edit", name)
            if losers:
                assert c is not None, (name, survivors)
                assert (c.competitors[0].node, c.competitors[0].hlc) == (top_node, top[0])
                assert {(x.node, x.hlc) for x in c.competitors[1:]} == losers
            else:
                assert c is None, (name, survivors)
        c = conflict_of(r, "edit_delete", DELETED)
        if r.deleted:
            deleter, _ = r.writers[DELETED]
            delete_event = view[deleter].events[DELETED]
            unseen = {
                (w, _fields(v.state)[name][0], name)
                for w, v in view.items()
                if w != deleter
                for name in _fields(v.state)
                if name not in (DELETED, CREATED)
                and v.events[name] not in self.observed[delete_event]
            }
            if unseen:
                assert c is not None
                assert {(x.node, x.hlc, next(iter(x.value))) for x in c.competitors[1:]} == unseen
            else:
                assert c is None
        else:
            assert c is None


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    nodes = "ABCD"[: draw(st.integers(2, 4))]
    steps: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 25))):
        if draw(st.booleans()):
            node = draw(st.sampled_from(nodes))
            names = draw(st.sets(st.sampled_from(FIELDS), min_size=1, max_size=2))
            values = {n: draw(VALUES[n]) for n in sorted(names)}
            steps.append(("write", node, values, draw(st.integers(0, 40))))
        else:
            src, dst = draw(st.permutations(nodes))[:2]
            writers = draw(st.lists(st.sampled_from(nodes), min_size=1, unique=True))
            steps.append(("deliver", src, dst, writers))
    return [("nodes", nodes), *steps]


@settings(max_examples=300, deadline=None)
@given(histories(), st.randoms(use_true_random=False))
def test_resolve_matches_ground_truth_and_ignores_order(
    history: list[tuple[Any, ...]], rng: random.Random
) -> None:
    nodes = history[0][1]
    model = Model(nodes)
    for step in history[1:]:
        if step[0] == "write":
            model.write(step[1], step[2], step[3])
        else:
            model.deliver(step[1], step[2], step[3])
    for node in nodes:
        model.check(node)
        states = model.states(node) if node in model.views else {}
        r = resolve(states)
        for _ in range(3):
            assert resolve(shuffled(states, rng)) == r
    # Everyone learns everything: all nodes resolve identically.
    for src in nodes:
        for dst in nodes:
            model.deliver(src, dst, list(nodes))
    results = []
    for node in nodes:
        model.check(node)
        results.append(resolve(model.states(node)) if node in model.views else None)
    assert all(r == results[0] for r in results)
    # A write by a node that has seen everything resolves that field's conflict.
    writer = nodes[0]
    if writer in model.views:
        model.write(writer, {"name": "final"}, 0)
        r = resolve(model.states(writer))
        assert r.values["name"] == "final"
        assert conflict_of(r, "concurrent_edit", "name") is None
