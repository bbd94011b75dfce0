"""End to end: a user's Envoy configuration converted with `convert envoy --inline
module` (run by the real Envoy, two workers, loading the module built here) and with
`--inline lua` (the generated Lua), with echo backends and no sampler at all.

The input is tests/data/convert/envoy/ (as tests/e2e/test_convert_envoy.py, whose
loopback set-up is reused). Mirror counts are exact: each target gets precisely the keys
the decision function samples, witnessed by Envoy's ``cluster.NAME.upstream_rq_total``,
by the request ids the shadow backends log, and (module) by its own decision counters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from extproc.convert.envoy import convert_envoy
from extproc.envoy.lua import DECIDE_FILTER
from extproc.envoy.module import MODULE_FILTER
from extproc.module.support import module_for
from extproc.stack import envoy as envoy_stack
from extproc.stack.backend import EchoProcess
from extproc.stack.envoy import EnvoyProcess
from tests.e2e.test_convert_envoy import BACKENDS, SLOTS, sampled, user_config
from tests.support.harness import Client, Phases
from tests.support.procs import wait_until

pytestmark = pytest.mark.e2e

CLUSTERS = ("shop", "shadow-a", "shadow-b", "jobs")
API_RULE = "envoy/front-local-route-shop/0"


def decisions(rule: str, target: str, outcome: str) -> str:
    return f"dynamicmodulescustom.mirror_sampler_decisions.rule.{rule}.target.{target}.outcome.{outcome}"


@pytest.mark.parametrize("engine", ["module", "lua"])
def test_converted_configuration_mirrors_exactly_what_envoy_decides(engine: str, tmp_path: Path, processes: list[Any]) -> None:
    echoes = {}
    for name in BACKENDS:
        echoes[name] = EchoProcess(name)
        processes.append(echoes[name])
    source = user_config(tmp_path, {n: e.port for n, e in echoes.items()})
    out = tmp_path / "out"
    out.mkdir()
    module = engine == "module"
    module_path = module_for(envoy_stack.envoy_binary()) if module else None
    conversion = convert_envoy([source], output_dir=out, module_path=module_path, lua=not module)
    # No sampler: no policy.yaml, no sampler cluster, no ext_proc.
    assert "policy.yaml" not in conversion.files
    assert "mirror-sampler.ext_proc" not in conversion.files["envoy.yaml"]
    assert (MODULE_FILTER if module else DECIDE_FILTER) in conversion.files["envoy.yaml"]
    for name, text in conversion.files.items():
        (out / name).write_text(text, encoding="utf-8")
    envoy = EnvoyProcess(out / "envoy.yaml", tmp_path, extra_args=["--concurrency", "2"])
    processes.append(envoy)
    envoy.start()
    ports = envoy.listener_ports()
    front, internal = Client(f"http://127.0.0.1:{ports['front']}"), Client(f"http://127.0.0.1:{ports['internal']}")
    shop_host = "shop.example.com"
    phase = Phases(envoy, CLUSTERS)

    # route 'api': 30/100 to shadow-a; the user's prefix_rewrite and headers on both copies.
    api_keys = [f"api-{i}" for i in range(150)]
    api_sampled = sampled(api_keys, 30, 100)
    before = {n: len(e.echoed()) for n, e in echoes.items()}
    phase(front, "/api/items", shop_host, api_keys, {}, {"shop": 150, "shadow-a": len(api_sampled)})
    wait_until(lambda: len(echoes["shadow-a"].echoed()) >= before["shadow-a"] + len(api_sampled), 10, "the api mirrors at shadow-a")
    mirrored = echoes["shadow-a"].echoed()[before["shadow-a"] :]
    assert {d["headers"]["X-Request-Id"][0] for d in mirrored} == api_sampled, "exactly the sampled keys"
    for doc in (*mirrored, *echoes["shop"].echoed()[before["shop"] :]):
        assert doc["path"] == "/v2/items", "the user's prefix_rewrite"
        assert not any(h in doc["headers"] for h in SLOTS), "no backend sees a slot header"
    for doc in mirrored:
        assert doc["headers"]["X-Mirror-Rule"] == [API_RULE]
    if module:  # The module's own counters agree, per outcome.
        assert envoy.stat(decisions(API_RULE, "shadow-a", "mirrored")) == len(api_sampled)
        assert envoy.stat(decisions(API_RULE, "shadow-a", "skipped")) == 150 - len(api_sampled)

    # route 'checkout': 333333/1000000 to shadow-a and to shadow-b (same keys: one salt).
    checkout_keys = [f"checkout-{i}" for i in range(150)]
    third = len(sampled(checkout_keys, 333333, 1_000_000))
    assert 0 < third < 150
    phase(front, "/checkout", shop_host, checkout_keys, {"x-tenant": "acme"}, {"shop": 150, "shadow-a": third, "shadow-b": third})
    # route 'reports': 5000/10000 to shadow-b.
    report_keys = [f"report-{i}" for i in range(100)]
    phase(front, "/reports", shop_host, report_keys, {}, {"shop": 100, "shadow-b": len(sampled(report_keys, 5000, 10_000))})
    # route 'jobs', from the RDS file, on the second listener: 50/100 to shadow-b.
    job_keys = [f"job-{i}" for i in range(100)]
    phase(internal, "/jobs/run", "anything", job_keys, {}, {"jobs": 100, "shadow-b": len(sampled(job_keys, 50, 100))})

    # Routes without converted mirrors mirror nothing (the primary's count is the witness).
    static_keys = [f"static-{i}" for i in range(50)]
    phase(front, "/static/page", shop_host, static_keys, {}, {"shop": 50})
    phase(front, "/legacy", shop_host, static_keys[:20], {}, {"shop": 20})
    # A client cannot choose a mirror: the module (or the Lua anti-spoof filter) strips
    # forged slot headers, with and without a rule on the route, before Envoy routes again.
    unsampled = [k for k in api_keys if k not in api_sampled][:30]
    forged = {"x-mirror-cluster-0": "shadow-a", "x-mirror-cluster-1": "shadow-b"}
    forged_before = envoy.stat("dynamicmodulescustom.mirror_sampler_forged_headers") if module else 0
    before = {n: len(e.echoed()) for n, e in echoes.items()}
    phase(front, "/api/forged", shop_host, unsampled, forged, {"shop": 30})
    phase(front, "/static/forged", shop_host, unsampled, forged, {"shop": 30})
    wait_until(lambda: len(echoes["shop"].echoed()) >= before["shop"] + 60, 10, "the forged requests at shop")
    assert not any(h in d["headers"] for d in echoes["shop"].echoed()[before["shop"] :] for h in SLOTS), "no backend sees one"
    if module:
        assert envoy.stat("dynamicmodulescustom.mirror_sampler_forged_headers") == forged_before + 60
    front.close()
    internal.close()


def test_converting_a_converted_configuration_gives_it_back(tmp_path: Path) -> None:
    """Converting again (also from ext_proc to module and back) starts from the user's routes."""
    source = user_config(tmp_path, dict.fromkeys(BACKENDS, 9))
    path = "/opt/module.so"
    once = convert_envoy([source], module_path=path).files["envoy.yaml"]
    (tmp_path / "converted.yaml").write_text(once)
    # RDS files: the converted bootstrap names the converted copy, which lives beside it.
    for name, text in convert_envoy([source], module_path=path).files.items():
        if name != "envoy.yaml":
            (tmp_path / name).write_text(text)
    again = convert_envoy([tmp_path / "converted.yaml"], module_path=path).files["envoy.yaml"]
    strip = [line for line in once.splitlines() if not line.startswith("#")]
    assert [line for line in again.splitlines() if not line.startswith("#")] == strip
    ext_proc = convert_envoy([tmp_path / "converted.yaml"]).files["envoy.yaml"]
    assert MODULE_FILTER not in ext_proc and "mirror-sampler.ext_proc" in ext_proc
