"""HPACK decoding of request header blocks with a replay of the blocks that
only read the dynamic table (pure: bytes in, header lists out)."""

from __future__ import annotations

import hpack

from .frames import HEADER_TABLE_SIZE
from .grpc import PROCESS_PATH, RULE_KEY, Request, check_request


class BlockDecoder:
    """HPACK decoding (the ``hpack`` library) that remembers the header blocks
    which only read the dynamic table.

    Envoy's encoder indexes its ext_proc request headers, so once a
    connection is warm nearly every block is the same dozen index bytes, which
    ``hpack`` takes about 18 µs to decode (a third of the sampler's CPU per
    request). A block that neither added to nor evicted from the table decodes
    to the same headers for as long as the table is unchanged, so its result
    is replayed for the same bytes in the same decoder state. The entries
    change only by additions (counted here) and evictions from the oldest end,
    so (additions, entries) identifies them; with the table's maximum size
    (which dynamic table size updates change without touching an entry) that
    is the decoder's whole state. A block that changed any of the three is
    never replayed: a block of bare size updates replayed under another
    maximum size would leave this table smaller than the peer's.

    What it remembers is bounded per connection, whatever the peer sends: at
    most ``CACHED_BLOCKS`` blocks of at most ``CACHED_BLOCK_BYTES`` bytes, each
    decoded to at most ``CACHED_FIELDS`` fields, with ``check_request``'s
    result for each (computed when the block is remembered). Nothing else is
    kept: a header list that is not replayable (too large, or one that changed
    the table) is checked and forgotten with its stream. That is under
    0.4 MiB per connection for blocks made to be remembered and large (0.33
    measured, ``tests/unit/test_http2_hpack.py``), about 1 KiB per block for
    Envoy's (a dozen indexed fields), besides ``hpack``'s own dynamic table
    (``HEADER_TABLE_SIZE``).
    """

    __slots__ = ("hpack", "table", "entries", "additions", "cache", "checks", "max_header_list_size", "key", "method_path")

    CACHED_BLOCKS = 64  # per connection: Envoy's blocks differ by little more than the rule id
    CACHED_BLOCK_BYTES = 512
    CACHED_FIELDS = 32  # Envoy's ext_proc requests have about a dozen

    def __init__(
        self, max_header_list_size: int, hard_header_list_size: int, key: bytes = RULE_KEY, method_path: bytes = PROCESS_PATH
    ) -> None:
        self.hpack = hpack.Decoder(max_header_list_size=hard_header_list_size)
        self.key = key  # the metadata whose value ``checked`` gives the application
        self.method_path = method_path  # the streaming method served
        self.hpack.max_allowed_table_size = HEADER_TABLE_SIZE
        self.max_header_list_size = max_header_list_size
        table = self.hpack.header_table
        self.table = table
        self.entries = table.dynamic_entries
        self.additions = 0
        add = table.add

        def counting_add(name: bytes, value: bytes) -> None:
            self.additions += 1
            add(name, value)

        table.add = counting_add  # type: ignore[method-assign]  # an instance attribute: this decoder's table only
        self.cache: dict[bytes, tuple[tuple[int, int, int], list[tuple[bytes, bytes]]]] = {}
        # check_request of each header list in ``cache`` (and of no other), by
        # the list's identity (the value keeps the list alive, so its id cannot
        # be reused meanwhile).
        self.checks: dict[int, tuple[list[tuple[bytes, bytes]], Request | None]] = {}

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The block's headers (raw bytes); HPACKError as ``hpack`` raises it."""
        state = (self.additions, len(self.entries), self.table.maxsize)
        hit = self.cache.get(block)
        if hit is not None and hit[0] == state:
            return hit[1]
        headers: list[tuple[bytes, bytes]] = self.hpack.decode(block, raw=True)  # type: ignore[assignment]
        if (
            (self.additions, len(self.entries), self.table.maxsize) == state
            and len(block) <= self.CACHED_BLOCK_BYTES
            and len(headers) <= self.CACHED_FIELDS
        ):
            request = check_request(headers, self.max_header_list_size, self.key, self.method_path)
            if hit is not None:  # the same bytes decoded in an earlier state: replaced
                self.checks.pop(id(hit[1]), None)
            elif len(self.cache) >= self.CACHED_BLOCKS:
                self.cache.clear()
                self.checks.clear()
            self.cache[block] = (state, headers)
            self.checks[id(headers)] = (headers, request)
        return headers

    def checked(self, headers: list[tuple[bytes, bytes]]) -> Request | None:
        """``check_request(headers)``: remembered for the replayable header lists
        (computed once, when the block was remembered), computed afresh for any
        other (which is not kept: it may be 64 KiB)."""
        memo = self.checks.get(id(headers))
        if memo is not None and memo[0] is headers:
            return memo[1]
        return check_request(headers, self.max_header_list_size, self.key, self.method_path)
