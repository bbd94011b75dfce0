"""HOST:PORT addresses: one parser for listeners (port 0: any free port) and
for peers a generated Envoy connects to (1..65535)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.config.addresses import join_address, split_address, split_peer_address

HOSTS = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,2}", fullmatch=True),
    st.ip_addresses().map(str),
)


@given(HOSTS, st.integers(1, 65535))
def test_join_and_split_are_inverses(host: str, port: int) -> None:
    text = join_address(host, port)
    assert split_address(text) == split_peer_address(text) == (host, port)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("[::1]:50051", ("::1", 50051)), (" 127.0.0.1:80 ", ("127.0.0.1", 80)), ("[::]:0", ("::", 0)), ("sampler:65535", ("sampler", 65535))],
)
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert split_address(text) == expected


def test_port_zero_is_for_listening_only() -> None:
    """Port 0 asks the system for a free port: right for a listener, never a peer."""
    assert split_address("127.0.0.1:0") == ("127.0.0.1", 0)
    with pytest.raises(ValueError, match=r"must be HOST:PORT with a port 1\.\.65535, got 'host:0'"):
        split_peer_address("host:0")


@pytest.mark.parametrize("text", ["nope", "host:", ":80", "host:65536", "host:-1", "host:8o", "[::1:80", "::1:80", "[]:80", "ho]st:80"])
def test_malformed_addresses_are_refused_by_both(text: str) -> None:
    for split in (split_address, split_peer_address):
        with pytest.raises(ValueError, match="must be HOST:PORT"):
            split(text)


def test_an_ipv6_host_must_be_in_brackets() -> None:
    with pytest.raises(ValueError, match=r"IPv6 host in brackets"):
        split_address("::1:80")
    assert ipaddress.ip_address(split_address("[::1]:80")[0]).version == 6
