"""One gRPC access log entry as a Capture (pure): what Envoy's entry says,
read (built with xds-protos, Envoy's own messages), then made a capture
through the assembler."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2 as xds_accesslog
from hypothesis import given
from hypothesis import strategies as st

from extproc.compare.entries import BAD_TAG, MALFORMED_ENTRY, EntryError, LoggedEntry, entry_capture, header_lines, read_entry
from extproc.compare.records import CAPTURE_NAMESPACE, REDACTED, CaptureTag, Side
from extproc.wire.accesslog_pb2 import HTTPAccessLogEntry

PRIMARY = CaptureTag(Side.PRIMARY, "ns/route/0", ("candidate",))
SHADOW = CaptureTag(Side.SHADOW, "ns/route/0", ("candidate",))


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def fields(
    tag: CaptureTag = PRIMARY,
    headers: str = ":status: 200\nx-envoy-upstream-service-time: 7\ncontent-type: application/json",
    body: bytes = b'{"a":1}',
    truncated: bool = False,
) -> dict[str, str | bool | float | None]:
    return {"tag": tag.encode(), "headers": b64(headers), "body": b64(body), "truncated": truncated}


def logged(**overrides: Any) -> LoggedEntry:
    values: dict[str, Any] = {
        "request_id": "rid-1",
        "method": "GET",
        "path": "/a?b=1",
        "request_headers": (("authorization", "Bearer s3cret-token"),),
        "fields": fields(),
        "response_code": 200,
        "elapsed_ms": 3.351797,
    }
    values.update(overrides)
    return LoggedEntry(**values)


def capture(entry: LoggedEntry, limit: int = 1024, private: frozenset[str] = frozenset()) -> Any:
    return entry_capture(entry, limit, private, wall=1000.0)


# ---------------------------------------------------------------------------
# Reading Envoy's entry
# ---------------------------------------------------------------------------


def envoy_entry(namespace: dict[str, Any] | None, method: int = base_pb2.POST) -> xds_accesslog.HTTPAccessLogEntry:
    entry = xds_accesslog.HTTPAccessLogEntry()
    common = entry.common_properties
    common.upstream_cluster = "primary"
    if namespace is not None:
        common.metadata.filter_metadata[CAPTURE_NAMESPACE].update(namespace)
    common.metadata.filter_metadata["envoy.lb"].update({"canary": True})
    entry.request.request_method = method
    entry.request.path = "/a"
    entry.request.request_id = "b441c896"
    entry.request.request_headers["authorization"] = "Bearer xyz"
    entry.response.response_code.value = 503
    return entry


def ours(entry: xds_accesslog.HTTPAccessLogEntry) -> HTTPAccessLogEntry:
    return HTTPAccessLogEntry.FromString(entry.SerializeToString())


def test_an_envoy_entry_is_read_with_its_capture_fields_and_timing() -> None:
    entry = envoy_entry({"tag": "t", "headers": "aGk=", "body": "", "truncated": True})
    entry.common_properties.time_to_last_downstream_tx_byte.FromNanoseconds(3_351_797)
    entry.common_properties.duration.FromNanoseconds(3_377_125)
    got = read_entry(ours(entry))
    assert (got.request_id, got.method, got.path, got.response_code) == ("b441c896", "POST", "/a", 503)
    assert got.request_headers == (("authorization", "Bearer xyz"),)
    assert got.fields == {"tag": "t", "headers": "aGk=", "body": "", "truncated": True}
    assert got.elapsed_ms == pytest.approx(3.351797), "to the last byte sent downstream, before the duration"


def test_without_the_last_byte_timing_the_duration_is_used_and_without_both_none() -> None:
    entry = envoy_entry({"tag": "t"})
    entry.common_properties.duration.FromMilliseconds(12)
    assert read_entry(ours(entry)).elapsed_ms == 12.0
    entry.common_properties.ClearField("duration")
    assert read_entry(ours(entry)).elapsed_ms is None


def test_an_entry_without_the_namespace_has_no_fields_and_fields_of_other_kinds_read_as_none() -> None:
    assert read_entry(ours(envoy_entry(None))).fields is None
    got = read_entry(ours(envoy_entry({"tag": None, "headers": ["x"], "body": 3.0})))
    assert got.fields == {"tag": None, "headers": None, "body": 3.0, "truncated": None}


@pytest.mark.parametrize(("number", "name"), [(base_pb2.METHOD_UNSPECIFIED, ""), (base_pb2.PATCH, "PATCH"), (42, "")])
def test_request_methods_read_as_their_names(number: int, name: str) -> None:
    assert read_entry(ours(envoy_entry({}, method=number))).method == name


def test_no_response_code_reads_as_none() -> None:
    entry = envoy_entry({})
    entry.response.ClearField("response_code")
    assert read_entry(ours(entry)).response_code is None


# ---------------------------------------------------------------------------
# The entry as a capture
# ---------------------------------------------------------------------------


def test_an_entry_becomes_its_sides_capture() -> None:
    done = capture(logged())
    assert (done.request_id, done.rule, done.side, done.targets) == ("rid-1", "ns/route/0", Side.PRIMARY, ("candidate",))
    assert (done.method, done.path, done.status, done.body) == ("GET", "/a?b=1", 200, b'{"a":1}')
    assert dict(done.headers) == {"content-type": "application/json"}
    assert not done.local_reply and done.latency_ms == 7.0, "Envoy's upstream time"
    assert not done.body_truncated and done.captured_at == 1000.0
    shadow = capture(logged(fields=fields(SHADOW)))
    assert (shadow.side, shadow.target) == (Side.SHADOW, "candidate")


def test_a_local_reply_is_timed_by_envoys_entry_not_the_observer() -> None:
    done = capture(logged(fields=fields(headers=":status: 503\ncontent-length: 19"), elapsed_ms=2.5))
    assert done.local_reply and done.latency_ms == 2.5 and done.status == 503
    assert capture(logged(fields=fields(headers=":status: 503"), elapsed_ms=None)).latency_ms == 0.0


def test_the_status_is_envoys_response_code_when_the_headers_lack_it() -> None:
    assert capture(logged(fields=fields(headers="x-a: 1"), response_code=204)).status == 204
    assert capture(logged(fields=fields(headers=":status: 201"), response_code=204)).status == 201, "the captured headers first"


def test_logged_credentials_and_private_headers_are_scrubbed_and_never_kept() -> None:
    headers = ":status: 200\nx-echo: Bearer s3cret-token\nset-cookie: sid=abcdef123\nx-api-key: key-123456\nx-seen: abcdef123"
    body = b'{"auth":"Bearer s3cret-token","sid":"abcdef123","k":"key-123456","n":1}'
    request_headers = (("authorization", "Bearer s3cret-token"), ("Cookie", "sid=abcdef123; t=1"), ("x-api-key", "key-123456"))
    done = capture(logged(fields=fields(headers=headers, body=body), request_headers=request_headers), private=frozenset({"x-api-key"}))
    for secret in ("s3cret-token", "abcdef123", "key-123456"):
        assert secret not in repr(done)
    assert dict(done.headers) == {"x-echo": REDACTED.decode(), "x-seen": REDACTED.decode()}
    assert b'"n":1}' in done.body


def test_a_logged_request_id_does_not_override_the_entrys() -> None:
    done = capture(logged(request_headers=(("x-request-id", "other"), (":path", "/other"))))
    assert (done.request_id, done.path) == ("rid-1", "/a?b=1")


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (logged(fields=None), BAD_TAG),
        (logged(fields={**fields(), "tag": None}), BAD_TAG),
        (logged(fields={**fields(), "tag": 1.0}), BAD_TAG),
        (logged(fields={**fields(), "tag": "not json"}), BAD_TAG),
        (logged(fields={**fields(), "tag": '{"side":"shadow","rule":"r","targets":["a","b"]}'}), BAD_TAG),
        (logged(fields={**fields(), "headers": "not base64!"}), MALFORMED_ENTRY),
        (logged(fields={**fields(), "body": True}), MALFORMED_ENTRY),
        (logged(fields={**fields(), "headers": b64("no separator")}), MALFORMED_ENTRY),
        (logged(fields=fields(headers="x-a: 1"), response_code=None), MALFORMED_ENTRY),
        (logged(request_id=""), MALFORMED_ENTRY),
    ],
)
def test_an_entry_that_is_no_capture_says_why(entry: LoggedEntry, reason: str) -> None:
    with pytest.raises(EntryError) as refused:
        capture(entry)
    assert refused.value.reason == reason


def test_missing_headers_and_body_fields_read_as_empty() -> None:
    done = capture(logged(fields={"tag": PRIMARY.encode()}, response_code=404))
    assert (done.status, done.headers, done.body, done.local_reply) == (404, (), b"", True)


@given(st.binary(max_size=200), st.integers(0, 120), st.booleans())
def test_the_body_is_kept_up_to_the_observers_bound_and_truncation_is_kept(body: bytes, limit: int, truncated: bool) -> None:
    # No credentials: a body cut through one's beginning loses that beginning (test_compare_records).
    done = capture(logged(fields=fields(body=body, truncated=truncated), request_headers=()), limit=limit)
    assert done.body == body[:limit]
    assert done.body_truncated == (truncated or len(body) > limit)


_NAME = st.from_regex(r"[a-z0-9\-]{1,20}|:status", fullmatch=True)
_VALUE = st.text(st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]), max_size=30)


@given(st.lists(st.tuples(_NAME, _VALUE), max_size=10))
def test_header_lines_split_on_the_first_separator_only(headers: list[tuple[str, str]]) -> None:
    text = "\n".join(f"{name}: {value}" for name, value in headers)
    assert header_lines(text) == headers


def test_header_lines_keep_duplicates_and_values_with_separators() -> None:
    text = "Set-Cookie: a=1\nset-cookie: b=2\nlink: <a>; rel=x: y\nx-empty:\n"
    assert header_lines(text) == [("set-cookie", "a=1"), ("set-cookie", "b=2"), ("link", "<a>; rel=x: y"), ("x-empty", "")]
