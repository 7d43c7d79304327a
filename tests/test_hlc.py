"""HLC stamps (PROTOCOL.md, "HLC stamps"): syntax, order, and the device clock.

Pure: no event loop, no I/O. Clocks get a fake ``wall`` so time is scripted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub import hlc
from hub.hlc import Clock, Stamp

NODE_CHARS = "ABCXYZabcxyz0189_.:-"
walls = st.integers(min_value=0, max_value=10**13 - 1)
counters = st.integers(min_value=0, max_value=9999)
nodes = st.text(alphabet=NODE_CHARS, min_size=1, max_size=64)
parts = st.tuples(walls, counters, nodes)


def text(wall_ms: int, counter: int, node: str) -> str:
    """The stamp form written out by hand, independent of ``hlc.format_stamp``."""
    return f"{wall_ms:013d}-{counter:04d}-{node}"


def scripted(values: Iterable[int]) -> Callable[[], int]:
    """A wall clock that returns the given milliseconds, one per call."""
    it = iter(values)
    return lambda: next(it)


# --- syntax ---------------------------------------------------------------


def test_format_matches_the_protocol_example() -> None:
    assert hlc.format_stamp(1732185600123, 7, "phone-1") == "1732185600123-0007-phone-1"


def test_parse_splits_the_three_parts() -> None:
    assert hlc.parse("0000000000005-0042-node:1") == Stamp(5, 42, "node:1")


@settings(max_examples=200, deadline=None)
@given(parts)
def test_format_parse_round_trip(p: tuple[int, int, str]) -> None:
    wall_ms, counter, node = p
    formatted = hlc.format_stamp(wall_ms, counter, node)
    assert formatted == text(wall_ms, counter, node)
    assert hlc.is_stamp(formatted)
    parsed = hlc.parse(formatted)
    assert (parsed.wall_ms, parsed.counter, parsed.node) == p
    assert str(parsed) == formatted


@settings(max_examples=200, deadline=None)
@given(parts, parts)
def test_string_order_is_wall_counter_node_order(
    a: tuple[int, int, str], b: tuple[int, int, str]
) -> None:
    sa, sb = hlc.format_stamp(*a), hlc.format_stamp(*b)
    assert (sa < sb) == (a < b)
    assert (sa == sb) == (a == b)
    # Byte-wise order too (PostgreSQL compares with COLLATE "C").
    assert (sa.encode() < sb.encode()) == (a < b)
    assert (hlc.parse(sa) < hlc.parse(sb)) == (a < b)


@settings(max_examples=200, deadline=None)
@given(st.lists(parts, min_size=2, max_size=20))
def test_sorting_strings_sorts_by_parts(many: list[tuple[int, int, str]]) -> None:
    assert [hlc.parse(s) for s in sorted(text(*p) for p in many)] == [
        Stamp(*p) for p in sorted(many)
    ]


@pytest.mark.parametrize(
    "good",
    [
        "1732185600123-0000-phone-1",
        "0000000000000-0000-a",
        "9999999999999-9999-Z",
        "1732185600123-0007-a.b_c:d-e",
        "1732185600123-0000-" + "n" * 64,
    ],
)
def test_good_stamps_accepted(good: str) -> None:
    assert hlc.is_stamp(good)
    assert str(hlc.parse(good)) == good


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("", id="empty"),
        pytest.param("173218560012-0000-n", id="wall-12-digits"),
        pytest.param("17321856001234-0000-n", id="wall-14-digits"),
        pytest.param("1732185600123-000-n", id="counter-3-digits"),
        pytest.param("1732185600123-00000-n", id="counter-5-digits"),
        pytest.param("1732185600123-0000-", id="empty-node"),
        pytest.param("1732185600123-0000", id="no-node"),
        pytest.param("1732185600123-0000-" + "n" * 65, id="node-65-chars"),
        pytest.param("1732185600123-0000-a/b", id="node-slash"),
        pytest.param("1732185600123-0000-a b", id="node-space"),
        pytest.param("1732185600123-0000-\u00e9", id="node-non-ascii"),
        pytest.param("1732185600123-0000-a\x00", id="node-nul"),
        pytest.param("1732185600123-0000-n\n", id="trailing-newline"),
        pytest.param(" 1732185600123-0000-n", id="leading-space"),
        pytest.param("1732185600123_0000_n", id="wrong-separators"),
        pytest.param("17321856001x3-0000-n", id="letter-in-wall"),
        pytest.param("\u0661" * 13 + "-0000-n", id="non-ascii-digits"),
        pytest.param("+732185600123-0000-n", id="sign-in-wall"),
    ],
)
def test_bad_stamps_rejected(bad: str) -> None:
    assert not hlc.is_stamp(bad)
    with pytest.raises(ValueError, match="not an HLC stamp"):
        hlc.parse(bad)


@pytest.mark.parametrize("bad", [None, 1732185600123, b"1732185600123-0000-n", ["x"]])
def test_non_strings_are_not_stamps(bad: object) -> None:
    assert not hlc.is_stamp(bad)


@pytest.mark.parametrize(
    ("wall_ms", "counter", "node"),
    [
        (-1, 0, "n"),
        (10**13, 0, "n"),
        (0, -1, "n"),
        (0, 10_000, "n"),
        (0, 0, ""),
        (0, 0, "a b"),
        (0, 0, "n" * 65),
    ],
)
def test_format_refuses_values_that_break_the_order(wall_ms: int, counter: int, node: str) -> None:
    with pytest.raises(ValueError):
        hlc.format_stamp(wall_ms, counter, node)


@pytest.mark.parametrize(
    ("stamp", "now_ms", "expected"),
    [
        ("1732185600123-0000-n", 1732185600000, 123),
        ("1732185600123-9999-n", 1732185600123, 0),
        ("1732185600000-0000-n", 1732185660000, -60_000),
        ("0000000000000-0000-n", 5, -5),
    ],
)
def test_ahead_ms(stamp: str, now_ms: int, expected: int) -> None:
    assert hlc.ahead_ms(stamp, now_ms) == expected


# --- the clock --------------------------------------------------------------


def test_clock_follows_an_advancing_wall() -> None:
    clock = Clock("n", wall=scripted([100, 105, 2000]))
    assert [clock.now() for _ in range(3)] == [
        text(100, 0, "n"),
        text(105, 0, "n"),
        text(2000, 0, "n"),
    ]


def test_clock_counts_while_the_wall_stands_still() -> None:
    clock = Clock("n", wall=scripted([100, 100, 100]))
    assert [clock.now() for _ in range(3)] == [
        text(100, 0, "n"),
        text(100, 1, "n"),
        text(100, 2, "n"),
    ]


def test_clock_never_goes_back_when_the_wall_does() -> None:
    clock = Clock("n", wall=scripted([500, 400, 100, 499, 501]))
    assert [clock.now() for _ in range(5)] == [
        text(500, 0, "n"),
        text(500, 1, "n"),
        text(500, 2, "n"),
        text(500, 3, "n"),
        text(501, 0, "n"),
    ]


def test_counter_overflow_borrows_the_next_millisecond() -> None:
    wall = 1732185600123
    clock = Clock("n", wall=lambda: wall)
    stamps = [clock.now() for _ in range(10_000)]
    assert stamps[0] == text(wall, 0, "n")
    assert stamps[-1] == text(wall, 9999, "n")
    assert clock.now() == text(wall + 1, 0, "n")
    assert clock.now() == text(wall + 1, 1, "n")
    assert stamps == sorted(set(stamps))


def test_after_borrowing_the_wall_catches_up_without_repeats() -> None:
    clock = Clock("n", last=text(1000, 9999, "n"), wall=scripted([1000, 1001, 1001, 1002]))
    assert [clock.now() for _ in range(4)] == [
        text(1001, 0, "n"),
        text(1001, 1, "n"),
        text(1001, 2, "n"),
        text(1002, 0, "n"),
    ]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=2_000), min_size=1, max_size=200))
def test_now_strictly_increases_for_any_wall(wall_values: list[int]) -> None:
    clock = Clock("dev-1", wall=scripted(wall_values))
    stamps = [clock.now() for _ in wall_values]
    assert all(a < b for a, b in zip(stamps, stamps[1:], strict=False))
    for i, s in enumerate(stamps):
        parsed = hlc.parse(s)
        assert parsed.node == "dev-1"
        # Never behind the wall clock it was given.
        assert parsed.wall_ms >= max(wall_values[: i + 1])


@pytest.mark.parametrize(
    ("last", "wall", "expected"),
    [
        pytest.param(text(5000, 5, "n"), 4990, text(5000, 6, "n"), id="wall-behind-last"),
        pytest.param(text(5000, 5, "n"), 5000, text(5000, 6, "n"), id="wall-at-last"),
        pytest.param(text(5000, 5, "n"), 5001, text(5001, 0, "n"), id="wall-after-last"),
        pytest.param(text(5000, 9999, "n"), 10, text(5001, 0, "n"), id="last-counter-spent"),
        pytest.param(text(5000, 5, "zzz"), 10, text(5000, 6, "n"), id="last-from-other-node"),
    ],
)
def test_restart_with_last_never_goes_backwards(last: str, wall: int, expected: str) -> None:
    clock = Clock("n", last=last, wall=lambda: wall)
    first = clock.now()
    assert first == expected
    assert first > last


@pytest.mark.parametrize(
    ("remote", "wall", "expected"),
    [
        pytest.param(text(9000, 3, "zz"), 100, text(9000, 4, "a"), id="remote-ahead"),
        pytest.param(text(9000, 9999, "zz"), 100, text(9001, 0, "a"), id="remote-counter-spent"),
        pytest.param(text(50, 7, "zz"), 100, text(100, 0, "a"), id="remote-behind-wall"),
        pytest.param(text(100, 0, "zz"), 100, text(100, 1, "a"), id="remote-at-wall-greater-node"),
    ],
)
def test_observe_moves_past_remote_stamps(remote: str, wall: int, expected: str) -> None:
    clock = Clock("a", wall=lambda: wall)
    clock.observe(remote)
    stamp = clock.now()
    assert stamp == expected
    assert stamp > remote


def test_observe_an_older_stamp_changes_nothing() -> None:
    clock = Clock("a", wall=scripted([700, 700]))
    assert clock.now() == text(700, 0, "a")
    clock.observe(text(600, 42, "z"))
    assert clock.now() == text(700, 1, "a")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("now"), st.integers(min_value=0, max_value=3_000)),
            st.tuples(
                st.just("observe"),
                st.tuples(st.integers(min_value=0, max_value=3_000), counters, nodes),
            ),
        ),
        min_size=1,
        max_size=60,
    )
)
def test_now_is_greater_than_everything_given_or_seen(steps: list[tuple[str, object]]) -> None:
    wall_values = [arg for kind, arg in steps if kind == "now"]
    clock = Clock("me", wall=scripted(wall_values))
    high: str | None = None
    for kind, arg in steps:
        if kind == "now":
            stamp = clock.now()
            if high is not None:
                assert hlc.parse(stamp) > hlc.parse(high)
            high = stamp
        else:
            assert isinstance(arg, tuple)
            seen = text(*arg)
            clock.observe(seen)
            if high is None or hlc.parse(seen) > hlc.parse(high):
                high = seen


@pytest.mark.parametrize("node", ["", "a b", "n" * 65, "a/b"])
def test_clock_refuses_a_bad_node(node: str) -> None:
    with pytest.raises(ValueError):
        Clock(node, wall=lambda: 0)


@pytest.mark.parametrize("last", ["", "garbage", "1732185600123-0000-"])
def test_clock_refuses_a_bad_last_stamp(last: str) -> None:
    with pytest.raises(ValueError):
        Clock("n", last=last, wall=lambda: 0)
