"""Key sources (docs/DESIGN.md: the key is the first key source present, as bytes)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.core.keys import DEFAULT_KEY_CHAIN, KeyKind, KeySource, extract_key, parse_key_chain, parse_key_source

FAST = settings(max_examples=200, deadline=None)

TRACE_ID = b"4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = b"00f067aa0ba902b7"
TRACEPARENT = b"00-" + TRACE_ID + b"-" + PARENT_ID + b"-01"

H = KeySource(KeyKind.HEADER, "x-user")
C = KeySource(KeyKind.COOKIE, "user")
Q = KeySource(KeyKind.QUERY, "uid")
T = KeySource(KeyKind.TRACEPARENT)
CHAIN = (H, C, Q, T)


def key(chain: tuple[KeySource, ...], headers: dict[str, bytes]) -> bytes | None:
    found = extract_key(chain, headers)
    return None if found is None else found[1]


# --------------------------------------------------------------------------
# Parsing key sources and chains.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("header:x-request-id", KeySource(KeyKind.HEADER, "x-request-id")),
        ("header:X-User-Id", KeySource(KeyKind.HEADER, "x-user-id")),
        ("  header:X-USER  ", KeySource(KeyKind.HEADER, "x-user")),
        ("cookie:session", KeySource(KeyKind.COOKIE, "session")),
        ("query:uid", KeySource(KeyKind.QUERY, "uid")),
        ("traceparent", KeySource(KeyKind.TRACEPARENT)),
    ],
)
def test_parse_key_source_valid(text: str, expected: KeySource) -> None:
    assert parse_key_source(text) == expected


def test_key_source_str_round_trips() -> None:
    for text in ("header:x-user-id", "cookie:session", "query:uid", "traceparent"):
        assert str(parse_key_source(text)) == text


@pytest.mark.parametrize("text", ["bogus:x", "headers:x-id", "uuid", "hdr", ""])
def test_parse_key_source_unknown_kind_names_the_text(text: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_key_source(text)
    msg = str(e.value)
    assert repr(text) in msg
    assert "header:NAME" in msg and "traceparent" in msg  # says what is allowed


@pytest.mark.parametrize("text", ["header", "header:", "cookie", "cookie:", "query", "query:"])
def test_parse_key_source_missing_name(text: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_key_source(text)
    assert repr(text) in str(e.value)
    assert "name" in str(e.value)


@pytest.mark.parametrize("text", ["traceparent:x", "header:bad name", "header:a(b)", "cookie:a=b", "query:a&b", "cookie:a;b", "query:a#b"])
def test_parse_key_source_bad_names(text: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_key_source(text)
    assert repr(text) in str(e.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        # A flag or variable holding bytes that are not UTF-8 arrives with lone surrogates.
        ("cookie:\udcff", "bytes that are not UTF-8"),
        ("cookie:a\x01b", "control character"),
        ("query:\udcff", "bytes that are not UTF-8"),
        ("query:u\udcffid", "bytes that are not UTF-8"),
        ("query:a\x01b", "control character"),
        ("query:a\x7fb", "control character"),
        ("header:" + "x" * 257, "longer than 256 bytes"),
        ("cookie:" + "c" * 257, "longer than 256 bytes"),
        ("query:" + "\u00e9" * 129, "longer than 256 bytes"),
    ],
)
def test_parse_key_source_refuses_names_no_engine_can_carry(text: str, problem: str) -> None:
    """A name every engine (the sampler, the inline Lua, the C module) reads as
    the same bytes, or an error at start-up; never one that fails per request."""
    with pytest.raises(ValueError) as e:
        parse_key_source(text)
    assert repr(text) in str(e.value) and problem in str(e.value)


@pytest.mark.parametrize(
    "text",
    ["cookie:__Host-session", "cookie:s\u00e9", "cookie:user[id]", "cookie:a/b", "query:s\u00e9", "query:a.b[]", "query:" + "q" * 256],
)
def test_parse_key_source_accepts_names_every_engine_carries(text: str) -> None:
    source = parse_key_source(text)
    assert str(source) == text
    name = source.name.encode()
    assert extract_key((source,), {"cookie": name + b"=1", ":path": b"/?" + name + b"=1"}) == (source, b"1")
    assert parse_key_source("header:" + "x" * 256).name == "x" * 256


def test_parse_key_chain_refuses_more_sources_than_the_module_takes() -> None:
    assert len(parse_key_chain(",".join(f"header:x-{i}" for i in range(16)))) == 16
    with pytest.raises(ValueError, match="17 sources; at most 16"):
        parse_key_chain(",".join(f"header:x-{i}" for i in range(17)))


def test_parse_key_chain_valid() -> None:
    chain = parse_key_chain("header:X-User-Id, cookie:session,query:uid ,traceparent")
    assert chain == (
        KeySource(KeyKind.HEADER, "x-user-id"),
        KeySource(KeyKind.COOKIE, "session"),
        KeySource(KeyKind.QUERY, "uid"),
        KeySource(KeyKind.TRACEPARENT),
    )
    assert parse_key_chain("header:x-request-id") == DEFAULT_KEY_CHAIN
    assert parse_key_chain("traceparent,") == (KeySource(KeyKind.TRACEPARENT),)


def test_parse_key_chain_unknown_source_named() -> None:
    with pytest.raises(ValueError) as e:
        parse_key_chain("header:x-id, bogus:thing")
    assert "'bogus:thing'" in str(e.value)


@pytest.mark.parametrize(
    "text", ["header:x-id,header:x-id", "header:X-Id, header:x-id", "traceparent,traceparent", "cookie:s,query:u,cookie:s"]
)
def test_parse_key_chain_duplicates(text: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_key_chain(text)
    assert "twice" in str(e.value)
    assert text in str(e.value)


def test_cookie_and_header_of_the_same_name_are_different_sources() -> None:
    assert len(parse_key_chain("header:session,cookie:session,query:session")) == 3


@pytest.mark.parametrize("text", ["", "   ", ",", " , ,"])
def test_parse_key_chain_empty(text: str) -> None:
    with pytest.raises(ValueError, match="empty key chain"):
        parse_key_chain(text)


# --------------------------------------------------------------------------
# Order and fall-through.


def test_default_chain_is_x_request_id() -> None:
    assert (KeySource(KeyKind.HEADER, "x-request-id"),) == DEFAULT_KEY_CHAIN
    assert extract_key(DEFAULT_KEY_CHAIN, {"x-request-id": b"abc"}) == (DEFAULT_KEY_CHAIN[0], b"abc")


def test_first_present_source_wins() -> None:
    headers = {
        "x-user": b"from-header",
        "cookie": b"user=from-cookie",
        ":path": b"/p?uid=from-query",
        "traceparent": TRACEPARENT,
    }
    assert extract_key(CHAIN, headers) == (H, b"from-header")
    assert extract_key((T, Q, C, H), headers) == (T, TRACE_ID)
    assert extract_key((Q, H), headers) == (Q, b"from-query")
    assert extract_key((C, Q), headers) == (C, b"from-cookie")


def test_fall_through_absent_and_empty() -> None:
    assert extract_key(CHAIN, {"cookie": b"user=c", ":path": b"/?uid=q"}) == (C, b"c")
    # Empty header value counts as absent.
    assert extract_key(CHAIN, {"x-user": b"", "cookie": b"user=c"}) == (C, b"c")
    # Empty cookie value, empty query value fall through too.
    assert extract_key(CHAIN, {"x-user": b"", "cookie": b"user=", ":path": b"/?uid=q"}) == (Q, b"q")
    assert extract_key(CHAIN, {"cookie": b"user=", ":path": b"/?uid=", "traceparent": TRACEPARENT}) == (T, TRACE_ID)
    assert extract_key(CHAIN, {":path": b"/?uid", "traceparent": TRACEPARENT}) == (T, TRACE_ID)
    # Invalid traceparent is absent: nothing left.
    assert extract_key(CHAIN, {"x-user": b"", "traceparent": b"garbage"}) is None


def test_none_present() -> None:
    assert extract_key(CHAIN, {}) is None
    assert extract_key(CHAIN, {":path": b"/", ":method": b"GET", "x-other": b"1"}) is None
    assert extract_key((), {"x-user": b"v"}) is None


def test_header_source_uses_lower_cased_name_from_chain() -> None:
    chain = parse_key_chain("header:X-User")
    assert key(chain, {"x-user": b"v"}) == b"v"


def test_pseudo_header_as_key() -> None:
    assert key((KeySource(KeyKind.HEADER, ":authority"),), {":authority": b"example.com"}) == b"example.com"


# --------------------------------------------------------------------------
# Cookies.


@pytest.mark.parametrize(
    ("cookie", "expected"),
    [
        (b"user=alice", b"alice"),
        (b"a=1; user=alice; b=2", b"alice"),
        (b"a=1;user=alice;b=2", b"alice"),
        (b"a=1;    user=alice   ;b=2", b"alice"),
        (b"user=first; user=second", b"first"),
        (b"xuser=no; user=yes", b"yes"),
        (b"userx=no; user=yes", b"yes"),
        (b"xuser=no", None),
        (b"user", None),
        (b"user=", None),
        (b"USER=upper", None),  # cookie names are case-sensitive
        (b"a=1; user=x=y", b"x=y"),  # value up to the next ';', '=' inside kept
        (b"", None),
    ],
)
def test_cookie(cookie: bytes, expected: bytes | None) -> None:
    assert key((C,), {"cookie": cookie}) == expected


def test_cookie_without_cookie_header() -> None:
    assert key((C,), {"x-user": b"v"}) is None


def test_cookie_multiple_joined_headers() -> None:
    # The service joins repeated cookie headers with "; " before keys see them.
    assert key((C,), {"cookie": b"a=1; b=2; user=joined"}) == b"joined"


# --------------------------------------------------------------------------
# Query parameters.


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/p?uid=abc", b"abc"),
        (b"/p?a=1&uid=abc&b=2", b"abc"),
        (b"/p?uid=first&uid=second", b"first"),
        (b"/p?uid=a%20b", b"a%20b"),  # raw, not decoded
        (b"/p?uid=a+b", b"a+b"),
        (b"/p?uid=%E4%BD%A0", b"%E4%BD%A0"),
        (b"/p?uid=abc#frag", b"abc"),
        (b"/p?x=1#uid=abc", None),
        (b"/p?xuid=1&uidx=2", None),
        (b"/p", None),
        (b"/uid=abc", None),
        (b"/p?", None),
        (b"/p?uid", None),
        (b"/p?uid=", None),
        (b"/p?uid=&uid=second", None),  # first occurrence counts, and it is empty
    ],
)
def test_query(path: bytes, expected: bytes | None) -> None:
    assert key((Q,), {":path": path}) == expected


def test_query_without_path() -> None:
    assert key((Q,), {}) is None


# --------------------------------------------------------------------------
# traceparent.


def test_traceparent_valid() -> None:
    assert extract_key((T,), {"traceparent": TRACEPARENT}) == (T, TRACE_ID)
    assert key((T,), {"traceparent": b"00-" + TRACE_ID + b"-" + PARENT_ID + b"-00"}) == TRACE_ID


def test_traceparent_future_version_with_extra_fields() -> None:
    # W3C: a higher version may append "-..." after the flags.
    assert key((T,), {"traceparent": b"cc-" + TRACE_ID + b"-" + PARENT_ID + b"-01-what-the-future-will-be-like"}) == TRACE_ID


@pytest.mark.parametrize(
    "value",
    [
        b"00-" + b"0" * 32 + b"-" + PARENT_ID + b"-01",  # all-zero trace-id
        b"ff-" + TRACE_ID + b"-" + PARENT_ID + b"-01",  # version ff
        b"00-" + TRACE_ID.upper() + b"-" + PARENT_ID + b"-01",  # upper-case hex
        b"00-" + TRACE_ID + b"-" + PARENT_ID.upper() + b"-01",
        b"0A-" + TRACE_ID + b"-" + PARENT_ID + b"-01",
        b"00-" + TRACE_ID[:-1] + b"-" + PARENT_ID + b"-01",  # 31 hex
        b"00-" + TRACE_ID + b"0-" + PARENT_ID + b"-01",  # 33 hex
        b"00-" + TRACE_ID[:-1] + b"g-" + PARENT_ID + b"-01",  # non-hex
        b"00_" + TRACE_ID + b"_" + PARENT_ID + b"_01",
        b"00-" + TRACE_ID + b"-" + PARENT_ID,  # no flags
        b"00-" + TRACE_ID + b"-" + PARENT_ID + b"-1",
        b"0-" + TRACE_ID + b"-" + PARENT_ID + b"-01",
        TRACE_ID,
        b"",
        b"garbage",
    ],
)
def test_traceparent_invalid_is_absent(value: bytes) -> None:
    assert extract_key((T,), {"traceparent": value}) is None


@pytest.mark.parametrize(
    "value",
    [
        TRACEPARENT + b"x",  # flags must be followed by end of string (or '-' in a later version)
        TRACEPARENT + b"0",
        TRACEPARENT + b"-extra",  # version 00 is exactly 55 characters
        b"cc-" + TRACE_ID + b"-" + PARENT_ID + b"-01x",
    ],
)
def test_traceparent_trailing_garbage_is_malformed(value: bytes) -> None:
    """W3C trace-context: version 00 is exactly 55 characters; in any version the
    flags are followed by the end of the value or a '-'."""
    assert extract_key((T,), {"traceparent": value}) is None


def test_traceparent_all_zero_parent_id_is_invalid() -> None:
    """W3C trace-context: an all-zero parent-id is invalid and the header must be ignored."""
    value = b"00-" + TRACE_ID + b"-" + b"0" * 16 + b"-01"
    assert extract_key((T,), {"traceparent": value}) is None


# --------------------------------------------------------------------------
# Bytes pass through unchanged.


def test_non_utf8_bytes_pass_through() -> None:
    raw = b"\xff\xfe\x80caf\xe9"
    assert key((H,), {"x-user": raw}) == raw
    assert key((C,), {"cookie": b"a=1; user=" + raw}) == raw
    assert key((Q,), {":path": b"/p?uid=" + raw}) == raw
    assert key((H,), {"x-user": b"  padded  "}) == b"  padded  "


@FAST
@given(value=st.binary(max_size=200))
def test_header_bytes_round_trip(value: bytes) -> None:
    found = extract_key((H,), {"x-user": value})
    if value:
        assert found == (H, value)
    else:
        assert found is None


cookie_value = st.binary(min_size=1, max_size=60).filter(lambda v: b";" not in v and v == v.strip())


@FAST
@given(value=cookie_value, before=st.lists(st.sampled_from([b"a=1", b"xuser=no", b"userx=no", b"b"]), max_size=3))
def test_cookie_bytes_round_trip(value: bytes, before: list[bytes]) -> None:
    cookie = b"; ".join([*before, b"user=" + value, b"user=later"])
    assert key((C,), {"cookie": cookie}) == value


query_value = st.binary(min_size=1, max_size=60).filter(lambda v: not (set(v) & set(b"&#")))


@FAST
@given(value=query_value)
def test_query_bytes_round_trip(value: bytes) -> None:
    assert key((Q,), {":path": b"/p?a=1&uid=" + value + b"&uid=later"}) == value


@FAST
@given(trace_id=st.binary(min_size=16, max_size=16), parent=st.binary(min_size=8, max_size=8).filter(any), flags=st.integers(0, 255))
def test_traceparent_round_trip(trace_id: bytes, parent: bytes, flags: int) -> None:
    hex_id = trace_id.hex().encode()
    value = b"00-" + hex_id + b"-" + parent.hex().encode() + b"-" + f"{flags:02x}".encode()
    found = key((T,), {"traceparent": value})
    if trace_id == bytes(16):
        assert found is None
    else:
        assert found == hex_id
