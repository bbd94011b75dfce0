"""HOST:PORT addresses, IPv6 in brackets (pure).

One parser for every address the sampler listens on or a generated Envoy
connects to; only the port bounds differ: port 0 asks the system for a free
port, which makes sense for a listener and never for a peer."""

from __future__ import annotations

import ipaddress


def _split(value: str, lowest_port: int) -> tuple[str, int]:
    text = value.strip()
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not lowest_port <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT with a port {lowest_port}..65535, got {value!r}")
    if not bracketed and ("[" in host or "]" in host or ":" in host):
        raise ValueError(f"must be HOST:PORT with an IPv6 host in brackets ([::1]:50051), got {value!r}")
    return host, int(port)


def split_address(value: str) -> tuple[str, int]:
    """An address to listen on, HOST:PORT (IPv6 in brackets), as (host, port);
    port 0: any free port. ValueError says what is wrong."""
    return _split(value, 0)


def split_peer_address(value: str) -> tuple[str, int]:
    """An address to connect to, HOST:PORT (IPv6 in brackets), port 1..65535."""
    return _split(value, 1)


def join_address(host: str, port: int) -> str:
    """The inverse of split_address: brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_ip_address(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address rather than a name (a STATIC Envoy
    cluster takes addresses only; a name needs DNS)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
