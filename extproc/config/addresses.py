"""HOST:PORT addresses, IPv6 in brackets (pure)."""

from __future__ import annotations


def split_address(value: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets) as (host, port); ValueError says what is wrong."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT with a port 0..65535, got {value!r}")
    return host.strip("[]"), int(port)


def join_address(host: str, port: int) -> str:
    """The inverse of split_address: brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
