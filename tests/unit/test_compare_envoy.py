"""The capture points added to a rendered configuration (pure data)."""

from __future__ import annotations

import json
from typing import Any

from extproc.compare.config import CompareConfig, RuleCompare
from extproc.compare.envoy import (
    CAPTURE_FILTER,
    CAPTURE_LISTENER,
    CAPTURE_SCRIPT,
    CAPTURE_SERVICE_CLUSTER,
    CAPTURE_SHADOW_CLUSTER,
    LIMIT_FIELD,
    TARGET_HEADER,
    add_capture,
)
from extproc.compare.records import CAPTURE_NAMESPACE, TAG_FIELD, CaptureTag, Side
from extproc.config.settings import Settings
from extproc.config.source import load_policy
from extproc.envoy.render import Address, Topology, as_data, backend_names, bootstrap_config
from tests.support.paths import CONFORMANCE

POLICY = load_policy(Settings.load({"MIRROR_CONFIG": str(CONFORMANCE)}))
RENDERED = as_data(bootstrap_config(POLICY, Topology(backends={n: Address("127.0.0.1", 1000) for n in backend_names(POLICY)})))
MULTI = POLICY.rules[2]  # two mirrors: infra-backend-v2 and infra-backend-v3
COMPARED = {MULTI.id: ("infra-backend-v2",)}
COMPARE = CompareConfig(
    rules={MULTI.id: RuleCompare(targets=("infra-backend-v2",))}, body_limit=1000, private_headers=frozenset({"x-secret"})
)
OBSERVERS = [Address("127.0.0.1", 50061), Address("127.0.0.1", 50062)]


def manager(config: dict[str, Any]) -> dict[str, Any]:
    typed: dict[str, Any] = config["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
    return typed


def tag(route: dict[str, Any]) -> CaptureTag:
    """Who the route captures: its metadata under the capture filter's name."""
    return CaptureTag.decode(route["metadata"]["filterMetadata"][CAPTURE_FILTER][TAG_FIELD])


def bound(route: dict[str, Any]) -> int:
    """The capture script's bound on the route: spec.compare's bodyLimit."""
    return int(route["metadata"]["filterMetadata"][CAPTURE_FILTER][LIMIT_FIELD])


def routes(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for host in manager(config)["routeConfig"]["virtualHosts"] for r in host["routes"]}


def test_the_capture_filter_runs_after_the_sampler_with_no_default_script_and_the_access_log_logs_only_captures() -> None:
    rendered = manager(add_capture(RENDERED, COMPARE, POLICY.slot_headers.marker, OBSERVERS))
    names = [f["name"] for f in rendered["httpFilters"]]
    assert names.index(CAPTURE_FILTER) == len(names) - 2 and names[-1] == "envoy.filters.http.router"
    capture = rendered["httpFilters"][-2]["typedConfig"]
    assert "defaultSourceCode" not in capture, "only the routes that name the script run it"
    script = capture["sourceCodes"][CAPTURE_SCRIPT]["inlineString"]
    assert f'"{CAPTURE_NAMESPACE}"' in script and f'route:get("{LIMIT_FIELD}")' in script, "the bound is the route's"
    [log] = rendered["accessLog"]
    assert log["filter"]["metadataFilter"]["matcher"] == {
        "filter": CAPTURE_NAMESPACE,
        "path": [{"key": TAG_FIELD}],
        "value": {"presentMatch": True},
    }, "entries only for the requests the capture filter tagged"
    assert log["filter"]["metadataFilter"]["matchIfKeyNotFound"] is False
    logger = log["typedConfig"]
    assert logger["commonConfig"]["grpcService"]["envoyGrpc"]["clusterName"] == CAPTURE_SERVICE_CLUSTER
    assert logger["additionalRequestHeadersToLog"] == ["authorization", "cookie", "proxy-authorization", "x-secret"], "what is scrubbed"


def test_only_the_compared_rule_is_touched_and_only_its_compared_targets_go_through_the_capture_listener() -> None:
    before, after = routes(RENDERED), routes(add_capture(RENDERED, COMPARE, POLICY.slot_headers.marker, OBSERVERS))
    assert after.keys() == before.keys()
    for name, route in after.items():
        if not name.startswith(MULTI.id):
            assert route == before[name], name
    assert after[MULTI.id] == before[MULTI.id], "the plain route runs no capture"
    both = after[f"{MULTI.id} mirror infra-backend-v2+infra-backend-v3"]
    clusters = [p["cluster"] for p in both["route"]["requestMirrorPolicies"]]
    assert clusters == [CAPTURE_SHADOW_CLUSTER, "infra-backend-v3"]
    headers = [m["append"]["header"] for m in both["route"]["requestMirrorPolicies"][0]["requestHeadersMutations"]]
    assert {"key": TARGET_HEADER, "value": "infra-backend-v2"} in headers
    assert both["typedPerFilterConfig"][CAPTURE_FILTER]["name"] == CAPTURE_SCRIPT
    assert tag(both) == CaptureTag(Side.PRIMARY, MULTI.id, ("infra-backend-v2",)) and bound(both) == 1000
    only_v3 = after[f"{MULTI.id} mirror infra-backend-v3"]
    assert only_v3 == before[f"{MULTI.id} mirror infra-backend-v3"], "mirrors only a target not compared: captures nothing"


def test_the_capture_listener_routes_each_compared_target_to_its_own_cluster_without_mirroring() -> None:
    config = add_capture(RENDERED, COMPARE, POLICY.slot_headers.marker, OBSERVERS)
    listener = next(entry for entry in config["staticResources"]["listeners"] if entry["name"] == CAPTURE_LISTENER)
    assert "internalListener" in listener and "address" not in listener
    typed = listener["filterChains"][0]["filters"][0]["typedConfig"]
    assert typed["preserveExternalRequestId"] is True
    [route] = typed["routeConfig"]["virtualHosts"][0]["routes"]
    assert route["route"] == {"cluster": "infra-backend-v2", "timeout": "15s"}, "no mirror policy: no loop"
    assert {h["name"] for h in route["match"]["headers"]} == {POLICY.slot_headers.marker, TARGET_HEADER}
    assert route["requestHeadersToRemove"] == [TARGET_HEADER]
    assert route["typedPerFilterConfig"][CAPTURE_FILTER]["name"] == CAPTURE_SCRIPT
    assert tag(route) == CaptureTag(Side.SHADOW, MULTI.id, ("infra-backend-v2",)) and bound(route) == 1000
    assert [f["name"] for f in typed["httpFilters"]] == [CAPTURE_FILTER, "envoy.filters.http.router"]
    assert typed["accessLog"] == manager(config)["accessLog"], "the primary's log: one stream per worker for both sides"
    clusters = {c["name"]: c for c in config["staticResources"]["clusters"]}
    endpoints = clusters[CAPTURE_SERVICE_CLUSTER]["loadAssignment"]["endpoints"][0]["lbEndpoints"]
    assert [e["endpoint"]["address"]["socketAddress"]["portValue"] for e in endpoints] == [50061, 50062]
    options = clusters[CAPTURE_SERVICE_CLUSTER]["typedExtensionProtocolOptions"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    keepalive = options["explicitHttpConfig"]["http2ProtocolOptions"]["connectionKeepalive"]
    assert keepalive == {"interval": "2s", "timeout": "2s"}, "a silent observer's connection is closed"
    internal = clusters[CAPTURE_SHADOW_CLUSTER]["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]
    assert internal == {"envoyInternalAddress": {"serverListenerName": CAPTURE_LISTENER}}
    assert [e["name"] for e in config["bootstrapExtensions"]] == ["envoy.bootstrap.internal_listener"]


def test_the_shadow_timeout_bounds_the_wait_for_a_silent_shadow() -> None:
    config = add_capture(RENDERED, CompareConfig(rules=COMPARE.rules, shadow_timeout_s=1.5), POLICY.slot_headers.marker, OBSERVERS)
    listener = next(entry for entry in config["staticResources"]["listeners"] if entry["name"] == CAPTURE_LISTENER)
    [route] = listener["filterChains"][0]["filters"][0]["typedConfig"]["routeConfig"]["virtualHosts"][0]["routes"]
    assert route["route"]["timeout"] == "1.500s"


def test_the_rendered_configuration_is_not_changed_in_place() -> None:
    snapshot = json.dumps(RENDERED, sort_keys=True)
    add_capture(RENDERED, COMPARE, POLICY.slot_headers.marker, OBSERVERS)
    assert json.dumps(RENDERED, sort_keys=True) == snapshot


ROUTES_WITH_COMPARE = """\
apiVersion: mirror-sampler.io/v1alpha1
kind: MirrorSampler
metadata: {name: shop}
spec:
  compare:
    shadowTimeout: 3s
    rules:
    - {rule: shop/web/0, targets: [v2]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  rules:
  - backendRefs: [{name: v1, port: 8080}]
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: v2, port: 8080}, percent: 10}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: v3, port: 8080}, percent: 10}}
  - matches: [{path: {type: PathPrefix, value: /other}}]
    backendRefs: [{name: v1, port: 8080}]
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: v2, port: 8080}, percent: 10}}
"""


def test_envoy_config_renders_the_capture_points_of_spec_compare() -> None:
    import yaml

    from extproc.compare.envoy import render_with_capture
    from extproc.config.build import build_policy
    from extproc.config.manifests import parse_manifests

    policy = build_policy(Settings.load({"MIRROR_CONFIG": "routes.yaml"}), ROUTES_WITH_COMPARE)
    compare = parse_manifests(ROUTES_WITH_COMPARE, "routes.yaml").compare
    assert compare is not None
    topology = Topology(backends={n: Address("127.0.0.1", 1000) for n in backend_names(policy)})
    config = yaml.safe_load(render_with_capture(policy, topology, compare, OBSERVERS))
    listeners = {entry["name"]: entry for entry in config["staticResources"]["listeners"]}
    [capture_route] = listeners[CAPTURE_LISTENER]["filterChains"][0]["filters"][0]["typedConfig"]["routeConfig"]["virtualHosts"][0][
        "routes"
    ]
    assert capture_route["route"] == {"cluster": "v2", "timeout": "3s"}, "spec.compare's target and shadowTimeout"
    by_name = routes(config)
    assert CAPTURE_FILTER not in by_name["shop/web/0"].get("typedPerFilterConfig", {}), "the plain route captures nothing"
    assert CAPTURE_FILTER not in by_name["shop/web/1 mirror v2"].get("typedPerFilterConfig", {}), "a rule not compared: untouched"
    assert tag(by_name["shop/web/0 mirror v2+v3"]) == CaptureTag(Side.PRIMARY, "shop/web/0", ("v2",))
    clusters = {c["name"]: c for c in config["staticResources"]["clusters"]}
    endpoints = clusters[CAPTURE_SERVICE_CLUSTER]["loadAssignment"]["endpoints"][0]["lbEndpoints"]
    assert [e["endpoint"]["address"]["socketAddress"]["portValue"] for e in endpoints] == [50061, 50062]
    assert CAPTURE_SHADOW_CLUSTER in clusters
    assert [e["name"] for e in config["bootstrapExtensions"]] == ["envoy.bootstrap.internal_listener"]


def test_routes_served_from_a_file_get_the_capture_points_there() -> None:
    """`up --inline` serves routes by filesystem RDS: the bootstrap gets the filter, the
    listener and the clusters; the routes file gets the per-route configuration."""
    from extproc.compare.envoy import add_capture_to_discovery
    from extproc.envoy.lua import DECIDE_FILTER
    from extproc.envoy.render import route_discovery

    topology = Topology(backends={n: Address("127.0.0.1", 1000) for n in backend_names(POLICY)}, inline=True, rds_path="/r/routes.yaml")
    config = add_capture(as_data(bootstrap_config(POLICY, topology)), COMPARE, POLICY.slot_headers.marker, OBSERVERS)
    assert [f["name"] for f in manager(config)["httpFilters"]] == [DECIDE_FILTER, CAPTURE_FILTER, "envoy.filters.http.router"]
    assert "routeConfig" not in manager(config) and "rds" in manager(config)
    discovery = route_discovery(POLICY, topology)
    snapshot = json.dumps(discovery, sort_keys=True)
    [served] = add_capture_to_discovery(discovery, COMPARE)["resources"]
    assert json.dumps(discovery, sort_keys=True) == snapshot, "not changed in place"
    by_name = {r["name"]: r for host in served["virtualHosts"] for r in host["routes"]}
    assert by_name[MULTI.id]["typedPerFilterConfig"].keys() == {DECIDE_FILTER}
    both = by_name[f"{MULTI.id} mirror infra-backend-v2+infra-backend-v3"]
    assert both["typedPerFilterConfig"].keys() == {DECIDE_FILTER, CAPTURE_FILTER}
    assert tag(both) == CaptureTag(Side.PRIMARY, MULTI.id, ("infra-backend-v2",))
    assert [p["cluster"] for p in both["route"]["requestMirrorPolicies"]] == [CAPTURE_SHADOW_CLUSTER, "infra-backend-v3"]
    others = [r for name, r in by_name.items() if not name.startswith(MULTI.id)]
    assert others and all(CAPTURE_FILTER not in r.get("typedPerFilterConfig", {}) for r in others)


def test_observers_named_by_host_are_resolved_by_dns() -> None:
    """Compose addresses the observer by its service name: a STATIC cluster would refuse it."""
    from extproc.compare.envoy import capture_clusters

    by_ip = {c.name: c for c in capture_clusters([Address("127.0.0.1", 50061), Address("::1", 50061)])}
    by_name = {c.name: c for c in capture_clusters([Address("mirror-sampler-compare", 50061)])}
    assert as_data(by_ip[CAPTURE_SERVICE_CLUSTER])["type"] == "STATIC"
    assert as_data(by_name[CAPTURE_SERVICE_CLUSTER])["type"] == "STRICT_DNS"
    assert as_data(by_name[CAPTURE_SHADOW_CLUSTER])["type"] == "STATIC", "the internal listener's address is no name"


def test_the_snippet_gets_the_capture_points_in_its_own_casing() -> None:
    from extproc.compare.envoy import add_capture_to_snippet
    from extproc.envoy.render import snippet

    topology = Topology(backends={n: Address("127.0.0.1", 1000) for n in backend_names(POLICY)})
    base = snippet(POLICY, topology)
    snapshot = json.dumps(base, sort_keys=True)
    compare = CompareConfig(rules=COMPARE.rules, shadow_timeout_s=2.0)
    out = add_capture_to_snippet(base, compare, POLICY.slot_headers.marker, OBSERVERS)
    assert json.dumps(base, sort_keys=True) == snapshot, "not changed in place"
    assert [f["name"] for f in out["http_filters"]] == [*(f["name"] for f in base["http_filters"]), CAPTURE_FILTER]
    assert CAPTURE_SCRIPT in out["http_filters"][-1]["typed_config"]["source_codes"]
    [log] = out["access_log"]
    assert log["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == CAPTURE_SERVICE_CLUSTER
    routes = {r["name"]: r for host in out["virtual_hosts"] for r in host["routes"]}
    both = routes[f"{MULTI.id} mirror infra-backend-v2+infra-backend-v3"]
    assert [p["cluster"] for p in both["route"]["request_mirror_policies"]] == [CAPTURE_SHADOW_CLUSTER, "infra-backend-v3"]
    assert both["typed_per_filter_config"][CAPTURE_FILTER]["name"] == CAPTURE_SCRIPT
    assert CaptureTag.decode(both["metadata"]["filter_metadata"][CAPTURE_FILTER][TAG_FIELD]).side is Side.PRIMARY
    [listener] = out["listeners"]
    assert listener["name"] == CAPTURE_LISTENER and "internal_listener" in listener
    [route] = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"] == {"cluster": "infra-backend-v2", "timeout": "2s"}
    assert [c["name"] for c in out["clusters"]][-2:] == [CAPTURE_SERVICE_CLUSTER, CAPTURE_SHADOW_CLUSTER]
    assert out["bootstrap_extensions"] == [
        {
            "name": "envoy.bootstrap.internal_listener",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener"},
        }
    ]


def test_the_capture_listener_routes_served_from_a_file_are_the_ones_it_would_carry() -> None:
    """`up` serves the internal listener's routes by filesystem RDS too, so which rules
    and targets compare can change live: the file holds what the listener would carry."""
    from extproc.compare.envoy import capture_discovery

    def capture_manager(config: dict[str, Any]) -> dict[str, Any]:
        listener = next(entry for entry in config["staticResources"]["listeners"] if entry["name"] == CAPTURE_LISTENER)
        typed: dict[str, Any] = listener["filterChains"][0]["filters"][0]["typedConfig"]
        return typed

    inline = capture_manager(add_capture(RENDERED, COMPARE, POLICY.slot_headers.marker, OBSERVERS))
    served = capture_manager(add_capture(RENDERED, COMPARE, POLICY.slot_headers.marker, OBSERVERS, "/r/capture/routes.yaml"))
    assert "routeConfig" not in served
    assert served["rds"]["routeConfigName"] == CAPTURE_LISTENER
    assert served["rds"]["configSource"]["pathConfigSource"] == {
        "path": "/r/capture/routes.yaml",
        "watchedDirectory": {"path": "/r/capture"},
    }
    assert {k: v for k, v in served.items() if k != "rds"} == {k: v for k, v in inline.items() if k != "routeConfig"}
    [resource] = capture_discovery(COMPARE, POLICY.slot_headers.marker)["resources"]
    assert resource.pop("@type") == "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
    assert resource == inline["routeConfig"]


def test_what_a_live_edit_of_spec_compare_needs_of_envoy() -> None:
    """Routes files carry which rules and targets compare, the shadow's timeout and
    the capture bound; the private headers are in the listeners (a restart);
    an Envoy started without capture points cannot start comparing live."""
    from dataclasses import replace

    from extproc.compare.envoy import compare_in_force, envoy_restart_reason

    other_rule = CompareConfig(
        rules={POLICY.rules[0].id: RuleCompare(targets=("infra-backend-v2",))}, body_limit=1000, private_headers=COMPARE.private_headers
    )
    for edited in (other_rule, replace(COMPARE, shadow_timeout_s=3.0), replace(COMPARE, store_values=True), replace(COMPARE, rules={})):
        assert envoy_restart_reason(COMPARE, edited) is None
        assert compare_in_force(COMPARE, edited) == edited
    assert envoy_restart_reason(COMPARE, None) is None
    assert compare_in_force(COMPARE, None) == replace(COMPARE, rules={}), "the section removed: nothing compared, the listeners unchanged"
    assert envoy_restart_reason(COMPARE, replace(COMPARE, body_limit=2000)) is None, "the bound is in the routes"
    assert envoy_restart_reason(COMPARE, replace(COMPARE, private_headers=frozenset())) == (
        "spec.compare.privateHeaders changed: Envoy's listeners carry it (the access log's request headers)"
    )
    assert envoy_restart_reason(None, COMPARE) is not None and compare_in_force(None, COMPARE) is None
    assert envoy_restart_reason(None, replace(COMPARE, rules={})) is None and envoy_restart_reason(None, None) is None
