"""Hypothesis strategies for what Envoy (or anything else) may send a sampler."""

from __future__ import annotations

from hypothesis import strategies as st

from extproc.wire import HeaderMap, HeaderValue, HttpBody, HttpHeaders, HttpTrailers, ProcessingRequest

SLOTS = ("x-mirror-cluster-0", "x-mirror-cluster-1")

names = st.one_of(
    st.sampled_from(
        [":path", ":authority", ":method", "x-request-id", "cookie", "traceparent", *SLOTS, "X-Mirror-Cluster-0", "x-mirror-rule"]
    ),
    st.text(min_size=0, max_size=20),
)
raw_values = st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\xff\xfe", b"shadow", b"x" * 65536]))
header_values = st.builds(
    lambda k, raw, text, which: (
        HeaderValue(key=k, raw_value=raw) if which == 0 else HeaderValue(key=k, value=text) if which == 1 else HeaderValue(key=k)
    ),
    names,
    raw_values,
    st.text(max_size=30),
    st.integers(0, 2),
)
header_maps = st.lists(header_values, max_size=40).map(lambda hs: HeaderMap(headers=hs))
messages = st.one_of(
    st.builds(lambda h, eos: ProcessingRequest(request_headers=HttpHeaders(headers=h, end_of_stream=eos)), header_maps, st.booleans()),
    st.builds(lambda h: ProcessingRequest(response_headers=HttpHeaders(headers=h)), header_maps),
    st.builds(lambda b: ProcessingRequest(request_body=HttpBody(body=b, end_of_stream=True)), st.binary(max_size=2048)),
    st.builds(lambda b: ProcessingRequest(response_body=HttpBody(body=b)), st.binary(max_size=64)),
    st.builds(lambda h: ProcessingRequest(request_trailers=HttpTrailers(trailers=h)), header_maps),
    st.builds(lambda h: ProcessingRequest(response_trailers=HttpTrailers(trailers=h)), header_maps),
    st.just(ProcessingRequest()),  # no kind at all
)
