"""The HTTP/2 transport's header-block replay against plain ``hpack`` (pure)."""

from __future__ import annotations

from typing import Any

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.server.transports.http2.frames import HEADER_TABLE_SIZE
from extproc.server.transports.http2.hpack_replay import BlockDecoder
from extproc.server.transports.http2.limits import Limits

HEADERS = [(b"x-mirror-rule-id", b"default/r/0"), (b"x-request-id", b"a"), (b"content-type", b"application/grpc")]


def _decoder() -> BlockDecoder:
    limits = Limits()
    return BlockDecoder(limits.max_header_list_size, limits.hard_header_list_size)


def _prefixed(size: int) -> bytearray:
    encoded = hpack.hpack.encode_integer(size, 5)
    encoded[0] |= 0x20
    return encoded


def test_a_size_update_block_is_not_replayed_into_another_table_size() -> None:
    """Regression: identical blocks carrying size updates (4096, 0, 4096) replayed
    from the cache skipped the last update, so an entry the peer indexed afterwards
    was evicted here at once and its index was a COMPRESSION_ERROR."""
    encoder, cached = hpack.Encoder(), _decoder()
    grow, shrink = bytes(_prefixed(4096)), bytes(_prefixed(0))
    assert cached.decode(grow) == []  # 4096 -> 4096: nothing changes
    assert cached.decode(shrink) == []  # 4096 -> 0
    assert cached.decode(grow) == []  # 0 -> 4096 (the same bytes as the first block)
    indexing = encoder.encode(HEADERS)  # literals with incremental indexing
    assert cached.decode(indexing) == HEADERS
    assert cached.decode(encoder.encode(HEADERS)) == HEADERS  # index bytes only


# What a peer's encoder may do between blocks: send headers (indexing them, or
# referring to entries it indexed before), change its table size through the
# encoder, or send a block of bare size updates (RFC 7541 section 4.2 allows
# two: the minimum, then the final size).
ACTIONS: list[tuple[str, list[Any]]] = [
    ("headers", [HEADERS[0]]),
    ("headers", [HEADERS[0], (b"x-big", b"v" * 3000)]),
    ("updates", [4096]),
    ("updates", [0]),
    ("updates", [0, 4096]),
    ("resize", [256]),
    ("resize", [4096]),
]


@settings(max_examples=800, deadline=None)
@given(steps=st.lists(st.sampled_from(ACTIONS), min_size=1, max_size=12))
def test_replay_decodes_exactly_as_hpack_does(steps: list[tuple[str, list[Any]]]) -> None:
    """The replay cache is invisible: block for block, the same headers (or the same
    failure) as a plain hpack.Decoder, with dynamic table size updates anywhere."""
    encoder = hpack.Encoder()
    plain = hpack.Decoder(max_header_list_size=Limits().hard_header_list_size)
    plain.max_allowed_table_size = HEADER_TABLE_SIZE
    cached = _decoder()
    for kind, arg in steps:
        if kind == "resize":
            encoder.header_table_size = arg[0]
            continue
        block = encoder.encode(arg) if kind == "headers" else b"".join(bytes(_prefixed(size)) for size in arg)
        try:
            want = plain.decode(block, raw=True)
        except hpack.HPACKError:
            with pytest.raises(hpack.HPACKError):
                cached.decode(block)
            return
        assert cached.decode(block) == want


def test_an_index_only_block_is_replayed_and_one_that_indexes_is_not() -> None:
    encoder, cached = hpack.Encoder(), _decoder()
    headers = [(b"x-mirror-rule-id", b"default/r/0")]
    first = encoder.encode(headers)  # a literal that adds to the dynamic table
    again = encoder.encode(headers)  # the same header, now one index byte
    assert len(again) < len(first)
    assert cached.decode(first) == headers
    added = cached.additions
    assert cached.decode(first) == headers  # decoded again: it adds a second copy, so never replayed
    assert cached.additions == added + 1
    assert first not in cached.cache
    replayed = cached.decode(again)
    assert cached.decode(again) is replayed  # served from the cache
