"""Parsing and validating what clients send (PROTOCOL.md: changes, limits,
cursors, pull queries).

Every rejected input is checked for its error class, its ``code`` and
``status``, and for a message that names where it is wrong
("changes[1].fields.title"). Pure: no event loop, no network.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.errors import (
    BadRequest,
    ClockSkew,
    HubError,
    InvalidChange,
    PayloadTooLarge,
    RateLimited,
)
from hub.protocol import (
    Limits,
    ack_message,
    decode_cursor,
    encode_cursor,
    error_of,
    message_id,
    parse_changes,
    parse_http_push,
    parse_pull_query,
)
from hub.types import Change, Cursor, FieldWrite, Push

NOW = 1732185600123  # the hub's clock in these tests, in ms
LIMITS = Limits()


def stamp(wall: int = NOW, counter: int = 0, node: str = "phone-1") -> str:
    return f"{wall:013d}-{counter:04d}-{node}"


S = stamp()


def good() -> dict[str, Any]:
    return {
        "collection": "todos",
        "id": "t1",
        "op": "upsert",
        "fields": {"title": {"value": "a", "hlc": S}},
    }


def up(fields: Any, **extra: Any) -> dict[str, Any]:
    return {"collection": "todos", "id": "t1", "op": "upsert", "fields": fields, **extra}


def title(value: Any, hlc: Any = S) -> dict[str, Any]:
    return {"title": {"value": value, "hlc": hlc}}


def rm(**extra: Any) -> dict[str, Any]:
    return {"collection": "todos", "id": "t1", "op": "delete", "hlc": S, **extra}


def with_key(change: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    return {**change, key: value}


def without(change: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in change.items() if k != key}


def body(changes: Any, device: Any = "phone-1") -> bytes:
    return json.dumps({"device": device, "changes": changes}).encode()


def http(raw: bytes, key: str | None = None, limits: Limits = LIMITS) -> Push:
    return parse_http_push(raw, user="u1", key=key, limits=limits, now_ms=NOW)


def xfail(reason: str, raises: type[BaseException]) -> Any:
    """A known bug: the test fails with ``raises`` until the module is fixed."""
    return pytest.mark.xfail(strict=True, reason=reason, raises=raises)


DID_NOT_RAISE = pytest.fail.Exception  # what pytest.raises raises when nothing was raised


def assert_error(exc: HubError, cls: type[HubError], code: str, status: int, where: str) -> None:
    assert type(exc) is cls
    assert exc.code == code
    assert exc.status == status
    assert where in exc.message
    assert exc.body()["error"]["code"] == code


# --- one bad change, placed after a good one: the message names its index ----

BAD_CHANGES: list[Any] = [
    pytest.param(5, "changes[1]", id="change-is-a-number"),
    pytest.param(["collection", "todos"], "changes[1]", id="change-is-a-list"),
    pytest.param(None, "changes[1]", id="change-is-null"),
    pytest.param(with_key(good(), "extra", 1), "changes[1]", id="unknown-key"),
    pytest.param(with_key(good(), "version", 3), "changes[1]", id="unknown-key-version"),
    pytest.param(without(good(), "collection"), "changes[1].collection", id="collection-missing"),
    pytest.param(
        with_key(good(), "collection", ""), "changes[1].collection", id="collection-empty"
    ),
    pytest.param(
        with_key(good(), "collection", "c" * 65), "changes[1].collection", id="collection-65"
    ),
    pytest.param(
        with_key(good(), "collection", "a/b"), "changes[1].collection", id="collection-slash"
    ),
    pytest.param(
        with_key(good(), "collection", "a:b"), "changes[1].collection", id="collection-colon"
    ),
    pytest.param(
        with_key(good(), "collection", 7), "changes[1].collection", id="collection-number"
    ),
    pytest.param(without(good(), "id"), "changes[1].id", id="id-missing"),
    pytest.param(with_key(good(), "id", ""), "changes[1].id", id="id-empty"),
    pytest.param(with_key(good(), "id", "i" * 129), "changes[1].id", id="id-129"),
    pytest.param(with_key(good(), "id", "a\u0000b"), "changes[1].id", id="id-nul"),
    pytest.param(with_key(good(), "id", 12), "changes[1].id", id="id-number"),
    pytest.param(without(good(), "op"), "changes[1].op", id="op-missing"),
    pytest.param(with_key(good(), "op", "merge"), "changes[1].op", id="op-unknown"),
    pytest.param(with_key(good(), "op", "UPSERT"), "changes[1].op", id="op-wrong-case"),
    pytest.param(without(good(), "fields"), "changes[1].fields", id="upsert-no-fields"),
    pytest.param(up({}), "changes[1].fields", id="upsert-empty-fields"),
    pytest.param(up([{"value": 1, "hlc": S}]), "changes[1].fields", id="upsert-fields-list"),
    pytest.param(up("title"), "changes[1].fields", id="upsert-fields-string"),
    pytest.param(up(None), "changes[1].fields", id="upsert-fields-null"),
    pytest.param(
        up({"_secret": {"value": 1, "hlc": S}}), "changes[1].fields._secret", id="field-underscore"
    ),
    pytest.param(up({"a b": {"value": 1, "hlc": S}}), "changes[1].fields.a b", id="field-space"),
    pytest.param(up({"a/b": {"value": 1, "hlc": S}}), "changes[1].fields.a/b", id="field-slash"),
    pytest.param(
        up({"\u00e9t\u00e9": {"value": 1, "hlc": S}}),
        "changes[1].fields.\u00e9t\u00e9",
        id="field-non-ascii",
    ),
    pytest.param(up({"": {"value": 1, "hlc": S}}), "changes[1].fields.", id="field-empty-name"),
    pytest.param(
        up({"f" * 65: {"value": 1, "hlc": S}}), "changes[1].fields." + "f" * 65, id="field-65"
    ),
    pytest.param(up({"title": "a"}), "changes[1].fields.title", id="spec-not-object"),
    pytest.param(up({"title": {"hlc": S}}), "changes[1].fields.title", id="spec-no-value"),
    pytest.param(up({"title": {"value": 1}}), "changes[1].fields.title", id="spec-no-hlc"),
    pytest.param(
        up({"title": {"value": 1, "hlc": S, "x": 0}}),
        "changes[1].fields.title",
        id="spec-extra-key",
    ),
    pytest.param(up(title("x" * (64 * 1024 - 1))), "changes[1].fields.title", id="value-64KiB+1"),
    pytest.param(
        up(title("\u00e9" * 32768)), "changes[1].fields.title", id="value-64KiB-counted-in-bytes"
    ),
    pytest.param(up(title("a\u0000b")), "changes[1].fields.title", id="value-nul"),
    pytest.param(up(title(["ok", "\u0000"])), "changes[1].fields.title", id="value-nul-in-list"),
    pytest.param(up(title({"k\u0000": 1})), "changes[1].fields.title", id="value-nul-in-key"),
    pytest.param(
        up(title({"a": [{"b": "x\u0000"}]})), "changes[1].fields.title", id="value-nul-deep"
    ),
    pytest.param(up(title(1, "nope")), "changes[1].fields.title.hlc", id="field-stamp-garbage"),
    pytest.param(
        up(title(1, "173218560012-0000-p")),
        "changes[1].fields.title.hlc",
        id="field-stamp-12-digits",
    ),
    pytest.param(
        up(title(1, stamp()[: -len("phone-1")])),
        "changes[1].fields.title.hlc",
        id="field-stamp-no-node",
    ),
    pytest.param(
        up(title(1, stamp(node="a/b"))), "changes[1].fields.title.hlc", id="field-stamp-bad-node"
    ),
    pytest.param(
        up(title(1, stamp(node="n" * 65))), "changes[1].fields.title.hlc", id="field-stamp-node-65"
    ),
    pytest.param(up(title(1, NOW)), "changes[1].fields.title.hlc", id="field-stamp-number"),
    pytest.param(up(title(1, None)), "changes[1].fields.title.hlc", id="field-stamp-null"),
    pytest.param(up(title(1), hlc=S), "changes[1].hlc", id="upsert-with-top-level-hlc"),
    pytest.param(
        rm(fields={"title": {"value": 1, "hlc": S}}), "changes[1].fields", id="delete-with-fields"
    ),
    pytest.param(rm(fields={}), "changes[1].fields", id="delete-with-empty-fields"),
    pytest.param(without(rm(), "hlc"), "changes[1].hlc", id="delete-no-hlc"),
    pytest.param(rm(hlc="yesterday"), "changes[1].hlc", id="delete-bad-hlc"),
    pytest.param(rm(actor="x" * 4095), "changes[1].actor", id="actor-4KiB+1"),
    pytest.param(rm(actor={"name": "a\u0000"}), "changes[1].actor", id="actor-nul"),
    pytest.param(rm(origin="robot"), "changes[1].origin", id="origin-unknown"),
    pytest.param(rm(origin="User"), "changes[1].origin", id="origin-wrong-case"),
    pytest.param(rm(origin=5), "changes[1].origin", id="origin-number"),
    pytest.param(
        rm(origin=["user"]),
        "changes[1].origin",
        id="origin-list",
    ),
    pytest.param(
        rm(origin={"kind": "user"}),
        "changes[1].origin",
        id="origin-object",
    ),
]


@pytest.mark.parametrize(("change", "where"), BAD_CHANGES)
def test_bad_change_is_invalid_change_naming_index_and_field(change: Any, where: str) -> None:
    with pytest.raises(InvalidChange) as info:
        parse_changes([good(), change], LIMITS, NOW)
    assert_error(info.value, InvalidChange, "invalid_change", 400, where)
    assert info.value.message.startswith(where + ": ")
    assert info.value.index == 1


@pytest.mark.parametrize(("change", "where"), BAD_CHANGES)
def test_bad_change_rejects_the_whole_http_push(change: Any, where: str) -> None:
    with pytest.raises(InvalidChange) as info:
        http(body([good(), change]))
    assert where in info.value.message


def test_invalid_change_details_carry_index_and_field() -> None:
    changes = [good(), good(), good(), up({"title": {"value": 1}})]
    with pytest.raises(InvalidChange) as info:
        parse_changes(changes, LIMITS, NOW)
    assert info.value.message.startswith("changes[3].fields.title: ")
    assert (info.value.index, info.value.field) == (3, "fields.title")
    assert info.value.details == {"index": 3, "field": "fields.title"}


def test_unknown_key_is_named() -> None:
    with pytest.raises(InvalidChange) as info:
        parse_changes([good(), good(), with_key(good(), "colour", "red")], LIMITS, NOW)
    assert info.value.message.startswith("changes[2]: ")
    assert "colour" in info.value.message


def test_first_bad_change_is_reported() -> None:
    changes = [good(), with_key(good(), "id", ""), with_key(good(), "op", "x")]
    with pytest.raises(InvalidChange, match=re.escape("changes[1].id")):
        parse_changes(changes, LIMITS, NOW)


# --- limits at their edges --------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("x" * (64 * 1024 - 2), id="string-exactly-64KiB"),
        pytest.param("\u00e9" * 32767, id="two-byte-chars-exactly-64KiB"),
        pytest.param("\\u0000", id="literal-backslash-u0000"),
        pytest.param(["\\u0000", {"\\u0000": "\\\\u0000"}], id="literal-backslash-u0000-nested"),
        pytest.param("\u0001\u001f\u2028", id="other-control-chars"),
        pytest.param(None, id="null"),
        pytest.param({"deep": [1, 2.5, -3, True, None, {"x": "\u00fc"}]}, id="nested"),
    ],
)
def test_values_within_the_limits_are_accepted(value: Any) -> None:
    (_, change) = parse_changes([good(), up(title(value))], LIMITS, NOW)
    (write,) = change.fields
    assert json.loads(write.value) == value


def push_of_value(raw_value: bytes) -> bytes:
    """An HTTP push body whose one field has ``raw_value`` as its JSON text."""
    return (
        b'{"device":"d","changes":[{"collection":"c","id":"i","op":"upsert",'
        b'"fields":{"t":{"value":' + raw_value + b',"hlc":"' + S.encode() + b'"}}}]}'
    )


def exactly(text: str | bytes) -> Any:
    """JSON with every number as an exact Decimal, to compare numbers digit for digit."""
    return json.loads(text, parse_float=Decimal, parse_int=Decimal)


@pytest.mark.parametrize(
    "raw_value",
    [
        pytest.param(b"123456789012345678901234567890", id="integer-beyond-64-bits"),
        pytest.param(b"-9223372036854775809", id="negative-19-digits-beyond-64-bits"),
        pytest.param(b"18446744073709551615", id="largest-unsigned-64-bit"),
        pytest.param(b"3.141592653589793238462643", id="more-digits-than-a-double"),
        pytest.param(b"123456789012345678901234567890.5", id="long-with-fraction"),
        pytest.param(b"0.1000000000000000055511151231257827", id="double-rounding"),
        pytest.param(b'{"a":[1.23456789012345678e-5,2]}', id="nested-with-exponent"),
        pytest.param(b"[1e-400,-2.5E-350]", id="below-the-smallest-double"),
        pytest.param(b"[0.1,1.5,-2,1e300,true,null]", id="numbers-a-double-holds"),
    ],
)
def test_numbers_are_kept_as_written(raw_value: bytes) -> None:
    # PostgreSQL stores a value's numbers as numerics, digit for digit: what
    # the hub hands it must be the number written, not a double's rounding.
    (change,) = http(push_of_value(raw_value)).changes
    assert exactly(change.fields[0].value) == exactly(raw_value)


@pytest.mark.parametrize(
    ("raw_value", "mentions"),
    [
        pytest.param(b"[" * 129 + b"]" * 129, "nested more than 128", id="129-deep"),
        pytest.param(b"[" * 300 + b"]" * 300, "nested more than 128", id="300-deep"),
        pytest.param(b"[" * 1000 + b"1" + b"]" * 1000, "nested more than 128", id="1000-deep"),
        pytest.param(
            b"[" * 1000 + b"123456789012345678901234" + b"]" * 1000,
            "nested",
            id="1000-deep-with-a-long-number",
        ),
        pytest.param(
            b"[" + b",".join([b"1e308"] * 250) + b"]",
            "written out in full",
            id="exponents-that-expand-past-64KiB",
        ),
        pytest.param(
            b"[" + b",".join([b"1e-300"] * 250) + b"]",
            "written out in full",
            id="negative-exponents-that-expand-past-64KiB",
        ),
        pytest.param(
            b"[" + b",".join([b"1e-400"] * 200) + b"]",
            "written out in full",
            id="exponents-below-a-double-that-expand-past-64KiB",
        ),
        pytest.param(b"1e400", "malformed JSON", id="beyond-a-double"),
    ],
)
def test_values_that_would_not_stay_within_the_limits_are_refused(
    raw_value: bytes, mentions: str
) -> None:
    with pytest.raises(HubError) as info:
        http(push_of_value(raw_value))
    assert info.value.status == 400
    assert info.value.code in {"invalid_change", "bad_request"}
    assert mentions in info.value.message


@pytest.mark.parametrize(
    "raw_value",
    [
        b"1e-16384",
        b"[1, 2.5e-16384]",
        b"1.5E-16383",
        # Written out, with no exponent to give them away.
        b"0." + b"1" * 16384,
        b"[1, -0." + b"0" * 16383 + b"7]",
    ],
    ids=["exponent", "in an array", "mantissa", "written out", "written out in an array"],
)
def test_numbers_postgresql_cannot_store_are_refused_naming_the_field(raw_value: bytes) -> None:
    # numeric keeps at most 16383 digits after the point; passed on, the whole
    # batch of every user would fail in the database.
    with pytest.raises(InvalidChange, match=re.escape("changes[0].fields.t: a number has more")):
        http(push_of_value(raw_value))


def test_a_number_with_16383_digits_after_the_point_is_kept_whole() -> None:
    (change,) = http(push_of_value(b"0." + b"1" * 16383)).changes
    assert change.fields[0].value == "0." + "1" * 16383


def test_numbers_are_read_the_same_whatever_else_the_push_holds() -> None:
    # A 16-digit run elsewhere (an id) makes the hub read numbers exactly; the
    # ones a double holds must still come out as they do otherwise.
    plain = push_of_value(b"[1.5e3,2.50,1e-7,0.1,-0.0]")
    with_digits = plain.replace(b'"id":"i"', b'"id":"1234567890123456"')
    assert with_digits != plain
    (a,), (b,) = http(plain).changes, http(with_digits).changes
    assert a.fields[0].value == b.fields[0].value == "[1500.0,2.5,0.0000001,0.1,0.0]"


def test_value_nested_128_deep_is_accepted() -> None:
    (change,) = http(push_of_value(b"[" * 128 + b"]" * 128)).changes
    assert change.fields[0].value == "[" * 128 + "]" * 128


def test_literal_backslash_u0000_in_raw_json_accepted_but_real_nul_rejected() -> None:
    literal = b'{"device":"d","changes":[{"collection":"c","id":"i","op":"upsert",' + (
        b'"fields":{"t":{"value":"\\\\u0000","hlc":"' + S.encode() + b'"}}}]}'
    )
    push = http(literal)
    assert json.loads(push.changes[0].fields[0].value) == "\\" + "u0000"
    nul = literal.replace(b"\\\\u0000", b"\\u0000")
    with pytest.raises(InvalidChange, match=re.escape("changes[0].fields.t")):
        http(nul)


def test_collection_and_id_at_their_longest_accepted() -> None:
    (change,) = parse_changes(
        [{"collection": "c" * 64, "id": "\u00fc" * 128, "op": "delete", "hlc": S}], LIMITS, NOW
    )
    assert (change.collection, change.record_id) == ("c" * 64, "\u00fc" * 128)


def test_field_name_at_its_longest_accepted() -> None:
    (change,) = parse_changes([up({"f" * 64: {"value": 1, "hlc": S}})], LIMITS, NOW)
    assert change.fields[0].name == "f" * 64


def test_actor_exactly_4KiB_accepted() -> None:
    (change,) = parse_changes([rm(actor="x" * 4094)], LIMITS, NOW)
    assert change.actor is not None and len(change.actor.encode()) == 4096


def test_1000_changes_accepted_1001_too_large() -> None:
    assert len(parse_changes([good()] * 1000, LIMITS, NOW)) == 1000
    with pytest.raises(PayloadTooLarge) as info:
        parse_changes([good()] * 1001, LIMITS, NOW)
    assert_error(info.value, PayloadTooLarge, "payload_too_large", 413, "1001")
    assert (info.value.size, info.value.limit) == (1001, 1000)


def test_20000_fields_in_a_push_accepted_20001_too_large() -> None:
    # What a push writes, in all: a change may hold many fields, but one push
    # is committed in one go, so its fields together are bounded too.
    def wide(n: int) -> dict[str, Any]:
        return up({f"f{i}": {"value": i, "hlc": S} for i in range(n)})

    assert len(parse_changes([wide(10_000), wide(10_000)], LIMITS, NOW)) == 2
    with pytest.raises(PayloadTooLarge) as info:
        parse_changes([wide(10_000), wide(10_001)], LIMITS, NOW)
    assert_error(info.value, PayloadTooLarge, "payload_too_large", 413, "20001")


def test_too_many_changes_rejected_before_any_is_checked() -> None:
    with pytest.raises(PayloadTooLarge):
        http(body([{"bad": True}] * 1001))


def test_configured_limits_apply() -> None:
    small = Limits(max_changes_per_push=2, max_value_bytes=10, max_clock_drift_ms=5)
    with pytest.raises(PayloadTooLarge):
        parse_changes([good()] * 3, small, NOW)
    with pytest.raises(InvalidChange, match=re.escape("changes[0].fields.title")):
        parse_changes([up(title("x" * 9))], small, NOW)
    assert parse_changes([up(title("x" * 8))], small, NOW)
    with pytest.raises(ClockSkew):
        parse_changes([rm(hlc=stamp(NOW + 6))], small, NOW)


# --- clock skew -------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "ahead"),
    [
        pytest.param(up(title(1, stamp(NOW + 60_001))), 60_001, id="field-stamp"),
        pytest.param(rm(hlc=stamp(NOW + 60_001)), 60_001, id="delete-stamp"),
        pytest.param(up(title(1, stamp(NOW + 86_400_000))), 86_400_000, id="a-day-ahead"),
    ],
)
def test_stamp_too_far_ahead_is_clock_skew(change: dict[str, Any], ahead: int) -> None:
    with pytest.raises(ClockSkew) as info:
        parse_changes([good(), change], LIMITS, NOW)
    exc = info.value
    assert type(exc) is ClockSkew and isinstance(exc, BadRequest)
    assert (exc.code, exc.status) == ("clock_skew", 400)
    assert (exc.ahead_ms, exc.max_ms) == (ahead, 60_000)
    assert exc.details["index"] == 1
    assert "correct the device clock" in exc.message


def test_clock_skew_message_names_index_and_field() -> None:
    changes = [
        good(),
        good(),
        up({"done": {"value": True, "hlc": S}, "title": {"value": 1, "hlc": stamp(NOW + 60_001)}}),
    ]
    with pytest.raises(ClockSkew) as info:
        parse_changes(changes, LIMITS, NOW)
    assert "changes[2].fields.title" in info.value.message


@pytest.mark.parametrize(
    "hlc",
    [
        pytest.param(stamp(NOW + 60_000, 9999), id="exactly-the-drift-ahead"),
        pytest.param(stamp(NOW), id="now"),
        pytest.param(stamp(NOW - 86_400_000 * 365), id="a-year-old"),
        pytest.param(stamp(0), id="epoch"),
    ],
)
def test_stamps_within_drift_or_old_are_accepted(hlc: str) -> None:
    (a, b) = parse_changes([up(title(1, hlc)), rm(hlc=hlc)], LIMITS, NOW)
    assert a.fields[0].hlc == hlc and b.hlc == hlc


# --- valid pushes parse to the expected values ------------------------------


def test_valid_http_push_parses_to_changes() -> None:
    t1, t2 = stamp(NOW - 5), stamp(NOW - 1, 3, "laptop")
    raw = body(
        [
            {
                "collection": "todos",
                "id": "t1",
                "op": "upsert",
                "fields": {
                    "title": {"value": "Buy milk", "hlc": t1},
                    "done": {"value": False, "hlc": t1},
                    "tags": {"value": ["a", 1, None], "hlc": t2},
                },
                "origin": "agent",
                "actor": {"agent": "planner", "run": 7},
            },
            {"collection": "todos", "id": "t1", "op": "delete", "hlc": t2},
            {
                "collection": "notes.v2",
                "id": "n\u00fc/1 x",
                "op": "upsert",
                "fields": {"body": {"value": {"\u00fc": 1.5}, "hlc": t1}},
                "origin": "user",
            },
        ],
        device="phone-1:web",
    )
    push = http(raw, key="key-1")
    assert push == Push(
        user="u1",
        device="phone-1:web",
        changes=(
            Change(
                "todos",
                "t1",
                "upsert",
                (
                    FieldWrite("title", '"Buy milk"', t1),
                    FieldWrite("done", "false", t1),
                    FieldWrite("tags", '["a",1,null]', t2),
                ),
                None,
                "agent",
                '{"agent":"planner","run":7}',
            ),
            Change("todos", "t1", "delete", (), t2, None, None),
            Change(
                "notes.v2",
                "n\u00fc/1 x",
                "upsert",
                (FieldWrite("body", '{"\u00fc":1.5}', t1),),
                None,
                "user",
                None,
            ),
        ),
        key="key-1",
        scope="http",
        digest=hashlib.sha256(raw).digest(),
    )


@pytest.mark.parametrize("origin", ["user", "agent", "system", "migration", None])
def test_every_origin_accepted(origin: str | None) -> None:
    (change,) = parse_changes([rm(origin=origin)], LIMITS, NOW)
    assert change.origin == origin


def test_empty_change_list_is_a_valid_push() -> None:
    assert http(body([])).changes == ()


def test_digest_tells_bodies_apart() -> None:
    a, b = body([good()]), body([good(), good()])
    assert http(a).digest != http(b).digest
    assert http(a).digest == http(a).digest


# --- the HTTP push envelope -------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "mentions"),
    [
        pytest.param(b"", "JSON", id="empty-body"),
        pytest.param(b"{", "JSON", id="malformed-json"),
        pytest.param(b'{"device": "d", "changes": [],}', "JSON", id="trailing-comma"),
        pytest.param(b'{"device": "\xff", "changes": []}', "JSON", id="invalid-utf8"),
        pytest.param(b"[]", "object", id="body-list"),
        pytest.param(b'"push"', "object", id="body-string"),
        pytest.param(b"null", "object", id="body-null"),
        pytest.param(json.dumps({"changes": []}).encode(), "device", id="device-missing"),
        pytest.param(body([], device=""), "device", id="device-empty"),
        pytest.param(body([], device="d" * 65), "device", id="device-65"),
        pytest.param(body([], device="a b"), "device", id="device-space"),
        pytest.param(body([], device="a/b"), "device", id="device-slash"),
        pytest.param(body([], device=5), "device", id="device-number"),
        pytest.param(body([], device=None), "device", id="device-null"),
        pytest.param(json.dumps({"device": "d"}).encode(), "changes", id="changes-missing"),
        pytest.param(body({"0": good()}), "changes", id="changes-object"),
        pytest.param(body(None), "changes", id="changes-null"),
        pytest.param(body("[]"), "changes", id="changes-string"),
    ],
)
def test_bad_http_push_is_bad_request(raw: bytes, mentions: str) -> None:
    with pytest.raises(BadRequest) as info:
        http(raw)
    assert_error(info.value, BadRequest, "bad_request", 400, mentions)


@pytest.mark.parametrize("key", ["", "k" * 256])
def test_bad_idempotency_key_is_bad_request(key: str) -> None:
    with pytest.raises(BadRequest) as info:
        http(body([good()]), key=key)
    assert_error(info.value, BadRequest, "bad_request", 400, "Idempotency-Key")


@pytest.mark.parametrize("key", [None, "k", "k" * 255])
def test_good_idempotency_key_kept(key: str | None) -> None:
    assert http(body([good()]), key=key).key == key


def test_http_body_over_the_limit_is_payload_too_large() -> None:
    raw = body([good()])
    assert http(raw, limits=Limits(max_http_body_bytes=len(raw))).changes
    with pytest.raises(PayloadTooLarge) as info:
        http(raw, limits=Limits(max_http_body_bytes=len(raw) - 1))
    assert_error(info.value, PayloadTooLarge, "payload_too_large", 413, str(len(raw)))


def test_default_http_body_limit_is_10MiB() -> None:
    raw = body([good()])
    raw = raw + b" " * (10 * 1024 * 1024 + 1 - len(raw))
    with pytest.raises(PayloadTooLarge):
        http(raw)


def test_parse_changes_needs_a_list() -> None:
    with pytest.raises(BadRequest) as info:
        parse_changes({"changes": []}, LIMITS, NOW)
    assert_error(info.value, BadRequest, "bad_request", 400, "changes")


# --- cursors ----------------------------------------------------------------

URL_SAFE = re.compile(r"[0-9]+(\.[A-Za-z0-9_-]+)?")
versions = st.integers(min_value=0, max_value=10**18 - 1)


@settings(max_examples=200, deadline=None)
@given(versions)
def test_version_cursor_round_trip(version: int) -> None:
    text = encode_cursor(Cursor(version))
    assert text == str(version)
    assert decode_cursor(text) == Cursor(version)


@settings(max_examples=200, deadline=None)
@given(
    versions,
    st.text(alphabet="abcXYZ019_.-", min_size=1, max_size=64),
    st.text(
        st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
        min_size=1,
        max_size=128,
    ),  # as ids are
)
def test_position_cursor_round_trip(version: int, collection: str, record_id: str) -> None:
    text = encode_cursor(Cursor(version, collection, record_id))
    # Opaque, but safe to put in a query string as it is.
    assert URL_SAFE.fullmatch(text)
    assert decode_cursor(text) == Cursor(version, collection, record_id)


@pytest.mark.parametrize(
    ("given_", "expected"),
    [
        (None, Cursor(0)),
        ("", Cursor(0)),
        (0, Cursor(0)),
        ("0", Cursor(0)),
        (42, Cursor(42)),
        ("42", Cursor(42)),
        ("000000000000000042", Cursor(42)),
    ],
)
def test_cursor_beginning_and_plain_versions(given_: Any, expected: Cursor) -> None:
    assert decode_cursor(given_) == expected


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("abc", id="letters"),
        pytest.param("-1", id="negative"),
        pytest.param("+5", id="plus"),
        pytest.param(" 5", id="leading-space"),
        pytest.param("5 ", id="trailing-space"),
        pytest.param("1" * 19, id="19-digits"),
        pytest.param(".", id="dot-only"),
        pytest.param("." + b64(b'["a","b"]'), id="no-version"),
        pytest.param("5.!!!!", id="position-not-base64"),
        pytest.param("5." + b64(b"not json"), id="position-not-json"),
        pytest.param("5." + b64(b'["a"]'), id="position-one-part"),
        pytest.param("5." + b64(b'["a","b","c"]'), id="position-three-parts"),
        pytest.param("5." + b64(b'[1,"b"]'), id="position-collection-number"),
        pytest.param("5." + b64(b'["a",null]'), id="position-id-null"),
        pytest.param("5." + b64(b"\xff\xfe"), id="position-not-utf8"),
        pytest.param(-3, id="negative-int"),
        pytest.param(True, id="bool"),
        pytest.param(3.0, id="float"),
        pytest.param(["5"], id="list"),
        pytest.param(
            "\u00b2",
            id="superscript-two",
        ),
        pytest.param(
            "5." + b64(b"12"),
            id="position-a-number",
        ),
        pytest.param(
            "\u0661\u0662",
            id="arabic-indic-digits",
        ),
        pytest.param(
            "5." + b64(b'"ab"'),
            id="position-a-string",
        ),
        pytest.param(
            "5." + b64(b'{"a":1,"b":2}'),
            id="position-an-object",
        ),
        pytest.param("5." + b64(b'["todos\\u0000","a"]'), id="position-collection-nul"),
        pytest.param("5." + b64(b'["a/b","a"]'), id="position-collection-not-a-name"),
        pytest.param("5." + b64(b'["todos","a\\u0000"]'), id="position-id-nul"),
        pytest.param("5." + b64(b'["todos",""]'), id="position-id-empty"),
        pytest.param("5." + b64(orjson.dumps(["todos", "x" * 129])), id="position-id-too-long"),
        pytest.param(10**18, id="int-beyond-18-digits"),
        pytest.param(2**63, id="int-beyond-64-bits-signed"),
        pytest.param(False, id="false"),
        pytest.param(True, id="true"),
        pytest.param(0.0, id="a float zero"),
    ],
)
def test_malformed_cursor_is_bad_request(text: Any) -> None:
    with pytest.raises(BadRequest) as info:
        decode_cursor(text)
    assert_error(info.value, BadRequest, "bad_request", 400, "malformed cursor")


# --- pull queries -----------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "limit"),
    [
        ({}, 500),
        ({"limit": None}, 500),
        ({"limit": ""}, 500),
        ({"limit": "1"}, 1),
        ({"limit": 1}, 1),
        ({"limit": "5000"}, 5000),
        ({"limit": 5000}, 5000),
        ({"limit": "250"}, 250),
    ],
)
def test_pull_limit(params: dict[str, Any], limit: int) -> None:
    assert parse_pull_query(params, LIMITS).limit == limit


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("0", id="zero-text"),
        pytest.param(0, id="zero"),
        pytest.param(-1, id="negative"),
        pytest.param("5001", id="5001-text"),
        pytest.param(5001, id="5001"),
        pytest.param("abc", id="letters"),
        pytest.param("1.5", id="decimal-text"),
        pytest.param("7.0", id="decimal-zero-text"),
        pytest.param("1e3", id="exponent-text"),
        pytest.param([3], id="list"),
        pytest.param({"n": 3}, id="object"),
        pytest.param(True, id="bool"),
        pytest.param(
            2.5,
            id="float",
        ),
        pytest.param(
            "1_000",
            id="underscore-digits",
        ),
        pytest.param(
            "\u0665",
            id="arabic-indic-five",
        ),
    ],
)
def test_bad_pull_limit_is_bad_request(raw: Any) -> None:
    with pytest.raises(BadRequest) as info:
        parse_pull_query({"limit": raw}, LIMITS)
    assert_error(info.value, BadRequest, "bad_request", 400, "'limit'")


def test_pull_limit_follows_configured_maximum() -> None:
    small = Limits(default_pull_limit=7, max_pull_limit=10)
    assert parse_pull_query({}, small).limit == 7
    assert parse_pull_query({"limit": "10"}, small).limit == 10
    with pytest.raises(BadRequest):
        parse_pull_query({"limit": "11"}, small)


def test_pull_query_reads_cursor_and_collection() -> None:
    since = encode_cursor(Cursor(9, "todos", "t1"))
    q = parse_pull_query({"since": since, "collection": "todos"}, LIMITS)
    assert (q.cursor, q.collection) == (Cursor(9, "todos", "t1"), "todos")
    assert parse_pull_query({}, LIMITS).collection is None


@pytest.mark.parametrize("collection", ["a/b", "c" * 65, 5, ["todos"]])
def test_bad_pull_collection_is_bad_request(collection: Any) -> None:
    with pytest.raises(BadRequest) as info:
        parse_pull_query({"collection": collection}, LIMITS)
    assert_error(info.value, BadRequest, "bad_request", 400, "'collection'")


def test_bad_pull_cursor_is_bad_request() -> None:
    with pytest.raises(BadRequest, match="malformed cursor"):
        parse_pull_query({"since": "x"}, LIMITS)


@pytest.mark.parametrize(
    "mid", ["m-1", 'quote"back\\slash', "ünïcödé ✓", "tab\tnew\nline\x01", "x" * 64]
)
@pytest.mark.parametrize("replay", [False, True])
def test_ack_text_is_the_json_of_the_ack_object(mid, replay):
    ack = {"type": "ack", "id": mid, "version": 12, "applied": 3, "ignored": 1}
    if replay:
        ack["replay"] = True
    text = ack_message(mid, 12, 3, 1, replay)
    assert text == orjson.dumps(ack).decode()
    assert orjson.loads(text) == ack


@pytest.mark.parametrize("mid", ["", "x" * 65, "a\x00b", 5, None])
def test_bad_message_id_is_bad_request(mid: Any) -> None:
    # A NUL would reach PostgreSQL in the receipt and fail the whole batch.
    with pytest.raises(BadRequest, match="'id'"):
        message_id({"type": "push", "id": mid}, required=True)


def test_what_a_push_grows_by_once_written_out_is_bounded() -> None:
    # Each value is within its 64 KiB written out, but 20 of them would make the
    # hub hold (and PostgreSQL store) over 1 MiB more than the push carried.
    many = "[" + ",".join(["1e300"] * 200) + "]"
    change = {"collection": "c", "op": "upsert", "fields": {"v": {"value": 0, "hlc": S}}}
    changes = [{**change, "id": f"r{i}"} for i in range(20)]
    raw = orjson.dumps(changes).replace(b'"value":0', b'"value":' + many.encode())
    with pytest.raises(PayloadTooLarge, match="written out"):
        http(b'{"device":"d","changes":' + raw + b"}")
    assert len(http(b'{"device":"d","changes":' + raw.replace(b"1e300", b"1") + b"}").changes) == 20


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ([1e300, 2**70], "[1" + "0" * 300 + f",{2**70}]"),  # a client's values, not parsed JSON
        ({"t": 1e-7, "id": 2**64}, '{"t":0.0000001,"id":18446744073709551616}'),
        ([-0.0, 1, -0.05], "[0.0,1,-0.05]"),  # jsonb has no negative zero
    ],
)
def test_numbers_are_spelled_as_they_will_be_stored(value: Any, stored: str) -> None:
    (change,) = parse_changes([up(title(value))], LIMITS, NOW)
    assert change.fields[0].value == stored


@pytest.mark.parametrize(
    ("wait", "told"), [(0.0, 0.01), (0.0004, 0.01), (0.0123, 0.013), (0.5, 0.5), (2.0001, 2.001)]
)
def test_a_rate_limit_never_says_retry_now(wait: float, told: float) -> None:
    # A bucket a hair short of a token said "retry_after": 0: the client
    # retried at once and was refused again.
    error = RateLimited("too many messages", wait)
    assert error.retry_after == told
    assert orjson.loads(error_of(error, "m-1"))["retry_after"] == told
