"""End to end: Envoy 1.40 captures the primary's and each shadow's response
of mirrored requests only, two observer processes share one SQLite file, and
every request is joined and judged once, with Diffy's noise rule.

Backends (threads of this test, answering like three versions of a service):
primary and secondary run "v1", the candidate "v2". Every answer carries a
timestamp and a random nonce (noise); the candidate changes ``version`` on
/field, answers 500 on /status and is 200 ms slower on /slow.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from extproc.compare.envoy import CAPTURE_LISTENER, add_capture
from extproc.compare.noise import Result
from extproc.compare.store import CompareStore
from extproc.config.settings import Settings
from extproc.config.source import load_policy
from extproc.core.sampling import Fraction, decide
from extproc.envoy.render import Address, Topology, as_data, bootstrap_config, to_yaml
from extproc.stack.children import Child
from extproc.stack.envoy import EnvoyProcess
from tests.support.harness import Client
from tests.support.procs import Sampler, busy_port, scrape, wait_until

pytestmark = pytest.mark.e2e

RULE = "default/shop/0"
OTHER_RULE = "default/shop/1"
ROUTES = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop, namespace: default}
spec:
  hostnames: [shop.example]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: primary, port: 8080}]
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: candidate, port: 8080}, percent: 50}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: secondary, port: 8080}, percent: 50}}
  - matches: [{path: {type: PathPrefix, value: /other}}]
    backendRefs: [{name: primary, port: 8080}]
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: candidate, port: 8080}, percent: 100}}
"""
COMPARE = f"""\
compare:
  shadowTimeout: 1s
  rules:
  - rule: {RULE}
    targets: [candidate, secondary]
    secondary: secondary
"""
KINDS = ("field", "status", "slow")
KEYS = [f"user-{i}" for i in range(30)]
SLOW_S = 0.2
BIG_BODY = 100 << 20
TOKEN_SECRET = "tok-4f1d2c9e7a"
COOKIE_SECRET = "ck-93b7e1a0d5"
SET_COOKIE_SECRET = "sc-5a8e2b7c1f"
CREDENTIALS = {"authorization": f"Bearer {TOKEN_SECRET}", "cookie": f"session={COOKIE_SECRET}; lang=en"}


class VersionedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Head and body are separate writes: without this the body waits for the
    # peer's delayed ACK (40 ms a request), as in extproc/stack/echo.py.
    disable_nagle_algorithm = True
    server: VersionedServer

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        v2 = self.server.version == 2
        kind = self.path.split("/")[2] if self.path.count("/") >= 2 else ""
        if kind == "big":
            self._big()
            return
        if v2 and kind == "slow":
            time.sleep(SLOW_S)
        doc = {
            "path": self.path,
            "version": 2 if v2 and kind == "field" else 1,
            "items": [{"id": 1, "price": 9.5}, {"id": 2, "price": 3.25}],
            "ts": time.time(),
            "nonce": uuid.uuid4().hex,
            # A careless backend: it repeats the credentials it was sent.
            "echo": {"authorization": self.headers.get("Authorization", ""), "cookie": self.headers.get("Cookie", "")},
        }
        payload = json.dumps(doc).encode()
        self.send_response(500 if v2 and kind == "status" else 200)
        self.send_header("Set-Cookie", f"session={SET_COOKIE_SECRET}")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _big(self) -> None:
        """BIG_BODY bytes of JSON, written a piece at a time."""
        piece = b'"' + b"x" * (1 << 20) + b'",'
        count = BIG_BODY // len(piece)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(1 + count * len(piece) + 3))
        self.end_headers()
        self.wfile.write(b"[")
        for _ in range(count):
            self.wfile.write(piece)
        self.wfile.write(b"0]\n")


class VersionedServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, version: int) -> None:
        self.version = version
        super().__init__(("127.0.0.1", 0), VersionedHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class Observer(Child):
    """`mirror-sampler compare capture` on a port of its own choosing."""

    def __init__(self, db: Path, config: Path, name: str) -> None:
        argv = [sys.executable, "-m", "extproc", "compare", "capture", "--listen", "127.0.0.1:0", "--db", str(db), "--config", str(config)]
        super().__init__(name, [*argv, "--metrics-listen", "127.0.0.1:0"])
        ready = self.wait_event("compare_serving")
        self.port = int(ready["port"])
        self.metrics_port = int(ready["metrics_port"])


@pytest.fixture
def started(request: pytest.FixtureRequest) -> Iterator[list[Any]]:
    things: list[Any] = []
    yield things
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for thing in reversed(things):
        if isinstance(thing, VersionedServer):
            thing.shutdown()
            thing.server_close()
            continue
        child = thing.child if isinstance(thing, EnvoyProcess) else thing
        if failed and child is not None:
            print(f"--- {child.name} ---\n{child.output()[-3000:]}")
        thing.stop()


def ingress_port(envoy: EnvoyProcess) -> int:
    data = json.loads(envoy.admin("/listeners?format=json"))
    for status in data["listener_statuses"]:
        if status["name"] == "ingress":
            return int(status["local_address"]["socket_address"]["port_value"])
    raise AssertionError("no ingress listener")


def mirrored(request_id: str) -> bool:
    return decide(b"", request_id.encode(), Fraction(50, 100))


def start_gateway(
    tmp_path: Path, started: list[Any], backend_ports: dict[str, int], observed: list[Address] | None = None
) -> tuple[EnvoyProcess, list[Observer], Path]:
    """Sampler, two observers on one SQLite file, and Envoy with the capture points
    (logging to ``observed`` instead, when given: no observer is started)."""
    (tmp_path / "routes.yaml").write_text(ROUTES)
    (tmp_path / "compare.yaml").write_text(COMPARE)
    db = tmp_path / "compare.db"
    # Two observer processes on one file, as `--workers 2` runs them: Envoy picks
    # one per access log stream (one stream per worker).
    observers = [] if observed else [Observer(db, tmp_path / "compare.yaml", f"observer-{i}") for i in range(2)]
    started.extend(observers)
    sampler = Sampler({"MIRROR_CONFIG": str(tmp_path / "routes.yaml")})
    started.append(sampler)
    policy = load_policy(Settings.load({"MIRROR_CONFIG": str(tmp_path / "routes.yaml")}))
    topology = Topology(
        listener=Address("127.0.0.1", 0),
        admin=Address("127.0.0.1", 0),
        samplers=(Address("127.0.0.1", sampler.port),),
        backends={name: Address("127.0.0.1", port) for name, port in backend_ports.items()},
    )
    rendered = as_data(bootstrap_config(policy, topology))
    settings = observers_config(tmp_path)
    observed = observed or [Address("127.0.0.1", o.port) for o in observers]
    config = add_capture(rendered, settings, policy.slot_headers.marker, observed)
    (tmp_path / "envoy.yaml").write_text(to_yaml(config))
    envoy = EnvoyProcess(tmp_path / "envoy.yaml", tmp_path).start()
    started.append(envoy)
    return envoy, observers, db


def test_mirrored_responses_are_captured_joined_across_observers_and_judged(tmp_path: Path, started: list[Any]) -> None:
    backends = {"primary": VersionedServer(1), "secondary": VersionedServer(1), "candidate": VersionedServer(2)}
    started.extend(backends.values())
    envoy, observers, db = start_gateway(tmp_path, started, {name: server.port for name, server in backends.items()})

    client = Client(f"http://127.0.0.1:{ingress_port(envoy)}")
    sent: dict[str, str] = {}
    for key in KEYS:
        for kind in KINDS:  # interleaved: each kind is a third of the compared pairs from the start
            request_id = f"{key}-{kind}"
            status, _ = client.request(f"/api/{kind}/{key}", "shop.example", {"x-request-id": request_id, **CREDENTIALS})
            assert status == 200
            sent[request_id] = kind
    for key in KEYS[:10]:
        status, _ = client.request(f"/other/{key}", "shop.example", {"x-request-id": f"{key}-other"})
        assert status == 200
    client.close()

    expected = {rid: kind for rid, kind in sent.items() if mirrored(rid)}
    assert 0 < len(expected) < len(sent), "the key set must have mirrored and unmirrored requests"
    store = CompareStore(db, observers_config(tmp_path))
    wait_until(lambda: len(store.comparisons()) >= 2 * len(expected), timeout=30)
    comparisons = store.comparisons()

    # Each mirrored request judged once per target; nothing for the others.
    assert Counter((c.request_id, c.target) for c in comparisons) == Counter(
        {(rid, t): 1 for rid in expected for t in ("candidate", "secondary")}
    )
    assert store.pending_count() == 0
    # Envoy's own witnesses: the capture script ran once per mirrored primary
    # (never for unmirrored requests or the uncompared rule) and once per
    # compared copy, and the access log wrote exactly those entries.
    stats = envoy.stats()
    assert stats["http.ingress_http.lua.compare.executions"] == len(expected)
    assert stats["http.compare_shadow.lua.compare.executions"] == 2 * len(expected)
    assert stats["http.ingress_http.lua.compare.errors"] == stats["http.compare_shadow.lua.compare.errors"] == 0
    assert stats["access_logs.grpc_access_log.logs_written"] == 3 * len(expected)
    assert stats["access_logs.grpc_access_log.logs_dropped"] == 0
    assert stats.get("cluster.mirror-sampler-compare.http2.keepalive_timeout", 0) == 0, "the observers answer Envoy's pings"
    assert stats["cluster.candidate.upstream_rq_total"] == len(expected) + 10
    assert stats["cluster.secondary.upstream_rq_total"] == len(expected)
    assert stats[f"listener.envoy_internal_{CAPTURE_LISTENER}.downstream_cx_total"] >= 1

    by_target = {t: {c.request_id: c for c in comparisons if c.target == t} for t in ("candidate", "secondary")}
    # The secondary's differences are the noise: timestamp and nonce, on every request.
    assert {c.result for c in by_target["secondary"].values()} == {Result.NOISE_ONLY}
    assert {tuple(f["path"] for f in c.fields) for c in by_target["secondary"].values()} == {("body.nonce", "body.ts")}
    # The candidate: real differences exactly where v2 differs; the rest noise.
    want = {"field": Result.DIFFERS, "status": Result.DIFFERS, "slow": Result.NOISE_ONLY}
    assert {rid: c.result for rid, c in by_target["candidate"].items()} == {rid: want[kind] for rid, kind in expected.items()}
    for rid, kind in expected.items():
        c = by_target["candidate"][rid]
        paths = {f["path"] for f in c.fields} - {"body.nonce", "body.ts"}
        assert paths == {"field": {"body.version"}, "status": {"status"}, "slow": set()}[kind], rid
        assert (c.primary_status, c.shadow_status) == (200, 500 if kind == "status" else 200)
        if kind == "slow":
            assert c.shadow_ms is not None and c.primary_ms is not None and c.shadow_ms >= SLOW_S * 1000 > c.primary_ms
    store.close()

    # The observers' counters, summed over both processes, say the same.
    def counted(target: str, result: Result) -> float:
        labels = {"rule": RULE, "target": target, "result": result.value}
        return sum(scrape(o.metrics_port, "mirror_sampler_compared_total", labels) for o in observers)

    n = Counter(expected.values())
    wait_until(lambda: counted("secondary", Result.NOISE_ONLY) == len(expected), timeout=10)
    assert counted("candidate", Result.DIFFERS) == n["field"] + n["status"]
    assert counted("candidate", Result.NOISE_ONLY) == n["slow"]
    assert counted("candidate", Result.SHADOW_MISSING) == 0
    # (Which observer judged which request is Envoy's choice: a worker's stream
    # carries both sides of its requests to one of them. Sides that reach two
    # observers join through the shared store: tests/service/test_compare_capture.py.)

    # The report: exact counts of real differences per field; the noise fields as noise.
    cli = [sys.executable, "-m", "extproc", "compare"]
    report_args = ["report", "--json", "--db", str(db), "--config", str(tmp_path / "compare.yaml")]
    report = json.loads(subprocess.run([*cli, *report_args], check=True, capture_output=True, text=True).stdout)
    candidate = next(t for t in report["targets"] if t["target"] == "candidate")
    fields = {f["path"]: (f["count"], f["real"], f["noise_rate"]) for f in candidate["fields"]}
    assert fields == {
        "body.version": (n["field"], True, 0.0),
        "status": (n["status"], True, 0.0),
        "body.ts": (len(expected), False, 1.0),
        "body.nonce": (len(expected), False, 1.0),
    }
    assert candidate["latency_ms"]["shadow"]["p99"] >= SLOW_S * 1000
    some_status = next(rid for rid, kind in expected.items() if kind == "status")
    shown = subprocess.run([*cli, "show", some_status, "--db", str(db)], check=True, capture_output=True, text=True).stdout
    assert "* status" in shown and "500" in shown

    # Credentials sent, echoed and set by the backends leave no trace in the
    # database files, the report or the observers' logs.
    files = b"".join(p.read_bytes() for p in tmp_path.glob("compare.db*"))
    texts = [shown, json.dumps(report), *(o.output() for o in observers)]
    for secret in (TOKEN_SECRET, COOKIE_SECRET, SET_COOKIE_SECRET):
        assert secret.encode() not in files
        assert not any(secret in text for text in texts)
    assert b'"authorization": "(redacted)"' in files, "the scrubbed bodies went through the store as they are"
    for o in observers:
        assert "Traceback" not in o.output() and '"level": "error"' not in o.output(), o.output()[-2000:]


@pytest.mark.parametrize("failure", ["absent", "silent"])
def test_observers_absent_or_silent_never_touch_the_primary_or_the_mirrors(tmp_path: Path, started: list[Any], failure: str) -> None:
    """Envoy logs to observers nobody runs (a closed port), or to a socket that
    accepts and never answers: every request is answered, every mirror sent, every
    capture made, and Envoy keeps trying to reach the observers."""
    backends = {"primary": VersionedServer(1), "secondary": VersionedServer(1), "candidate": VersionedServer(2)}
    started.extend(backends.values())
    with contextlib.ExitStack() as stack:
        if failure == "absent":
            with busy_port() as closed:  # free, then closed again before Envoy starts
                pass
        else:
            closed = stack.enter_context(busy_port())
        ports = {name: server.port for name, server in backends.items()}
        envoy, _, _ = start_gateway(tmp_path, started, ports, observed=[Address("127.0.0.1", closed)])
        client = Client(f"http://127.0.0.1:{ingress_port(envoy)}")
        ids = [f"{key}-{kind}" for key in KEYS for kind in KINDS if kind != "slow"]
        for rid in ids:
            kind = rid.rsplit("-", 1)[1]
            assert client.request(f"/api/{kind}/{rid}", "shop.example", {"x-request-id": rid})[0] == 200
        client.close()
        expected = [rid for rid in ids if mirrored(rid)]
        assert 0 < len(expected) < len(ids)

        def captured() -> object:
            stats = envoy.stats()
            return (
                stats["http.compare_shadow.lua.compare.executions"] == 2 * len(expected)
                and stats["cluster.mirror-sampler-compare.upstream_cx_total"] >= 1
            )

        wait_until(captured, 30, "every copy captured and a connection to the observers tried")
        stats = envoy.stats()
        assert stats["http.ingress_http.lua.compare.executions"] == len(expected)
        assert stats["http.ingress_http.lua.compare.errors"] == stats["http.compare_shadow.lua.compare.errors"] == 0
        assert stats["cluster.candidate.upstream_rq_total"] == stats["cluster.secondary.upstream_rq_total"] == len(expected)
        assert stats.get("cluster.mirror-sampler-compare.upstream_rq_2xx", 0) == 0, "no observer ever answered"
        if failure == "absent":
            assert stats["cluster.mirror-sampler-compare.upstream_cx_connect_fail"] >= 1
        else:
            # Unanswered pings close the silent connection, and what Envoy held for it.
            wait_until(lambda: envoy.stats().get("cluster.mirror-sampler-compare.http2.keepalive_timeout", 0) >= 1, 30, "a ping timeout")


@pytest.mark.parametrize("failure", ["unreachable", "silent"])
def test_a_shadow_that_cannot_be_reached_or_never_answers_is_a_shadow_error(tmp_path: Path, started: list[Any], failure: str) -> None:
    backends = {"primary": VersionedServer(1), "secondary": VersionedServer(1)}
    started.extend(backends.values())
    with contextlib.ExitStack() as stack:
        if failure == "unreachable":
            with busy_port() as closed:  # a port that was free: closed again before Envoy starts
                pass
        else:  # listening, so connections succeed, and never answering: Envoy's shadow timeout ends them
            closed = stack.enter_context(busy_port())
        run_against_failing_candidate(tmp_path, started, backends, closed, failure)


def run_against_failing_candidate(
    tmp_path: Path, started: list[Any], backends: dict[str, VersionedServer], closed: int, failure: str
) -> None:
    envoy, _observers, db = start_gateway(tmp_path, started, {**{n: s.port for n, s in backends.items()}, "candidate": closed})
    client = Client(f"http://127.0.0.1:{ingress_port(envoy)}")
    ids = [f"{key}-field" for key in KEYS]
    for rid in ids:
        status, _ = client.request(f"/api/field/{rid}", "shop.example", {"x-request-id": rid})
        assert status == 200, "the primary never notices"
    client.close()
    expected = [rid for rid in ids if mirrored(rid)]
    store = CompareStore(db, observers_config(tmp_path))
    wait_until(lambda: len(store.comparisons()) >= 2 * len(expected), timeout=30)
    results = Counter((c.target, c.result) for c in store.comparisons())
    assert results == {("candidate", Result.SHADOW_ERROR): len(expected), ("secondary", Result.NOISE_ONLY): len(expected)}
    stats = envoy.stats()
    if failure == "unreachable":
        assert stats["cluster.candidate.upstream_cx_connect_fail"] >= 1
    else:
        assert stats["cluster.candidate.upstream_rq_timeout"] == len(expected), "Envoy's shadow timeout ended each"
    store.close()


def observers_config(tmp_path: Path) -> Any:
    from extproc.compare.cli import load_config

    return load_config(str(tmp_path / "compare.yaml"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_100_mib_body_is_captured_up_to_the_bound_and_the_primary_streams_on(tmp_path: Path, started: list[Any]) -> None:
    backends = {"primary": VersionedServer(1), "secondary": VersionedServer(1), "candidate": VersionedServer(2)}
    started.extend(backends.values())
    envoy, observers, db = start_gateway(tmp_path, started, {name: server.port for name, server in backends.items()})
    before = [rss_kib(o.pid) for o in observers]
    rid = next(f"big-{i}" for i in range(100) if mirrored(f"big-{i}"))
    client = Client(f"http://127.0.0.1:{ingress_port(envoy)}")
    client.conn.request("GET", f"/api/big/{rid}", headers={"Host": "shop.example", "x-request-id": rid})
    response = client.conn.getresponse()
    received = 0
    while chunk := response.read(1 << 20):
        received += len(chunk)
    client.close()
    assert response.status == 200 and received >= BIG_BODY - (2 << 20), "the client gets the whole body"
    store = CompareStore(db, observers_config(tmp_path))
    wait_until(lambda: len(store.comparisons()) == 2, timeout=60)
    found = {c.target: c for c in store.comparisons()}
    # Cut at the bound on every side: compared by the digest of the first 64 KiB, which are equal.
    assert found["candidate"].result is Result.SAME and found["secondary"].result is Result.SAME
    store.close()
    stats = envoy.stats()
    # The capture copied the first bytes and let the rest stream past: one
    # entry per side, no script error, the primary's request whole (above).
    assert stats["access_logs.grpc_access_log.logs_written"] == 3
    assert stats["http.ingress_http.lua.compare.errors"] == stats["http.compare_shadow.lua.compare.errors"] == 0
    assert stats["http.compare_shadow.downstream_rq_2xx"] == 2, "both copies streamed whole through the capture listener"
    grown = [rss_kib(o.pid) - b for o, b in zip(observers, before, strict=True)]
    assert max(grown) < 32 * 1024, f"observer memory grew by {grown} KiB"
