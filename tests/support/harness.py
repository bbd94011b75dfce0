"""What the end-to-end tests share: a gateway on loopback ports chosen at
run time, an HTTP client, and ways to count what the backends received."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from extproc.config.settings import Settings
from extproc.core.sampling import Fraction, decide
from extproc.stack.up import LocalStack

SLOTS = ("x-mirror-cluster-0", "x-mirror-cluster-1")
KEYS = [f"user-{i}" for i in range(120)]


class Client:
    """One keep-alive HTTP/1.1 connection to the gateway."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=10)

    def request(
        self, path: str, host: str, headers: dict[str, str] | None = None, method: str = "GET", body: bytes | None = None
    ) -> tuple[int, dict[str, Any]]:
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


def static_cluster(name: str, port: int) -> dict[str, Any]:
    """An Envoy cluster (bootstrap data) with one endpoint on a loopback port."""
    address = {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}]},
    }


class HasStats(Protocol):
    """A running Envoy's counters: a LocalStack or an EnvoyProcess."""

    def stats(self) -> dict[str, int]: ...


def start_stack(
    tmp: Path, config_text: str | None, env: dict[str, str] | None = None, samplers: int = 1, transport: str | None = None, **kw: object
) -> LocalStack:
    """A local stack on ports chosen at run time; ``transport``: the samplers' (default: the default)."""
    environ = dict(env or {})
    if transport is not None:
        environ["MIRROR_TRANSPORT"] = transport
    if config_text is not None:
        path = tmp / "routes.yaml"
        path.write_text(config_text)
        environ["MIRROR_CONFIG"] = str(path)
    gw = LocalStack(Settings.load(environ), listener_port=0, admin_port=0, sampler_count=samplers, log_dir=tmp / "logs", **kw)  # type: ignore[arg-type]
    gw.start()
    return gw


def received(gw: LocalStack, cluster: str) -> int:
    return gw.stat(f"cluster.{cluster}.upstream_rq_total")


def settle(gw: HasStats, expected: dict[str, int], timeout: float = 10.0) -> dict[str, int]:
    """The final counts once every mirror of the requests sent so far is done.

    Envoy creates a request's mirror before the client gets its answer, so
    once the answers are in and the clusters have nothing active or pending,
    no more can arrive: a count that should stay put is checked exactly, not
    after a sleep. Waits up to ``timeout`` for the expected counts first.
    """
    deadline = time.monotonic() + timeout

    def busy(stats: dict[str, int]) -> bool:
        return any(
            stats.get(f"cluster.{c}.upstream_rq_active", 0) or stats.get(f"cluster.{c}.upstream_rq_pending_active", 0) for c in expected
        )

    while True:
        stats = gw.stats()
        got = {c: stats.get(f"cluster.{c}.upstream_rq_total", 0) for c in expected}
        done = all(got[c] >= n for c, n in expected.items())
        if (done and not busy(stats)) or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


class Phases:
    """Requests sent in phases, each followed by the exact count it must add
    to every cluster (the counts settle first: no mirror is still on its way)."""

    def __init__(self, gw: HasStats, clusters: Sequence[str]) -> None:
        self.gw = gw
        self.clusters = tuple(clusters)
        self.counts = settle(gw, dict.fromkeys(self.clusters, 0), timeout=0)

    def __call__(self, client: Client, path: str, host: str, keys: list[str], headers: dict[str, str], expect: dict[str, int]) -> None:
        for key in keys:
            status, _ = client.request(path, host, {"x-request-id": key, **headers})
            assert status == 200, (path, key, status)
        want = {c: self.counts[c] + expect.get(c, 0) for c in self.clusters}
        got = settle(self.gw, want, timeout=15)
        assert got == want, path
        self.counts = got


def echoed(gw: LocalStack, backend: str) -> list[dict[str, Any]]:
    """Every request the echo backend received, as it echoed it."""
    return gw.backends[backend].echoed()


def echoed_after(gw: LocalStack, backend: str, start: int, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The ``count`` requests echoed after the first ``start``: Envoy counted
    them, so wait for the echo log to catch up, not for a fixed time."""
    deadline = time.monotonic() + timeout
    while len(echoed(gw, backend)) < start + count and time.monotonic() < deadline:
        time.sleep(0.02)
    return echoed(gw, backend)[start:]


def echoed_all(gw: LocalStack, backend: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Every request the backend has received, once Envoy has nothing in
    flight to it and its echo log has caught up with Envoy's count: the
    positive witness a negative assertion on the log needs."""
    deadline = time.monotonic() + timeout
    while True:
        stats = gw.stats()
        busy = stats.get(f"cluster.{backend}.upstream_rq_active", 0) or stats.get(f"cluster.{backend}.upstream_rq_pending_active", 0)
        docs = echoed(gw, backend)
        if not busy and len(docs) >= stats.get(f"cluster.{backend}.upstream_rq_total", 0):
            return docs
        assert time.monotonic() < deadline, f"{backend}: Envoy's count and the echo log did not settle"
        time.sleep(0.02)


def request_ids(docs: list[dict[str, Any]]) -> list[str]:
    return [d["headers"].get("X-Request-Id", [""])[0] for d in docs]


def expected_count(fraction: Fraction, keys: list[str]) -> int:
    """How many of these keys the decision function mirrors (empty salt)."""
    return sum(decide(b"", k.encode(), fraction) for k in keys)
