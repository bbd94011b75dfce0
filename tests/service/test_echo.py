"""The echo backend: conformance-echoserver-shaped JSON, body digest, log line."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from extproc.stack.echo import canonical_header_key, main, make_server
from tests.support.paths import REPO as ROOT

LOG_RE = re.compile(r"^Echoing back request made to (\S+) to client \(127\.0\.0\.1:(\d+)\)$")


@pytest.fixture
def echo(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.delenv("NAMESPACE", raising=False)
    monkeypatch.delenv("POD_NAME", raising=False)
    monkeypatch.delenv("SERVICE_NAME", raising=False)
    server = make_server("127.0.0.1", 0, "backend-2")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _request(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[http.client.HTTPResponse, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
        return resp, json.loads(raw)
    finally:
        conn.close()


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _split(response: bytes) -> tuple[bytes, dict[str, Any]]:
    head, _, body = response.partition(b"\r\n\r\n")
    return head, json.loads(body)


def test_get_echoes_request(echo: int) -> None:
    resp, doc = _request(
        echo, "GET", "/percent-mirror/x?a=1&b=2", headers={"Host": "backends.example:10000", "x-request-id": "abc", "X-Multi": "one"}
    )
    assert resp.status == 200
    assert resp.getheader("Content-Type") == "application/json"
    assert doc["path"] == "/percent-mirror/x?a=1&b=2"
    assert doc["host"] == "backends.example:10000"
    assert doc["method"] == "GET"
    assert doc["proto"] == "HTTP/1.1"
    assert doc["namespace"] == "default"
    assert doc["ingress"] == ""
    assert doc["service"] == ""
    assert doc["pod"] == "backend-2"
    assert doc["headers"]["X-Request-Id"] == ["abc"]
    assert doc["headers"]["X-Multi"] == ["one"]
    assert "Host" not in doc["headers"]  # Go's net/http moves Host out of Header
    assert doc["bodyLength"] == 0
    assert doc["bodySha256"] == hashlib.sha256(b"").hexdigest()


def test_any_method_and_repeated_headers(echo: int) -> None:
    response = _raw(
        echo,
        b"PURGE /a HTTP/1.1\r\nHost: h\r\nx-mirror-rule: a\r\nX-MIRROR-RULE: b\r\ncontent-type: text/plain\r\nConnection: close\r\n\r\n",
    )
    head, doc = _split(response)
    assert head.startswith(b"HTTP/1.1 200")
    assert doc["method"] == "PURGE"
    assert doc["headers"]["X-Mirror-Rule"] == ["a", "b"]
    assert doc["headers"]["Content-Type"] == ["text/plain"]


def test_post_64k_body_digest(echo: int) -> None:
    body = os.urandom(64 * 1024)
    resp, doc = _request(echo, "POST", "/upload", body=body, headers={"Content-Type": "application/octet-stream"})
    assert resp.status == 200
    assert doc["method"] == "POST"
    assert doc["bodyLength"] == len(body)
    assert doc["bodySha256"] == hashlib.sha256(body).hexdigest()
    assert doc["headers"]["Content-Length"] == [str(len(body))]


def test_chunked_body_digest(echo: int) -> None:
    parts = [b"hello ", os.urandom(70000), b"world"]
    payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    response = _raw(echo, b"PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + payload)
    _, doc = _split(response)
    whole = b"".join(parts)
    assert doc["bodyLength"] == len(whole)
    assert doc["bodySha256"] == hashlib.sha256(whole).hexdigest()


def test_keep_alive_serves_many_requests_on_one_connection(echo: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", echo, timeout=10)
    try:
        ports = set()
        for i in range(5):
            conn.request("POST", f"/k/{i}", body=b"x" * i)
            resp = conn.getresponse()
            doc = json.loads(resp.read())
            assert resp.status == 200
            assert doc["path"] == f"/k/{i}"
            assert doc["bodyLength"] == i
            ports.add(conn.sock.getsockname()[1])
        assert len(ports) == 1
    finally:
        conn.close()


def test_concurrent_requests(echo: int) -> None:
    results: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        resp, doc = _request(echo, "POST", f"/c/{i}", body=b"y" * 1000)
        with lock:
            results.append(doc["bodyLength"] if resp.status == 200 else -1)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [1000] * 32


def test_non_utf8_is_replaced_not_fatal(echo: int) -> None:
    response = _raw(
        echo, b"GET /p\xff\xfe?q=\xc3\xa9 HTTP/1.1\r\nHost: h\xff\r\nX-Bin: a\xffb\r\nX-Utf8: caf\xc3\xa9\r\nConnection: close\r\n\r\n"
    )
    head, doc = _split(response)
    assert head.startswith(b"HTTP/1.1 200")
    assert doc["path"] == "/p\ufffd\ufffd?q=\u00e9"
    assert doc["host"] == "h\ufffd"
    assert doc["headers"]["X-Bin"] == ["a\ufffdb"]
    assert doc["headers"]["X-Utf8"] == ["caf\u00e9"]


def test_env_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAMESPACE", "gateway-conformance-infra")
    monkeypatch.setenv("POD_NAME", "infra-backend-v1-abc")
    monkeypatch.setenv("SERVICE_NAME", "infra-backend-v1")
    server = make_server("127.0.0.1", 0, "ignored")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        _, doc = _request(server.server_address[1], "GET", "/")
    finally:
        server.shutdown()
        server.server_close()
    assert doc["namespace"] == "gateway-conformance-infra"
    assert doc["pod"] == "infra-backend-v1-abc"
    assert doc["service"] == "infra-backend-v1"


def test_log_line_format(echo: int, capsys: pytest.CaptureFixture[str]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", echo, timeout=10)
    try:
        conn.request("GET", "/logged?x=1")
        resp = conn.getresponse()
        resp.read()
        client_port = conn.sock.getsockname()[1]
    finally:
        conn.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert lines == [f"Echoing back request made to /logged?x=1 to client (127.0.0.1:{client_port})"]
    m = LOG_RE.match(lines[0])
    assert m and m.group(1) == "/logged?x=1"


def test_canonical_header_key() -> None:
    assert canonical_header_key("x-request-id") == "X-Request-Id"
    assert canonical_header_key("X-ENVOY-INTERNAL") == "X-Envoy-Internal"
    assert canonical_header_key("content-length") == "Content-Length"
    assert canonical_header_key("weird header") == "weird header"  # not a token: unchanged
    assert canonical_header_key("") == ""


def test_main_rejects_bad_args() -> None:
    with pytest.raises(SystemExit):
        main(["--port", "not-a-number"])


def test_subprocess_port_zero() -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1", POD_NAME="backend-3-pod")
    env.pop("NAMESPACE", None)
    env.pop("SERVICE_NAME", None)
    with subprocess.Popen(
        [sys.executable, "-m", "extproc.stack.echo", "--port", "0", "--service", "backend-3"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:  # closes the pipes when done
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline().strip()
            m = re.fullmatch(r"Starting server, listening on port (\d+) \(http\)", first)
            assert m, first
            port = int(m.group(1))
            assert port > 0
            resp, doc = _request(port, "POST", "/sub", body=b"abc")
            assert resp.status == 200
            assert doc["pod"] == "backend-3-pod"
            assert doc["namespace"] == "default"
            assert doc["bodyLength"] == 3
            line = proc.stdout.readline().strip()
            logged = LOG_RE.match(line)
            assert logged, line
            assert logged.group(1) == "/sub"
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        assert proc.returncode == 0
        assert proc.stderr is not None and proc.stderr.read() == ""
