"""Whether a port is free to listen on: one check for `serve`'s workers and `up`."""

from __future__ import annotations

import socket


def family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def probe_free(host: str, port: int) -> int:
    """Bind ``host:port`` and let go; the port (the kernel's choice for 0).

    Raises OSError when something listens on the port or holds it. Without
    SO_REUSEPORT, so another supervisor's holding socket counts; with
    SO_REUSEADDR, as every server binds, so connections a stopped server left
    in TIME-WAIT do not (a restart right after a stop must start).
    """
    with socket.socket(family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        bound: int = probe.getsockname()[1]
        return bound
