"""What the end-to-end tests share: a gateway on loopback ports chosen at
run time, an HTTP client, and ways to count what the backends received."""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path

from extproc.config import Settings
from extproc.gateway import Gateway
from extproc.sampling import Fraction, decide
from procs import REPO

CONFORMANCE = REPO / "tests" / "manifests" / "conformance-percentage-mirror.yaml"
SLOTS = ("x-mirror-cluster-0", "x-mirror-cluster-1")
KEYS = [f"user-{i}" for i in range(120)]


class Client:
    """One keep-alive HTTP/1.1 connection to the gateway."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=10)

    def request(self, path: str, host: str, headers: dict[str, str] | None = None, method: str = "GET", body: bytes | None = None) -> tuple[int, dict]:
        self.conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
        resp = self.conn.getresponse()
        data = resp.read()
        try:
            doc = json.loads(data)
        except ValueError:
            doc = {"raw": data.decode(errors="replace")}
        return resp.status, doc

    def close(self) -> None:
        self.conn.close()


def start_gateway(tmp: Path, config_text: str | None, env: dict[str, str] | None = None, samplers: int = 1, **kw: object) -> Gateway:
    environ = dict(env or {})
    if config_text is not None:
        path = tmp / "routes.yaml"
        path.write_text(config_text)
        environ["MIRROR_CONFIG"] = str(path)
    gw = Gateway(Settings.load(environ), listener_port=0, admin_port=0, sampler_count=samplers, log_dir=tmp / "logs", **kw)  # type: ignore[arg-type]
    gw.start()
    return gw


def received(gw: Gateway, cluster: str) -> int:
    return gw.stat(f"cluster.{cluster}.upstream_rq_total")


def settle(gw: Gateway, expected: dict[str, int], timeout: float = 10.0) -> dict[str, int]:
    """Mirrors are sent after the primary answers: wait for counts to reach
    the expected values, then a little longer so extra mirrors would show."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = {c: received(gw, c) for c in expected}
        if all(got[c] >= n for c, n in expected.items()):
            break
        time.sleep(0.05)
    time.sleep(0.3)
    return {c: received(gw, c) for c in expected}


def echoed(gw: Gateway, backend: str) -> list[dict]:
    """Every request the echo backend received, as it echoed it."""
    child = gw.backends[backend]
    return [json.loads(line.removeprefix("Echoed: ")) for line in list(child.lines) if line.startswith("Echoed: ")]


def request_ids(docs: list[dict]) -> list[str]:
    return [d["headers"].get("X-Request-Id", [""])[0] for d in docs]


def expected_count(fraction: Fraction, keys: list[str]) -> int:
    """How many of these keys the decision function mirrors (empty salt)."""
    return sum(decide(b"", k.encode(), fraction) for k in keys)
