"""Faults under steady load, against a real Envoy: the primary traffic must not
notice anything that happens to the sampler or the shadow."""

from __future__ import annotations

import http.client
import signal
import threading
import time
from pathlib import Path

import pytest

from extproc.core.sampling import Fraction, decide
from extproc.stack.up import LocalStack
from tests.support.harness import KEYS, Client, echoed, echoed_all, expected_count, received, settle, start_stack
from tests.support.paths import CONFORMANCE
from tests.support.procs import scrape, wait_until

pytestmark = pytest.mark.e2e

SAMPLED = [k for k in KEYS if decide(b"", k.encode(), Fraction(50))]


class Load:
    """Steady, bounded load on loopback: ``rate`` requests/s on a few
    keep-alive connections, recording every status."""

    def __init__(
        self, url: str, host: str = "any", path: str = "/load", rate: float = 40, connections: int = 4, max_seconds: float = 60
    ) -> None:
        self.url, self.host, self.path = url, host, path
        self.interval = connections / rate
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._deadline = time.monotonic() + max_seconds
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(connections)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(20)

    def _run(self, worker: int) -> None:
        client = Client(self.url)
        i = worker
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            started = time.monotonic()
            try:
                status, _ = client.request(f"{self.path}/{i}", self.host, {"x-request-id": KEYS[i % len(KEYS)]})
            except (OSError, http.client.HTTPException) as e:
                with self._lock:
                    self.errors.append(repr(e))
                client.close()
                client = Client(self.url)
                status = 0
            with self._lock:
                self.statuses.append(status)
            i += len(self._threads)
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))
        client.close()

    def failures(self) -> list[int]:
        with self._lock:
            return [s for s in self.statuses if s != 200]


def send_sampled(gw: LocalStack, keys: list[str]) -> None:
    """Requests the sampler would mirror, on /probe (the load uses /load)."""
    client = Client(gw.url)
    for key in keys:
        assert client.request("/probe", "any", {"x-request-id": key})[0] == 200
    client.close()


def probes(gw: LocalStack) -> int:
    return sum(1 for d in echoed(gw, "shadow") if d["path"].startswith("/probe"))


def mirrored_load(gw: LocalStack) -> int:
    return sum(1 for d in echoed(gw, "shadow") if d["path"].startswith("/load"))


def flowing(load: Load, more: int) -> None:
    """Wait until the load has had ``more`` answers from now on."""
    mark = len(load.statuses)
    wait_until(lambda: len(load.statuses) >= mark + more, 20, f"{more} more answers to the load")


def test_sigkill_under_load_never_fails_a_request_and_mirroring_comes_back(tmp_path: Path, stacks: list[LocalStack]) -> None:
    gw = start_stack(tmp_path, None, {"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "50"})
    stacks.append(gw)
    with Load(gw.url) as load:
        flowing(load, 20)
        gw.samplers[0].kill()  # type: ignore[union-attr]
        send_sampled(gw, SAMPLED[:20])
        # Envoy creates a mirror before it answers; with the sampler dead the
        # shadow gets nothing new, so its count and log settle: then look.
        probed = [d for d in echoed_all(gw, "shadow") if d["path"].startswith("/probe")]
        assert probed == [], "mirrored while the sampler was down"
        gw.start_sampler(0)
        gw.wait_samplers_healthy()
        # Envoy may still fail a stream or two on its way back (fail-open, no
        # mirror): a mirror of the load after the restart says it is back.
        loaded = mirrored_load(gw)
        wait_until(lambda: mirrored_load(gw) > loaded, 20, "a mirror of the load once the sampler is back")
        send_sampled(gw, SAMPLED[:20])
        # Under load the shadow is never idle: wait for the probes' mirrors.
        wait_until(lambda: probes(gw) >= 20, 10, "the 20 probes' mirrors at shadow")
        flowing(load, 20)
    assert probes(gw) == 20
    assert load.errors == []
    assert load.failures() == []
    assert len(load.statuses) > 50


def test_sigterm_with_two_samplers_loses_no_stream(tmp_path: Path, stacks: list[LocalStack], transport: str) -> None:
    # The drain delay outlasts Envoy's health checks (1 s interval, 2 failures),
    # so Envoy stops opening streams to the draining sampler before it refuses them.
    gw = start_stack(
        tmp_path, None, {"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "50", "MIRROR_DRAIN_DELAY": "3.5"}, samplers=2, transport=transport
    )
    stacks.append(gw)
    failed_before = gw.stat("http.ingress_http.ext_proc.streams_failed")
    allowed_before = gw.stat("http.ingress_http.ext_proc.failure_mode_allowed")
    with Load(gw.url, rate=60) as load:
        flowing(load, 40)
        draining = gw.samplers[0]
        assert draining is not None
        draining.signal(signal.SIGTERM)
        assert draining.popen.wait(20) == 0
        flowing(load, 40)
    assert load.errors == [] and load.failures() == []
    assert gw.stat("http.ingress_http.ext_proc.streams_failed") == failed_before
    assert gw.stat("http.ingress_http.ext_proc.failure_mode_allowed") == allowed_before
    # The remaining sampler carried on deciding.
    before = received(gw, "shadow")
    send_sampled(gw, SAMPLED[:10])
    assert settle(gw, {"shadow": before + 10})["shadow"] == before + 10


def test_sampler_slower_than_message_timeout(tmp_path: Path, stacks: list[LocalStack], transport: str) -> None:
    gw = start_stack(tmp_path, None, {"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "100"}, transport=transport)
    stacks.append(gw)
    sampler = gw.samplers[0]
    assert sampler is not None
    sampler.signal(signal.SIGSTOP)  # alive, accepting connections, answering nothing
    try:
        before = received(gw, "shadow")
        allowed = gw.stat("http.ingress_http.ext_proc.failure_mode_allowed")
        client = Client(gw.url)
        for i in range(3):
            assert client.request(f"/slow/{i}", "any", {"x-request-id": f"slow-{i}"})[0] == 200
        client.close()
        assert gw.stat("http.ingress_http.ext_proc.message_timeouts") >= 1
        assert received(gw, "shadow") == before
        # Envoy gave up on the stopped sampler for each request (its message_timeout, or a
        # failed health check) and let it through: no answer of the sampler's was awaited.
        assert gw.stat("http.ingress_http.ext_proc.failure_mode_allowed") - allowed == 3
    finally:
        sampler.signal(signal.SIGCONT)
    # The sampler cannot see the streams Envoy gave up on, but it sees the stall.
    wait_until(lambda: scrape(sampler.metrics_port, "mirror_sampler_event_loop_stalls_total") >= 1, 5, "the sampler to count its stall")
    assert scrape(sampler.metrics_port, "mirror_sampler_event_loop_lag_seconds_count") > 0


@pytest.mark.parametrize("fault", ["down", "stopped"])
def test_shadow_down_or_hanging_leaves_primary_answers_alone(tmp_path: Path, stacks: list[LocalStack], fault: str) -> None:
    gw = start_stack(tmp_path, None, {"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "100"})
    stacks.append(gw)
    shadow = gw.backends["shadow"]
    if fault == "down":
        shadow.stop()
    else:
        shadow.signal(signal.SIGSTOP)
    try:
        before = gw.stats()
        with Load(gw.url, rate=40) as load:
            flowing(load, 80)
            during = gw.stats()
        assert load.errors == [] and load.failures() == []
        assert len(load.statuses) > 60
    finally:
        shadow.signal(signal.SIGCONT)

    def delta(name: str) -> int:
        return during.get(name, 0) - before.get(name, 0)

    # A mirror never holds the primary answer: 80 primaries were answered while not one
    # of their mirrors was (the stopped shadow holds them, the stopped one refuses them).
    assert delta("cluster.shadow.upstream_rq_2xx") == 0
    if fault == "down":
        assert delta("cluster.shadow.upstream_cx_connect_fail") > 0
    else:
        assert during.get("cluster.shadow.upstream_rq_active", 0) + during.get("cluster.shadow.upstream_rq_pending_active", 0) > 0


def test_reload_under_load(tmp_path: Path, stacks: list[LocalStack]) -> None:
    route = CONFORMANCE.read_text()
    gw = start_stack(tmp_path, route.replace("percent: 20", "percent: 0"))
    stacks.append(gw)
    with Load(gw.url, host="h", path="/percent-mirror-fraction/load", rate=60) as load:
        flowing(load, 40)
        mark = gw.samplers[0].line_count  # type: ignore[union-attr]
        (tmp_path / "routes.yaml").write_text(route)
        gw.samplers[0].wait_event("reloaded", timeout=5, after=mark)  # type: ignore[union-attr]
        flowing(load, 40)
    assert load.errors == [] and load.failures() == []
    before = received(gw, "infra-backend-v2")
    client = Client(gw.url)
    for key in KEYS:
        client.request("/percent-mirror", "h", {"x-request-id": key})
    client.close()
    want = before + expected_count(Fraction(20), KEYS)
    assert settle(gw, {"infra-backend-v2": want}) == {"infra-backend-v2": want}
