"""The HTTP/2 transport's header-block replay against plain ``hpack`` (pure)."""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import hpack
import pytest
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
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
        # Request checks are remembered for the replayable lists only.
        assert {id(h) for _, h in cached.cache.values()} == set(cached.checks)


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


def _many_fields(i: int) -> bytes:
    """512 bytes of static-table indices (512 fields, none adding to the table)."""
    return bytes(0x80 | 1 + (i + j) % 61 for j in range(510)) + bytes((0x80 | 1 + i // 61, 0x80 | 1 + i % 61))


def _long_literals(i: int) -> bytes:
    """512 bytes of CACHED_FIELDS never-indexed literals with new names, Huffman
    coded with 5-bit codes (the longest strings for their bytes): the most the
    replay remembers for one block."""
    coder = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)

    def string(prefix: bytes, size: int) -> bytes:  # a Huffman-coded string of exactly `size` bytes
        text = prefix
        while len(coder.encode(text + b"0")) <= size:
            text += b"0"
        coded = coder.encode(text)
        assert len(coded) == size
        return bytes((0x80 | size,)) + coded

    room = BlockDecoder.CACHED_BLOCK_BYTES // BlockDecoder.CACHED_FIELDS - 3  # a prefix byte, two lengths
    return b"".join(
        b"\x10" + string(b"%02d%02d" % (i, j), room // 2) + string(b"", room - room // 2) for j in range(BlockDecoder.CACHED_FIELDS)
    )


@pytest.mark.parametrize(("block", "remembered"), [(_many_fields, 0), (_long_literals, 64)])
def test_what_the_replay_remembers_is_bounded(block: Any, remembered: int) -> None:
    """The replay's documented bound (BlockDecoder's docstring: under 0.4 MiB per
    connection, however the blocks are made), for blocks made to be remembered and large: index
    bytes only (512 fields each: 2.2 MiB for 64 before the field bound) and
    literals filling CACHED_BLOCK_BYTES with CACHED_FIELDS fields."""
    decoder = _decoder()
    blocks = [block(i) for i in range(64)]
    assert len(set(blocks)) == 64 and all(len(b) == BlockDecoder.CACHED_BLOCK_BYTES for b in blocks)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for b in blocks:
            decoder.checked(decoder.decode(b))
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(decoder.cache) == len(decoder.checks) == remembered
    assert held < 0.4 * 2**20, held


def test_a_block_replaced_in_a_new_table_state_leaves_no_check_behind() -> None:
    encoder, cached = hpack.Encoder(), _decoder()
    for value in (b"a", b"b", b"c"):
        cached.decode(encoder.encode([(b"x-mirror-rule-id", value)]))  # adds it: index 62 is now this entry
        newest = cached.decode(b"\xbe")  # the same bytes each time, in a new table state
        assert newest == [(b"x-mirror-rule-id", value)]
        assert [h for _, h in cached.cache.values()] == [newest] and list(cached.checks) == [id(newest)]
