"""A capture assembled from one observed stream (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.compare.records import CaptureAssembler, CaptureTag, Side, TagError

PRIMARY = CaptureTag(Side.PRIMARY, "ns/route/0", ("candidate", "secondary"))
REQUEST = [(":method", "GET"), (":path", "/a?b=1"), ("x-request-id", "rid-1"), ("authorization", "Bearer s3cret"), ("cookie", "a=b")]


def test_tags_read_back_as_written() -> None:
    assert CaptureTag.decode(PRIMARY.encode()) == PRIMARY


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "{",
        '{"side":"x","rule":"r","targets":[]}',
        '{"side":"shadow","rule":"r","targets":["a","b"]}',
        '{"side":"primary","rule":"","targets":[]}',
        '{"side":"primary","rule":"r","targets":"ab"}',  # a string is not a list of targets
        '{"side":"primary","rule":"r","targets":{"a":1}}',
        "[" * 100_000,  # deeper than the JSON parser goes
        "[]",
    ],
)
def test_a_stream_without_a_proper_tag_is_refused(text: str | None) -> None:
    with pytest.raises(TagError):
        CaptureTag.decode(text)


def test_a_response_is_captured_with_envoys_latency_and_without_credentials() -> None:
    a = CaptureAssembler(PRIMARY, body_limit=100)
    a.request_headers(REQUEST, now=10.0)
    headers = [(":status", "201"), ("set-cookie", "s=1"), ("x-envoy-upstream-service-time", "42"), ("etag", "1"), ("x-token", "t")]
    assert a.response_headers(headers, end_of_stream=False, now=10.5, wall=1000.0) is None
    assert a.response_body(b'{"a":', end_of_stream=False, wall=1000.0) is None
    done = a.response_body(b"1}", end_of_stream=True, wall=1001.0)
    assert done is not None
    assert (done.request_id, done.method, done.path, done.status) == ("rid-1", "GET", "/a?b=1", 201)
    assert done.body == b'{"a":1}' and not done.body_truncated and not done.local_reply
    assert done.latency_ms == 42.0, "Envoy's own measure, not the observer's clock"
    assert dict(done.headers) == {"etag": "1", "x-token": "t"}
    assert "s3cret" not in repr(done) and "a=b" not in repr(done)


def test_private_headers_are_never_kept() -> None:
    a = CaptureAssembler(PRIMARY, body_limit=100, private_headers=frozenset({"x-token"}))
    a.request_headers(REQUEST, now=0.0)
    done = a.response_headers([(":status", "200"), ("x-token", "t")], end_of_stream=True, now=0.1, wall=0.0)
    assert done is not None and done.headers == () and done.body == b""


def test_a_reply_envoy_made_itself_is_marked_and_timed_by_the_observer() -> None:
    a = CaptureAssembler(PRIMARY, body_limit=100)
    a.request_headers(REQUEST, now=1.0)
    done = a.response_headers([(":status", "503")], end_of_stream=True, now=1.25, wall=0.0)
    assert done is not None and done.local_reply and done.latency_ms == 250.0


@given(st.lists(st.binary(max_size=50), max_size=10), st.integers(0, 120))
def test_the_body_is_kept_up_to_the_bound_and_completes_as_soon_as_it_passes(chunks: list[bytes], limit: int) -> None:
    a = CaptureAssembler(PRIMARY, body_limit=limit)
    # No credentials: a body cut through one's beginning loses that beginning (below).
    a.request_headers([(name, value) for name, value in REQUEST if name not in ("authorization", "cookie")], now=0.0)
    a.response_headers([(":status", "200")], end_of_stream=False, now=0.0, wall=0.0)
    whole = b""
    done = None
    for i, chunk in enumerate(chunks):
        whole += chunk
        done = a.response_body(chunk, end_of_stream=i == len(chunks) - 1, wall=0.0)
        if done is not None:
            break
    if done is None:
        return  # no chunks at all: still waiting
    assert len(done.body) <= limit
    assert done.body == whole[: len(done.body)]
    assert done.body_truncated == (len(whole) > limit)


@pytest.mark.parametrize("status", ["²", "abc", "", "2000", "9" * 25, "9" * 5000, "099"])
def test_a_status_that_is_not_a_number_yields_nothing(status: str) -> None:
    a = CaptureAssembler(PRIMARY, body_limit=10)
    a.request_headers(REQUEST, now=0.0)
    headers = [(":status", status), ("x-envoy-upstream-service-time", "²")]
    assert a.response_headers(headers, end_of_stream=True, now=0.0, wall=0.0) is None


def test_a_stream_that_missed_its_request_headers_yields_nothing() -> None:
    a = CaptureAssembler(PRIMARY, body_limit=10)
    assert a.response_headers([(":status", "200")], end_of_stream=True, now=0.0, wall=0.0) is None


def test_credentials_the_response_repeats_are_replaced_before_anything_is_kept() -> None:
    a = CaptureAssembler(PRIMARY, body_limit=1000, private_headers=frozenset({"x-api-key"}))
    a.request_headers([*REQUEST, ("x-api-key", "key-123456"), ("cookie", "session=abcdef123; theme=1")], now=0.0)
    a.response_headers([(":status", "200"), ("x-echo", "Bearer s3cret")], end_of_stream=False, now=0.0, wall=0.0)
    body = (
        b'{"auth": "Bearer s3cret", "token": "s3cret", "cookie": "session=abcdef123; theme=1",'
        b' "sid": "abcdef123", "k": "key-123456", "n": 1}'
    )
    done = a.response_body(body, end_of_stream=True, wall=0.0)
    assert done is not None
    for secret in (b"s3cret", b"abcdef123", b"key-123456"):
        assert secret not in done.body and secret not in repr(done.headers).encode()
    assert b'"n": 1}' in done.body, "the short cookie value 1 is left alone: replacing it everywhere would wreck the body"


@pytest.mark.parametrize("upstream_time", ["9" * 10, "9" * 400])
def test_an_upstream_time_longer_than_envoys_is_not_a_latency(upstream_time: str) -> None:
    """float("9" * 400) is infinite: it would be stored, and break every report's JSON."""
    a = CaptureAssembler(PRIMARY, body_limit=10)
    a.request_headers(REQUEST, now=1.0)
    done = a.response_headers([(":status", "200"), ("x-envoy-upstream-service-time", upstream_time)], True, now=1.5, wall=0.0)
    assert done is not None and done.latency_ms == 500.0, "Envoy's timing of the stream instead"


@pytest.mark.parametrize("cut", range(1, len(b"tok_9f8e7d6c5b4a3")))
def test_a_secret_the_body_bound_cuts_leaves_no_beginning_behind(cut: int) -> None:
    body = b'{"echo":"Bearer tok_9f8e7d6c5b4a3"}'
    start = body.index(b"tok_")
    a = CaptureAssembler(PRIMARY, body_limit=start + cut)
    a.request_headers([*REQUEST[:3], ("authorization", "Bearer tok_9f8e7d6c5b4a3")], now=0.0)
    a.response_headers([(":status", "200")], end_of_stream=False, now=0.0, wall=0.0)
    done = a.response_body(body, end_of_stream=True, wall=0.0)
    assert done is not None and done.body_truncated
    # The whole value "Bearer tok_..." is a secret too: its beginning may go with the token's.
    kept, redacted = done.body[: -len(b"(redacted)")], done.body[-len(b"(redacted)") :]
    assert redacted == b"(redacted)" and body[:start].startswith(kept), f"cut {cut} bytes into the token: {done.body!r}"


def test_a_body_the_bound_cuts_elsewhere_is_kept_as_it_is() -> None:
    a = CaptureAssembler(PRIMARY, body_limit=8)
    a.request_headers(REQUEST, now=0.0)
    a.response_headers([(":status", "200")], end_of_stream=False, now=0.0, wall=0.0)
    done = a.response_body(b'{"n": 12345678}', end_of_stream=True, wall=0.0)
    assert done is not None and done.body == b'{"n": 12'


def test_each_value_of_a_repeated_credential_or_private_header_is_a_secret() -> None:
    """Envoy's access log joins a repeated request header's values with ",";
    HTTP/2's cookie headers arrive joined with "; " or ", "."""
    a = CaptureAssembler(PRIMARY, body_limit=1000, private_headers=frozenset({"x-api-key"}))
    joined = [
        ("authorization", "Bearer first-token-1,Bearer second-token-2"),
        ("cookie", "sess=sess-AAAAAAAA, csrf=csrf-BBBBBBBB; theme=dark-mode"),
        ("x-api-key", "key-one-111,key-two-222"),
    ]
    a.request_headers([*REQUEST[:3], *joined], now=0.0)
    a.response_headers([(":status", "200")], end_of_stream=False, now=0.0, wall=0.0)
    secrets = [b"first-token-1", b"second-token-2", b"sess-AAAAAAAA", b"csrf-BBBBBBBB", b"dark-mode", b"key-one-111", b"key-two-222"]
    done = a.response_body(b'{"seen": "' + b" ".join(secrets) + b'"}', end_of_stream=True, wall=0.0)
    assert done is not None
    for secret in secrets:
        assert secret not in done.body


def test_a_secret_in_the_requests_path_is_not_kept() -> None:
    a = CaptureAssembler(PRIMARY, body_limit=10, private_headers=frozenset({"x-api-key"}))
    a.request_headers([(":method", "GET"), (":path", "/a?key=key-123456"), ("x-request-id", "r"), ("x-api-key", "key-123456")], 0.0)
    done = a.response_headers([(":status", "200")], end_of_stream=True, now=0.0, wall=0.0)
    assert done is not None and done.path == "/a?key=(redacted)"
