"""Echo backend that answers like the Gateway API conformance echo server.

Every request (any method, any path) gets ``200`` and a JSON body::

    {"path": "/x?y=1", "host": "backends.example", "method": "GET",
     "proto": "HTTP/1.1", "headers": {"User-Agent": ["curl/8.5.0"], ...},
     "namespace": "default", "ingress": "", "service": "", "pod": "backend",
     "bodyLength": 0, "bodySha256": "e3b0..."}

``path`` is the request target as sent (query included), ``headers`` is keyed
in Go's canonical form (``X-Request-Id``) with lists of values and, as in Go's
``net/http``, without ``Host``. The request body is read and discarded; its
length and SHA-256 are reported in the two extra fields so tests can check
that a body (for example a mirrored one) arrived intact. Bytes that are not
UTF-8 are replaced with U+FFFD, as Go's JSON encoder does.

Each request is logged to stdout, flushed, exactly as the real echoserver does::

    Echoing back request made to <path> to client (<ip>:<port>)

and the first line printed is ``Starting server, listening on port <port>
(http)`` with the port actually bound, so a parent started with ``--port 0``
can read it. ``namespace`` and ``pod`` come from ``NAMESPACE`` and
``POD_NAME`` (defaults ``default`` and the service name); ``service`` from
``SERVICE_NAME`` (default empty, like the echoserver in Envoy Gateway's
guides). The server counts nothing and has no special paths: count requests
from Envoy's stats or from the log.

Standard library only: ``http.server.ThreadingHTTPServer`` speaking HTTP/1.1
with keep-alive, since Envoy's upstream connections are persistent and mirrored
requests arrive concurrently.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["EchoHandler", "EchoServer", "canonical_header_key", "main", "make_server"]

_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_CHUNK = 64 * 1024
_MAX_CHUNK_LINE = 4096
_stdout_lock = threading.Lock()


def _say(line: str) -> None:
    """Write one line to stdout and flush it (whole lines, also across threads)."""
    with _stdout_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def canonical_header_key(name: str) -> str:
    """Go's ``textproto.CanonicalMIMEHeaderKey``: ``x-request-id`` -> ``X-Request-Id``.

    A name with a byte that is not an HTTP token character is returned unchanged,
    as Go does.
    """
    if not name or any(c not in _TOKEN_CHARS for c in name):
        return name
    out = []
    upper = True
    for c in name:
        out.append(c.upper() if upper else c.lower())
        upper = c == "-"
    return "".join(out)


def _text(value: str) -> str:
    """http.server decodes the head as ISO-8859-1; recover the bytes, decode as UTF-8."""
    try:
        raw = value.encode("latin-1")
    except UnicodeEncodeError:  # pragma: no cover - latin-1 decoding always round-trips
        return value
    return raw.decode("utf-8", errors="replace")


class _BadRequest(Exception):
    pass


class EchoHandler(BaseHTTPRequestHandler):
    """Answers every method on every path with the echo JSON."""

    protocol_version = "HTTP/1.1"
    server_version = "echo"
    sys_version = ""
    # The head and the body are two writes: with Nagle the body waits for the
    # peer's delayed ACK of the head (40 ms a request on Linux).
    disable_nagle_algorithm = True
    server: EchoServer

    # BaseHTTPRequestHandler dispatches to ``do_<METHOD>``; answer them all.
    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):
            return self._echo
        raise AttributeError(name)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """No access log: the echo line is the log."""

    def _read_body(self) -> tuple[int, str]:
        digest = hashlib.sha256()
        length = 0
        te = self.headers.get("Transfer-Encoding", "")
        if te and "chunked" in te.lower():
            while True:
                line = self.rfile.readline(_MAX_CHUNK_LINE)
                if not line.endswith(b"\n"):
                    raise _BadRequest("bad chunk size line")
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise _BadRequest("bad chunk size") from None
                if size < 0:
                    raise _BadRequest("bad chunk size")
                if size == 0:
                    while True:  # trailers, up to the empty line
                        trailer = self.rfile.readline(_MAX_CHUNK_LINE)
                        if trailer in (b"\r\n", b"\n", b""):
                            break
                    break
                self._read_exactly(size, digest.update)
                length += size
                if self.rfile.readline(_MAX_CHUNK_LINE) not in (b"\r\n", b"\n"):
                    raise _BadRequest("bad chunk end")
            return length, digest.hexdigest()
        cl = self.headers.get("Content-Length")
        if cl is not None:
            try:
                content_length = int(cl.strip())
            except ValueError:
                raise _BadRequest("bad content-length") from None
            if content_length < 0:
                raise _BadRequest("bad content-length")
            self._read_exactly(content_length, digest.update)
            length += content_length
        return length, digest.hexdigest()

    def _read_exactly(self, size: int, consume: Callable[[bytes], None]) -> None:
        """Read ``size`` body bytes, handing each piece to ``consume``; in
        pieces of at most _CHUNK, so a large body is never held whole."""
        remaining = size
        while remaining:
            data = self.rfile.read(min(remaining, _CHUNK))
            if not data:
                raise _BadRequest("body ended early")
            consume(data)
            remaining -= len(data)

    def _client(self) -> str:
        host, port = self.client_address[0], self.client_address[1]
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{port}"

    def _echo(self) -> None:
        path = _text(self.path)
        try:
            body_length, body_sha = self._read_body()
        except _BadRequest as exc:
            self.close_connection = True
            self.send_error(400, str(exc))
            return
        headers: dict[str, list[str]] = {}
        host = ""
        for name, value in self.headers.items():
            if name.lower() == "host":
                if not host:
                    host = _text(value)
                continue  # Go moves Host out of the header map
            key = canonical_header_key(_text(name))
            headers.setdefault(key, []).append(_text(value))
        srv = self.server
        doc = {
            "path": path,
            "host": host,
            "method": _text(self.command),
            "proto": "HTTP/1.1",
            "headers": dict(sorted(headers.items())),
            "namespace": srv.namespace,
            "ingress": "",
            "service": srv.service_field,
            "pod": srv.pod,
            "bodyLength": body_length,
            "bodySha256": body_sha,
        }
        _say(f"Echoing back request made to {path} to client ({self._client()})")
        if srv.log_requests:
            # What a shadow received is otherwise invisible: Envoy drops its answer.
            _say(f"Echoed: {json.dumps(doc, ensure_ascii=False)}")
        payload = json.dumps(doc, ensure_ascii=False).encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


class EchoServer(ThreadingHTTPServer):
    """ThreadingHTTPServer carrying the echo identity fields."""

    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], service: str, log_requests: bool = False) -> None:
        self.service = service
        self.log_requests = log_requests
        self.namespace = os.environ.get("NAMESPACE") or "default"
        self.pod = os.environ.get("POD_NAME") or service
        self.service_field = os.environ.get("SERVICE_NAME", "")
        super().__init__(address, EchoHandler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


def make_server(host: str, port: int, service: str, log_requests: bool = False) -> ThreadingHTTPServer:
    """Bind (port 0 picks a free port) and return the server; call ``serve_forever``."""
    return EchoServer((host, port), service, log_requests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m extproc.echo",
        description="Echo backend like the Gateway API conformance echoserver.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=3000, help="port to bind, 0 picks one (default 3000)")
    parser.add_argument("--service", default="backend", help="service name (pod default)")
    parser.add_argument("--log-requests", action="store_true", help="after each echo line, log the echoed JSON as 'Echoed: {...}'")
    args = parser.parse_args(argv)

    server = make_server(args.host, args.port, args.service, args.log_requests)

    def _stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    _say(f"Starting server, listening on port {server.server_address[1]} (http)")
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
