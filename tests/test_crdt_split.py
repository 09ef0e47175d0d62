"""engine.crdt.split: parts of an update, applied in order, are the update."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycrdt import Array, Doc, Map, Text, XmlElement, XmlFragment, XmlText

from engine.crdt.split import split_update
from engine.errors import UpdateError

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=10,
)
# Astral characters count two clock units each in a Yjs string.
texts = st.text(alphabet=st.sampled_from("ab ẹ日\U0001f600"), min_size=1, max_size=12)

steps = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.integers(0, 20), values),
        st.tuples(st.just("del"), st.integers(0, 20)),
        st.tuples(st.just("text"), texts),
        st.tuples(st.just("cut"), st.integers(0, 40), st.integers(1, 5)),
        st.tuples(st.just("push"), values),
        st.tuples(st.just("nest"), st.integers(0, 20)),
        st.tuples(st.just("xml"), texts),
    ),
    min_size=1,
    max_size=40,
)


def _play(doc: Doc[Any], ops: list[tuple[Any, ...]]) -> None:
    m = doc.get("m", type=Map)
    t = doc.get("t", type=Text)
    a = doc.get("a", type=Array)
    x = doc.get("x", type=XmlFragment)
    for op in ops:
        with doc.transaction():
            kind = op[0]
            if kind == "set":
                m[f"k{op[1]}"] = op[2]
            elif kind == "del" and f"k{op[1]}" in m:
                del m[f"k{op[1]}"]
            elif kind == "text":
                t += op[1]
            elif kind == "cut" and len(t) and str(t).isascii():
                # (pycrdt's indexes and a text's astral characters disagree)
                start = min(op[1], len(t) - 1)
                del t[start : min(len(t), start + op[2])]
            elif kind == "push":
                a.append(op[1])
            elif kind == "nest":
                m[f"n{op[1]}"] = Map({"v": op[1], "l": Array([op[1]])})
            elif kind == "xml":
                x.children.append(XmlElement("p", {"k": "v"}, [XmlText(op[1])]))


def _state(update: bytes | list[bytes]) -> tuple[Any, ...]:
    """What a replica holds after applying ``update`` (or its parts): its
    state vector and content. (Encoded whole, two equal replicas may still
    order a struct's values differently.)"""
    doc: Doc[Any] = Doc()
    for u in [update] if isinstance(update, bytes) else update:
        doc.apply_update(u)
    m, t = doc.get("m", type=Map), doc.get("t", type=Text)
    a, x = doc.get("a", type=Array), doc.get("x", type=XmlFragment)
    return doc.get_state(), m.to_py(), str(t), a.to_py(), str(x)


@settings(max_examples=150, deadline=None)
@given(
    writers=st.lists(steps, min_size=1, max_size=3),
    max_bytes=st.integers(1, 400),
    seed=st.integers(0, 2**20),
)
def test_parts_applied_in_order_make_the_whole_update(
    writers: list[list[tuple[Any, ...]]], max_bytes: int, seed: int
) -> None:
    # Several clients (writers in turn, each seeing the others' work): the
    # update has several client groups, origins across them and a delete set.
    doc: Doc[Any] = Doc(client_id=seed + 1)
    for i, ops in enumerate(writers):
        peer: Doc[Any] = Doc(client_id=seed + 100 + i)
        peer.apply_update(doc.get_update())
        _play(peer, ops)
        doc.apply_update(peer.get_update())
    update = doc.get_update()
    parts = split_update(update, max_bytes)
    assert _state(parts) == _state(update)
    if len(update) <= max_bytes:
        assert parts == [update]
    # The delete set rides last; every earlier part carries none.
    assert all(p.endswith(b"\x00") for p in parts[:-1])


@given(max_bytes=st.integers(1, 2000))
def test_a_diff_against_a_state_splits_too(max_bytes: int) -> None:
    # A diff starts each client group at the replica's clock, not at 0.
    doc: Doc[Any] = Doc(client_id=7)
    m = doc.get("m", type=Map)
    for i in range(30):
        m[f"k{i}"] = "x" * i
    half: Doc[Any] = Doc()
    half.apply_update(doc.get_update())
    for i in range(30, 60):
        m[f"k{i % 40}"] = "y" * i
    diff = doc.get_update(half.get_state())
    parts = split_update(diff, max_bytes)
    for p in parts:
        half.apply_update(p)
    assert half.get_update() == doc.get_update()


def test_parts_stay_under_the_limit_bar_headers() -> None:
    doc: Doc[Any] = Doc(client_id=3)
    m = doc.get("m", type=Map)
    for i in range(2000):
        with doc.transaction():
            m[f"r{i}|n"] = f'{{"name":"khách {i}","v":{i}}}'
    update = doc.get_update()
    parts = split_update(update, 4096)
    assert len(parts) > 10
    assert max(map(len, parts)) <= 4096 + 16
    assert _state(parts) == _state(update)


def test_a_struct_larger_than_the_limit_is_a_part_of_its_own() -> None:
    doc: Doc[Any] = Doc(client_id=3)
    m = doc.get("m", type=Map)
    m["small"] = "a"
    m["big"] = "b" * 5000
    m["after"] = "c"
    parts = split_update(doc.get_update(), 100)
    assert len(parts) == 3
    assert _state(parts) == _state(doc.get_update())


@pytest.mark.parametrize(
    "bad",
    [
        b"\x01\x05",  # a group cut short
        b"\x01\x01\x03\x00\x1b",  # a struct of unknown kind (27)
        b"\x01\x01\x03\x00\x08\x01\x77\x05ab",  # a string shorter than it says
        b"\x00\x00\xff",  # trailing bytes
        b"\x01\xff\xff\xff\xff\x7f\x03\x00",  # more structs than can be
    ],
)
def test_bytes_that_are_not_an_update_raise_update_error(bad: bytes) -> None:
    with pytest.raises(UpdateError):
        split_update(bad, 1)


def test_max_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError):
        split_update(b"\x00\x00", 0)


@settings(max_examples=150, deadline=None)
@given(
    writers=st.lists(steps, min_size=1, max_size=4),
    order=st.randoms(use_true_random=False),
    keep=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_reach_tells_what_waits_as_a_full_decode_does(
    writers: list[list[tuple[Any, ...]]], order: Any, keep: list[bool]
) -> None:
    """``engine.crdt.document._waits`` reads struct headers (``reach``);
    decoding what lies beyond the state (``get_update``) says the same, for
    updates applied in any order, some of them missing."""
    from pycrdt import get_update

    from engine.crdt.document import _waits

    doc: Doc[Any] = Doc(client_id=1)
    updates = []
    for i, ops in enumerate(writers):
        peer: Doc[Any] = Doc(client_id=100 + i % 2)  # a client writes again later
        peer.apply_update(doc.get_update())
        before = peer.get_state()
        _play(peer, ops)
        updates.append(peer.get_update(before))
        doc.apply_update(peer.get_update())
    chosen = [u for u, k in zip(updates, keep, strict=False) if k] or updates[-1:]
    order.shuffle(chosen)
    replica: Doc[Any] = Doc(client_id=7)
    for u in chosen:
        replica.apply_update(u)
        state = replica.get_state()
        for each in updates:
            assert _waits(each, state) == (get_update(each, state)[:1] != b"\x00")
