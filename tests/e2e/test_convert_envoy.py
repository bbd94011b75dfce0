"""End to end: a user's Envoy configuration, converted with `convert envoy`,
run by the real Envoy with the real sampler and echo backends.

The input is tests/data/convert/envoy/ with loopback ports filled in at run
time. Mirror counts are exact: each target gets precisely the keys the
decision function samples (``decide(b"", key, Fraction(n, d))``), witnessed
by Envoy's ``cluster.NAME.upstream_rq_total`` and by the request ids the
shadow backends log.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.convert.envoy import convert_envoy
from extproc.core.sampling import Fraction, decide
from extproc.stack.backend import EchoProcess
from extproc.stack.envoy import EnvoyProcess
from tests.support.harness import Client, Phases
from tests.support.paths import DATA
from tests.support.procs import Sampler, wait_until

pytestmark = pytest.mark.e2e

SOURCE = DATA / "convert" / "envoy"
BACKENDS = ("shop", "shadow-a", "shadow-b", "jobs")
SLOTS = ("X-Mirror-Cluster-0", "X-Mirror-Cluster-1")


def user_config(tmp: Path, ports: dict[str, int], lone_values: bool = False) -> Path:
    """The realistic configuration on loopback: listeners on ports the kernel
    picks (read back from Envoy's admin /listeners), clusters at the echo backends.
    ``lone_values``: route 'api' removes ``x-debug`` and route 'checkout' matches
    ``x-tenant`` and adds ``x-shadow`` to shadow-b's copies each with a lone value
    where Envoy takes a list (a list of one, to Envoy)."""
    target = tmp / "in"
    shutil.copytree(SOURCE, target)
    boot = yaml.safe_load((target / "envoy.yaml").read_text(encoding="utf-8"))
    if lone_values:
        hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        routes = {r["name"]: r for r in hcm["route_config"]["virtual_hosts"][0]["routes"]}
        shadow_b = routes["checkout"]["route"]["request_mirror_policies"][1]
        api, match = routes["api"], routes["checkout"]["match"]
        for holder, key in [(api, "request_headers_to_remove"), (match, "headers"), (shadow_b, "request_headers_mutations")]:
            (holder[key],) = holder[key]  # the list of one becomes its one item
    boot["admin"]["address"]["socket_address"]["port_value"] = 0
    for listener in boot["static_resources"]["listeners"]:
        listener["address"]["socket_address"]["port_value"] = 0
    for cluster in boot["static_resources"]["clusters"]:
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"]["socket_address"]["port_value"] = ports[cluster["name"]]
    (target / "envoy.yaml").write_text(yaml.safe_dump(boot, sort_keys=False), encoding="utf-8")
    return target / "envoy.yaml"


def sampled(keys: list[str], numerator: int, denominator: int) -> set[str]:
    return {k for k in keys if decide(b"", k.encode(), Fraction(numerator, denominator))}


def test_converted_configuration_mirrors_exactly_what_the_sampler_decides(tmp_path: Path, processes: list[Any]) -> None:
    # The converter's output is under test, with the sampler on its default transport (each
    # transport is held to Envoy by the service and end-to-end suites).
    echoes = {}
    for name in BACKENDS:
        echoes[name] = EchoProcess(name)
        processes.append(echoes[name])
    source = user_config(tmp_path, {n: e.port for n, e in echoes.items()}, lone_values=True)
    out = tmp_path / "out"
    out.mkdir()
    # The sampler needs policy.yaml before it has a port; policy.yaml does not
    # depend on the sampler's address, so convert again once it has one.
    for name, text in convert_envoy([source], output_dir=out).files.items():
        (out / name).write_text(text, encoding="utf-8")
    sampler = Sampler({"MIRROR_CONFIG": str(out / "policy.yaml"), "MIRROR_METRICS_LISTEN": "off"})
    processes.append(sampler)
    conversion = convert_envoy([source], output_dir=out, sampler=f"127.0.0.1:{sampler.port}")
    assert conversion.files["policy.yaml"] == (out / "policy.yaml").read_text(encoding="utf-8")
    for name, text in conversion.files.items():
        (out / name).write_text(text, encoding="utf-8")
    envoy = EnvoyProcess(out / "envoy.yaml", tmp_path)
    processes.append(envoy)
    envoy.start()
    wait_until(lambda: envoy.stat("cluster.mirror-sampler.membership_healthy") >= 1, 20, "Envoy to see the sampler healthy")
    ports = envoy.listener_ports()
    front, internal = Client(f"http://127.0.0.1:{ports['front']}"), Client(f"http://127.0.0.1:{ports['internal']}")
    shop_host = "shop.example.com"
    clusters = ("shop", "shadow-a", "shadow-b", "jobs")
    phase = Phases(envoy, clusters)

    # route 'api': 30/100 to shadow-a; the prefix_rewrite applies to both copies.
    api_keys = [f"api-{i}" for i in range(150)]
    before = {n: len(e.echoed()) for n, e in echoes.items()}
    phase(front, "/api/items", shop_host, api_keys, {"x-debug": "1"}, {"shop": 150, "shadow-a": len(sampled(api_keys, 30, 100))})
    api_mirrors = len(sampled(api_keys, 30, 100))
    wait_until(lambda: len(echoes["shadow-a"].echoed()) >= before["shadow-a"] + api_mirrors, 10, "the api mirrors at shadow-a")
    mirrored = echoes["shadow-a"].echoed()[before["shadow-a"] :]
    assert {d["headers"]["X-Request-Id"][0] for d in mirrored} == sampled(api_keys, 30, 100), "exactly the sampled keys"
    primary = echoes["shop"].echoed()[before["shop"] :]
    for doc in (*mirrored, *primary):
        assert doc["path"] == "/v2/items", "the user's prefix_rewrite"
        assert doc["headers"]["X-Shop-Api"] == ["v2"], "the user's request_headers_to_add"
        assert not any(h in doc["headers"] for h in SLOTS), "no backend sees a slot header"
        assert "X-Debug" not in doc["headers"], "the user's request_headers_to_remove (a lone name)"
    for doc in mirrored:
        assert doc["headers"]["X-Mirror-Rule"] == ["envoy/front-local-route-shop/0"]
        assert doc["host"] == f"{shop_host}-shadow", "the user did not disable the -shadow suffix"

    # route 'checkout': 333333/1000000 to shadow-a and to shadow-b (same keys: one salt).
    checkout_keys = [f"checkout-{i}" for i in range(150)]
    third = len(sampled(checkout_keys, 333333, 1_000_000))
    assert 0 < third < 150
    before_b = len(echoes["shadow-b"].echoed())
    phase(front, "/checkout", shop_host, checkout_keys, {"x-tenant": "acme"}, {"shop": 150, "shadow-a": third, "shadow-b": third})
    wait_until(lambda: len(echoes["shadow-b"].echoed()) >= before_b + third, 10, "the checkout mirrors at shadow-b")
    for doc in echoes["shadow-b"].echoed()[before_b:]:
        assert doc["headers"]["X-Shadow"] == ["b"], "the user's request_headers_mutations (a lone mutation)"
    # route 'reports': 5000/10000 to shadow-b (runtime_key no longer in effect).
    report_keys = [f"report-{i}" for i in range(100)]
    phase(front, "/reports", shop_host, report_keys, {}, {"shop": 100, "shadow-b": len(sampled(report_keys, 5000, 10_000))})
    # route 'jobs', from the RDS file, on the second listener: 50/100 to shadow-b.
    job_keys = [f"job-{i}" for i in range(100)]
    phase(internal, "/jobs/run", "anything", job_keys, {}, {"jobs": 100, "shadow-b": len(sampled(job_keys, 50, 100))})

    # Routes without sampler mirrors (one with none, one left as it was) mirror
    # nothing and never consult the sampler: the primary's count is the
    # positive witness that the requests went through.
    streams = envoy.stat("http.front.ext_proc.streams_started")
    assert streams == 150 + 150 + 100, "one ext_proc stream per request on the front listener's mirroring routes"
    static_keys = [f"static-{i}" for i in range(50)]
    phase(front, "/static/page", shop_host, static_keys, {}, {"shop": 50})
    phase(front, "/legacy", shop_host, static_keys[:20], {}, {"shop": 20})
    assert envoy.stat("http.front.ext_proc.streams_started") == streams, "ext_proc is off on routes without sampler mirrors"
    # A client cannot choose a mirror: a forged slot header on keys the sampler
    # does not sample selects no variant route.
    unsampled = [k for k in api_keys if k not in sampled(api_keys, 30, 100)][:30]
    phase(front, "/api/forged", shop_host, unsampled, {"x-mirror-cluster-0": "shadow-a"}, {"shop": 30})
    # And with the sampler down (Envoy fails open), where only the anti-spoof
    # filter stands between a forged header and a variant route; also on the
    # route whose per-route Lua configuration (disabled: true, meant for the
    # user's own Lua filter) Envoy would apply to ours too if ours had none.
    sampler.stop()
    wait_until(lambda: envoy.stat("cluster.mirror-sampler.membership_healthy") == 0, 20, "Envoy to see the sampler gone")
    forged = {"x-mirror-cluster-0": "shadow-a", "x-mirror-cluster-1": "shadow-b"}
    phase(front, "/api/forged", shop_host, unsampled, forged, {"shop": 30})
    phase(front, "/checkout", shop_host, unsampled, {"x-tenant": "acme", **forged}, {"shop": 30})
    front.close()
    internal.close()
