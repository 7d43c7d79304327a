"""The reference merge (PROTOCOL.md, "Changes and merge rules").

A table pins each rule on one record; properties on :class:`Replica` pin
convergence: any order, duplicates, and catch-up through record deltas give
the same state, which also equals an independent model of the rules.
Pure: no event loop, no database.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.merge import RecordState, Replica, apply_delete, apply_upsert
from hub.types import Change, Delta, FieldWrite


def s(wall: int, counter: int = 0, node: str = "a") -> str:
    """A stamp, written out by hand."""
    return f"{wall:013d}-{counter:04d}-{node}"


@dataclass(frozen=True)
class Up:
    """An upsert of ``(name, value, stamp)`` writes; ``changed`` is what it should report."""

    writes: tuple[tuple[str, str, str], ...]
    changed: tuple[str, ...]


@dataclass(frozen=True)
class Del:
    """A delete at ``stamp``; ``changed`` is whether it should raise the delete stamp."""

    stamp: str
    changed: bool


def up(*writes: tuple[str, str, str], changed: tuple[str, ...]) -> Up:
    return Up(writes, changed)


# Each case: steps applied in order to one fresh record, then the expected
# visible fields {name: (value, stamp)}, deleted flag and delete stamp.
CASES: list[Any] = [
    pytest.param(
        [up(("title", '"a"', s(1)), changed=("title",))],
        {"title": ('"a"', s(1))},
        False,
        None,
        id="first-write",
    ),
    pytest.param(
        [
            up(("title", '"a"', s(1)), changed=("title",)),
            up(("title", '"b"', s(2)), changed=("title",)),
        ],
        {"title": ('"b"', s(2))},
        False,
        None,
        id="greater-stamp-wins",
    ),
    pytest.param(
        [up(("title", '"b"', s(2)), changed=("title",)), up(("title", '"a"', s(1)), changed=())],
        {"title": ('"b"', s(2))},
        False,
        None,
        id="smaller-stamp-dropped",
    ),
    pytest.param(
        [up(("title", '"a"', s(2)), changed=("title",)), up(("title", '"b"', s(2)), changed=())],
        {"title": ('"a"', s(2))},
        False,
        None,
        id="equal-stamp-dropped",
    ),
    pytest.param(
        [
            up(("title", '"a"', s(2, 1, "z")), changed=("title",)),
            up(("title", '"b"', s(2, 2, "a")), changed=("title",)),
        ],
        {"title": ('"b"', s(2, 2, "a"))},
        False,
        None,
        id="counter-beats-node",
    ),
    pytest.param(
        [
            up(("title", '"a"', s(2, 0, "b")), changed=("title",)),
            up(("title", '"b"', s(2, 0, "a")), changed=()),
        ],
        {"title": ('"a"', s(2, 0, "b"))},
        False,
        None,
        id="node-breaks-ties",
    ),
    pytest.param(
        [
            up(("title", '"a"', s(5)), ("done", "false", s(5)), changed=("title", "done")),
            up(("title", '"b"', s(4)), ("done", "true", s(6)), changed=("done",)),
        ],
        {"title": ('"a"', s(5)), "done": ("true", s(6))},
        False,
        None,
        id="field-level-not-record-level",
    ),
    pytest.param(
        [up(("title", '"a"', s(1)), changed=("title",)), Del(s(2), True)],
        {},
        True,
        s(2),
        id="delete-hides-older-fields",
    ),
    pytest.param(
        [up(("title", '"a"', s(2)), changed=("title",)), Del(s(2), True)],
        {},
        True,
        s(2),
        id="delete-wins-at-equal-stamp",
    ),
    pytest.param(
        [
            up(("title", '"a"', s(3)), ("done", "false", s(1)), changed=("title", "done")),
            Del(s(2), True),
        ],
        {"title": ('"a"', s(3))},
        False,
        s(2),
        id="delete-older-than-a-field-leaves-record-live",
    ),
    pytest.param(
        [Del(s(7), True)],
        {},
        True,
        s(7),
        id="delete-of-unknown-record",
    ),
    pytest.param(
        [Del(s(5), True), up(("title", '"a"', s(4)), changed=())],
        {},
        True,
        s(5),
        id="write-older-than-delete-dropped",
    ),
    pytest.param(
        [Del(s(5), True), up(("title", '"a"', s(5)), changed=())],
        {},
        True,
        s(5),
        id="write-at-delete-stamp-dropped",
    ),
    pytest.param(
        [Del(s(5), True), up(("title", '"old"', s(4)), ("done", "true", s(6)), changed=("done",))],
        {"done": ("true", s(6))},
        False,
        s(5),
        id="upsert-partly-older-than-delete",
    ),
    pytest.param(
        [
            up(("title", '"a"', s(1)), ("done", "false", s(1)), changed=("title", "done")),
            Del(s(2), True),
            up(("title", '"b"', s(3)), changed=("title",)),
        ],
        {"title": ('"b"', s(3))},
        False,
        s(2),
        id="revive-with-only-newer-fields-delete-stamp-kept",
    ),
    pytest.param(
        [
            up(("title", '"a"', s(1)), changed=("title",)),
            Del(s(2), True),
            up(("title", '"b"', s(3)), changed=("title",)),
            Del(s(4), True),
        ],
        {},
        True,
        s(4),
        id="deleted-again-after-revive",
    ),
    pytest.param(
        [Del(s(5), True), Del(s(3), False)],
        {},
        True,
        s(5),
        id="older-delete-dropped",
    ),
    pytest.param(
        [Del(s(5), True), Del(s(5), False)],
        {},
        True,
        s(5),
        id="equal-delete-dropped",
    ),
    pytest.param(
        [up(("title", '"a"', s(6)), changed=("title",)), Del(s(3), True), Del(s(5), True)],
        {"title": ('"a"', s(6))},
        False,
        s(5),
        id="newer-delete-raises-stamp",
    ),
    pytest.param(
        [Del(s(2), True), up(("title", '"a"', s(3)), changed=("title",)), Del(s(1), False)],
        {"title": ('"a"', s(3))},
        False,
        s(2),
        id="late-old-delete-does-not-lower-stamp",
    ),
]


@pytest.mark.parametrize(("steps", "visible", "deleted", "deleted_hlc"), CASES)
def test_record_rules(
    steps: list[Up | Del],
    visible: dict[str, tuple[str, str]],
    deleted: bool,
    deleted_hlc: str | None,
) -> None:
    record = RecordState()
    for step in steps:
        if isinstance(step, Up):
            assert apply_upsert(record, step.writes) == list(step.changed)
        else:
            assert apply_delete(record, step.stamp) is step.changed
    assert {n: (f.value, f.hlc) for n, f in record.visible().items()} == visible
    assert record.deleted is deleted
    assert record.deleted_hlc == deleted_hlc


def test_visible_returns_a_copy() -> None:
    record = RecordState()
    apply_upsert(record, [("title", '"a"', s(1))])
    record.visible().clear()
    assert set(record.visible()) == {"title"}


# --- Replica: the same rules through Change values -------------------------


def upsert(rid: str, *writes: tuple[str, str, str]) -> Change:
    return Change("todos", rid, "upsert", tuple(FieldWrite(*w) for w in writes))


def delete(rid: str, stamp: str) -> Change:
    return Change("todos", rid, "delete", (), stamp)


def test_replica_apply_change_reports_what_altered_state() -> None:
    r = Replica()
    assert r.apply_change(upsert("t1", ("title", '"a"', s(2))))
    assert not r.apply_change(upsert("t1", ("title", '"z"', s(1))))
    assert r.apply_change(delete("t1", s(3)))
    assert not r.apply_change(delete("t1", s(3)))
    assert not r.apply_change(upsert("t1", ("title", '"b"', s(3))))
    assert r.apply_change(upsert("t1", ("done", "true", s(4))))
    assert r.state() == {("todos", "t1"): ({"done": ("true", s(4))}, s(3))}


def test_replica_keeps_collections_and_records_apart() -> None:
    r = Replica()
    r.apply_change(Change("todos", "x", "upsert", (FieldWrite("n", "1", s(1)),)))
    r.apply_change(Change("notes", "x", "delete", (), s(9)))
    r.apply_change(Change("todos", "y", "upsert", (FieldWrite("n", "2", s(1)),)))
    assert r.state() == {
        ("todos", "x"): ({"n": ("1", s(1))}, None),
        ("notes", "x"): ({}, s(9)),
        ("todos", "y"): ({"n": ("2", s(1))}, None),
    }


# --- properties -------------------------------------------------------------

# A small pool of stamps so that equal stamps, and deletes and writes at the
# same stamp, come up often. A field's value is a function of (record, field,
# stamp): devices never write two values with one stamp.
stamps = st.builds(
    s,
    st.integers(min_value=1, max_value=6),
    st.integers(min_value=0, max_value=2),
    st.sampled_from(["a", "b"]),
)
record_ids = st.sampled_from(["r1", "r2", "r3"])
field_names = ["title", "done", "tags"]


def value_of(rid: str, name: str, stamp: str) -> str:
    return json.dumps(f"{rid}/{name}@{stamp}")


@st.composite
def changes(draw: st.DrawFn) -> Change:
    rid = draw(record_ids)
    if draw(st.booleans()) and draw(st.booleans()):
        return Change("todos", rid, "delete", (), draw(stamps))
    names = draw(st.lists(st.sampled_from(field_names), min_size=1, max_size=3, unique=True))
    writes = []
    for name in names:
        stamp = draw(stamps)
        writes.append(FieldWrite(name, value_of(rid, name, stamp), stamp))
    return Change("todos", rid, "upsert", tuple(writes))


change_lists = st.lists(changes(), min_size=1, max_size=15)


def replay(items: list[Change]) -> Replica:
    replica = Replica()
    for c in items:
        replica.apply_change(c)
    return replica


def model(items: list[Change]) -> dict[Any, Any]:
    """The rules of PROTOCOL.md computed from the whole set at once, no merge code."""
    cut: dict[tuple[str, str], str | None] = {}
    best: dict[tuple[str, str], dict[str, tuple[str, str]]] = {}
    for c in items:
        key = (c.collection, c.record_id)
        cut.setdefault(key, None)
        best.setdefault(key, {})
        if c.op == "delete":
            assert c.hlc is not None
            current = cut[key]
            cut[key] = c.hlc if current is None else max(current, c.hlc)
        for w in c.fields:
            held = best[key].get(w.name)
            if held is None or w.hlc > held[1]:
                best[key][w.name] = (w.value, w.hlc)
    return {
        key: (
            {n: vh for n, vh in best[key].items() if cut[key] is None or vh[1] > cut[key]},
            cut[key],
        )
        for key in best
    }


def deltas_of(replica: Replica) -> list[Delta]:
    """Record deltas as a pull would give them: visible fields and the delete state."""
    out = []
    for (collection, rid), record in replica.records.items():
        out.append(
            Delta(
                collection,
                rid,
                1,
                "d1",
                {n: (f.value, f.hlc) for n, f in record.visible().items()},
                record.deleted,
                record.deleted_hlc,
                None,
                None,
            )
        )
    return out


def snapshot(replica: Replica) -> dict[Any, Any]:
    """Everything stored, visible or not."""
    return {
        key: ({n: (f.value, f.hlc) for n, f in rec.fields.items()}, rec.deleted_hlc)
        for key, rec in replica.records.items()
    }


@settings(max_examples=200, deadline=None)
@given(change_lists)
def test_state_matches_an_independent_model(items: list[Change]) -> None:
    replica = replay(items)
    expected = model(items)
    assert replica.state() == expected
    for key, (visible, cut) in expected.items():
        assert replica.records[key].deleted is (cut is not None and not visible)


@settings(max_examples=200, deadline=None)
@given(st.data(), change_lists)
def test_any_order_gives_the_same_state(data: st.DataObject, items: list[Change]) -> None:
    shuffled = data.draw(st.permutations(items))
    assert replay(shuffled).state() == replay(items).state()


@settings(max_examples=200, deadline=None)
@given(change_lists, st.data())
def test_applying_again_changes_nothing(items: list[Change], data: st.DataObject) -> None:
    replica = replay(items)
    before = snapshot(replica)
    again = data.draw(st.permutations(items))
    assert [replica.apply_change(c) for c in again] == [False] * len(items)
    assert snapshot(replica) == before


@settings(max_examples=200, deadline=None)
@given(change_lists)
def test_apply_reports_true_exactly_when_stored_state_changed(items: list[Change]) -> None:
    replica = Replica()
    for c in items:
        before = snapshot(replica)
        applied = replica.apply_change(c)
        assert applied == (snapshot(replica) != before)


@settings(max_examples=200, deadline=None)
@given(change_lists, change_lists, st.data())
def test_catch_up_through_deltas_converges(
    mine: list[Change], theirs: list[Change], data: st.DataObject
) -> None:
    a, b = replay(mine), replay(theirs)
    from_a, from_b = deltas_of(a), deltas_of(b)
    # Deltas may come in any order and more than once.
    for d in data.draw(st.permutations(from_a + from_a[:1])):
        b.apply_delta(d)
    for d in data.draw(st.permutations(from_b)):
        a.apply_delta(d)
    union = replay(mine + theirs).state()
    assert a.state() == union
    assert b.state() == union


@settings(max_examples=200, deadline=None)
@given(change_lists)
def test_a_fresh_replica_rebuilt_from_deltas_has_the_same_state(items: list[Change]) -> None:
    source = replay(items)
    copy = Replica()
    for d in reversed(deltas_of(source)):
        copy.apply_delta(d)
    assert copy.state() == source.state()
