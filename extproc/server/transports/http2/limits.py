"""Every bound the HTTP/2 transport keeps against a peer, in one place, each
with the attack or accident it answers. Data only: the protocol and the
adapter read them; a test (or an operator) builds another ``Limits``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    # Sockets and handshakes.
    max_connections: int = 1024
    """Connections held at once. Envoy keeps a few per worker thread; a peer
    opening sockets by the thousand is closed before anything is read, and costs
    a file descriptor for a moment."""
    preface_timeout: float = 10.0
    """Seconds a new connection gets to send the preface and its SETTINGS
    (slowloris: sockets held open doing nothing)."""
    idle_timeout: float = 3600.0
    """Seconds without input and without streams before GOAWAY NO_ERROR
    (Envoy's own upstream default): abandoned connections. A healthy peer reconnects."""
    close_linger: float = 1.0
    """Seconds a connection in error stays half-open so the peer reads the GOAWAY
    (closing with unread input makes the kernel reset, destroying it)."""

    # Streams.
    max_concurrent_streams: int = 1000
    """Advertised; beyond it REFUSED_STREAM. Bounds the stream table per connection."""
    stream_window: int = 1 << 20
    """Per-stream receive window we advertise (not a defence: the memory bound is
    the message size and the partial-message budgets below)."""
    connection_window: int = 1 << 24
    """Connection receive window we grow to at start."""

    # Header blocks.
    max_header_list_size: int = 16384
    """Advertised; a larger request is answered RESOURCE_EXHAUSTED, the connection stays."""
    hard_header_list_size: int = 4 * 16384
    """Decoding stops here and the connection goes (ENHANCE_YOUR_CALM): HPACK
    amplification, one index byte naming a 4 KiB field many times over."""
    max_header_block: int = 65536
    """Encoded bytes over HEADERS + CONTINUATION (CONTINUATION flood, CVE-2024-27316 and kin)."""
    max_continuation_frames: int = 256
    """CONTINUATION frames per block: empty ones cost CPU without growing the block."""

    # Messages.
    max_partial_bytes: int = 16 << 20
    """Partial gRPC messages buffered per connection: many streams each holding
    most of a large message (the window alone would allow gigabytes)."""
    max_partial_total: int = 64 << 20
    """The same across all connections: the previous attack on many connections."""

    # Output a peer does not take.
    output_high_water: int = 64 << 10
    """Unsent bytes at which a connection is no longer read (the asyncio
    transport's high-water mark; its input, even the rest of a read, waits)
    and, for answers waiting for window, at which its new streams are refused:
    a peer that sends requests but never reads, or never grants window, gets
    no more work done for it."""
    max_queued_output: int = 1 << 20
    """Output held for one connection (unsent + waiting for window): past it,
    GOAWAY ENHANCE_YOUR_CALM. Streams opened before the window ran out can still
    be answered into the queue; this is their bound."""
    max_queued_total: int = 16 << 20
    """Output held across all connections: past it, a connection that is itself
    backed up (over ``output_high_water``) is sent away with ENHANCE_YOUR_CALM.
    A dozen non-reading peers once held 90 MiB here."""

    # Floods of cheap frames that cost the server work.
    reset_burst: float = 1000.0
    """Streams the peer may reset before sending a message (or make us reset,
    or get refused), at once: rapid reset, CVE-2023-44487, and "MadeYouReset" ..."""
    reset_rate: float = 200.0
    """... and per second after that; beyond, GOAWAY ENHANCE_YOUR_CALM."""
    settings_burst: float = 100.0
    """SETTINGS frames at once (each window change touches every open stream) ..."""
    settings_rate: float = 10.0
    """... and per second after that."""
    max_skipped_ranges: int = 64
    """Ranges of stream ids a peer jumped over, remembered so that opening one
    of them later is a connection error (RFC 9113 section 5.1.1) rather than a
    frame on a closed stream; older ranges are forgotten (and then answered
    STREAM_CLOSED)."""

    # Housekeeping.
    sweep_interval: float = 1.0
    """How often connections are checked against the two timeouts."""


class Budget:
    """What all connections of one transport hold together (partial messages,
    queued output): the totals the per-transport limits are checked against."""

    __slots__ = ("partial_bytes", "queued_bytes")

    def __init__(self) -> None:
        self.partial_bytes = 0
        self.queued_bytes = 0
