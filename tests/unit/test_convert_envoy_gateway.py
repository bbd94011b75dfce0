"""`convert envoy-gateway`: the rewritten HTTPRoutes route like the originals
and select the right mirror variant (checked with the project's own Gateway
API matcher), the sampler configured from the emitted ConfigMap decides as
from the originals, and the Envoy Gateway objects have exactly the fields
Envoy Gateway's API (v1.9) defines. Nothing here runs Envoy Gateway."""

from __future__ import annotations

import copy
import itertools
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from extproc.config.build import build_policy
from extproc.config.manifests import parse_manifests
from extproc.config.settings import Settings
from extproc.convert import Conversion, ConvertError
from extproc.convert.envoy_gateway import convert_envoy_gateway, convert_envoy_gateway_sources, object_name
from extproc.convert.kubernetes import SamplerDeployment
from extproc.core.keys import DEFAULT_KEY_CHAIN
from extproc.core.matching import PathType, ValueType
from extproc.core.plan import Plan
from extproc.core.policy import Policy, Route
from extproc.core.slots import DEFAULT_SLOT_HEADERS, SlotHeaders
from tests.support.paths import CONFORMANCE, DATA, EG_SEED, GEP_SEED
from tests.support.seeds import httproute_manifests, seed_text

SHOP = DATA / "convert" / "envoy-gateway" / "shop.yaml"
SLOTS = DEFAULT_SLOT_HEADERS.names
MARKER = DEFAULT_SLOT_HEADERS.marker
SETTINGS = Settings.load({"MIRROR_CONFIG": "x"})


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def input_sets() -> list[tuple[str, list[tuple[str, str]]]]:
    sets = [("conformance", [(str(CONFORMANCE), CONFORMANCE.read_text())]), ("shop", [(str(SHOP), SHOP.read_text())])]
    for seed in (EG_SEED, GEP_SEED):
        for i, text in enumerate(httproute_manifests(seed_text(seed))):
            sets.append((f"{seed}#{i}", [(f"{seed}#{i}", text)]))
    return sets


INPUTS = input_sets()
IDS = [name for name, _ in INPUTS]


def original_text(sources: list[tuple[str, str]]) -> str:
    return "\n---\n".join(text for _, text in sources)


def matcher_policy(text: str) -> Policy:
    """The project's matcher over the rewritten routes. Not build_policy: its
    cross-route check refuses header modifiers naming slot headers, which is
    right for the sampler's own configuration and exactly what the rewritten
    routes (meant for Envoy Gateway, not the sampler) must do."""
    parsed = parse_manifests(text, "httproutes.yaml", slots=2)
    assert parsed.problems == []
    return Policy(routes=tuple(parsed.routes), key_chain=DEFAULT_KEY_CHAIN)


def sample_requests(routes: list[Route]) -> list[dict[str, bytes]]:
    """Requests aimed at every match of every rule, and near misses."""
    hosts = {"elsewhere.example"}
    paths = {"/", "/nothing/here"}
    header_sets: list[dict[str, str]] = [{}]
    queries = {""}
    methods = {"GET", "POST"}
    for route in routes:
        hosts.update(h.replace("*.", "a.") for h in route.hostnames)
        for rule in route.rules:
            for m in rule.matches:
                if m.path.type is PathType.EXACT:
                    paths.update({m.path.value, m.path.value + "/x"})
                elif m.path.type is PathType.PREFIX:
                    paths.update({m.path.value, m.path.prefix + "/x", m.path.prefix + "-x"})
                header_sets.append({h.name: h.value for h in m.headers if h.type is ValueType.EXACT})
                queries.add("&".join(f"{q.name}={q.value}" for q in m.query_params if q.type is ValueType.EXACT))
                if m.method:
                    methods.add(m.method)
    out = []
    for host, path, hdrs, query, method in itertools.product(sorted(hosts), sorted(paths), header_sets, sorted(queries), sorted(methods)):
        request = {":authority": host.encode(), ":path": (path + ("?" + query if query else "")).encode(), ":method": method.encode()}
        request.update({k: v.encode() for k, v in hdrs.items()})
        out.append(request)
    return out


def convert(sources: list[tuple[str, str]], **options: Any) -> Conversion:
    return convert_envoy_gateway_sources(sources, SamplerDeployment(**options))


@pytest.mark.parametrize(("name", "sources"), INPUTS, ids=IDS)
def test_rewritten_routes_route_like_the_originals(name: str, sources: list[tuple[str, str]]) -> None:
    conversion = convert(sources)
    original = build_policy(SETTINGS, original_text(sources))
    rewritten = matcher_policy(conversion.files["httproutes.yaml"])
    requests = sample_requests(list(original.routes))
    assert len(requests) > 20
    for request in requests:
        before, after = original.match(request), rewritten.match(request)
        if before is None:
            assert after is None, request
            continue
        assert after is not None, request
        # Without slot headers: the plain rule, same backends and header changes, no mirrors.
        assert after.backends == before.backends, request
        assert after.mirrors == ()
        assert after.header_modifier == before.header_modifier
        # Rule ids move (variants come first), the route does not.
        assert after.id.rsplit("/", 1)[0] == before.id.rsplit("/", 1)[0]


@pytest.mark.parametrize(("name", "sources"), INPUTS, ids=IDS)
def test_slot_headers_select_the_variant_with_exactly_the_sampled_mirrors(name: str, sources: list[tuple[str, str]]) -> None:
    conversion = convert(sources)
    original = build_policy(SETTINGS, original_text(sources))
    rewritten = matcher_policy(conversion.files["httproutes.yaml"])
    checked = 0
    for request in sample_requests(list(original.routes)):
        rule = original.match(request)
        if rule is None or not rule.mirrors:
            continue
        # Every combination the sampler can produce (with per-target salts, any subset).
        for size in range(1, len(rule.mirrors) + 1):
            for chosen in itertools.combinations(rule.mirrors, size):
                slotted = {**request, **{SLOTS[m.slot]: m.backend.encode() for m in chosen}}
                variant = rewritten.match(slotted)
                assert variant is not None
                assert {m.backend for m in variant.mirrors} == {m.backend for m in chosen}, (request, chosen)
                # No percentage left: the variant mirrors everything routed to it.
                assert all(m.fraction.numerator == m.fraction.denominator for m in variant.mirrors)
                assert variant.backends == rule.backends
                assert variant.header_modifier is not None and set(SLOTS[: len(rule.mirrors)]) <= set(variant.header_modifier.remove)
                checked += 1
        # A forged value matches no variant: the plain rule, no mirror.
        forged = rewritten.match({**request, SLOTS[0]: b"attacker-choice"})
        assert forged is not None and forged.mirrors == ()
    assert checked > 0


@pytest.mark.parametrize(("name", "sources"), INPUTS, ids=IDS)
def test_sampler_from_the_configmap_decides_as_from_the_originals(name: str, sources: list[tuple[str, str]]) -> None:
    conversion = convert(sources)
    sampler = docs(conversion.files["sampler.yaml"])
    config_map = next(d for d in sampler if d["kind"] == "ConfigMap")
    container = next(d for d in sampler if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    config_text = config_map["data"][env["MIRROR_CONFIG"].rpartition("/")[2]]
    original = build_policy(SETTINGS, original_text(sources))
    from_map = build_policy(Settings.load(env), config_text)
    assert [r.id for r in from_map.rules] == [r.id for r in original.rules]
    assert [[(m.backend, m.fraction, m.slot, m.salt) for m in r.mirrors] for r in from_map.rules] == [
        [(m.backend, m.fraction, m.slot, m.salt) for m in r.mirrors] for r in original.rules
    ]
    requests = [r for r in sample_requests(list(original.routes)) if (rule := original.match(r)) is not None and rule.mirrors]
    assert requests
    for request in requests[:5]:
        for i in range(1000):
            keyed = {**request, "x-request-id": f"key-{i}".encode()}
            a, b = Plan(original).trace(keyed), Plan(from_map).trace(keyed)
            assert a.rule is not None and b.rule is not None and a.rule.id == b.rule.id
            assert [(t.target.backend, t.outcome) for t in a.targets] == [(t.target.backend, t.outcome) for t in b.targets]


def test_conformance_route_rewritten_structure() -> None:
    conversion = convert_envoy_gateway([CONFORMANCE])
    (route,) = docs(conversion.files["httproutes.yaml"])
    rules = route["spec"]["rules"]
    infra = "gateway-conformance-infra"
    v1 = [{"name": "infra-backend-v1", "port": 8080, "namespace": infra}]

    def mirror(backend: str) -> dict[str, Any]:
        return {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": backend, "namespace": infra, "port": 8080}}}

    def slot(i: int, backend: str) -> dict[str, str]:
        return {"type": "Exact", "name": SLOTS[i], "value": backend}

    prefix = {"type": "PathPrefix", "value": "/percent-mirror"}
    assert rules[0] == {
        "matches": [{"path": prefix, "headers": [slot(0, "infra-backend-v2")]}],
        "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"remove": [SLOTS[0]]}}, mirror("infra-backend-v2")],
        "backendRefs": v1,
    }
    assert rules[1] == {"matches": [{"path": prefix}], "backendRefs": v1}
    assert rules[3] == {"matches": [{"path": {"type": "PathPrefix", "value": "/percent-mirror-fraction"}}], "backendRefs": v1}
    multi = rules[4:8]
    assert [[h["value"] for h in r["matches"][0].get("headers", [])] for r in multi] == [
        ["infra-backend-v2", "infra-backend-v3"],
        ["infra-backend-v2"],
        ["infra-backend-v3"],
        [],
    ]
    modifier = {
        "set": [{"name": "X-Header-Set", "value": "set-overwrites-values"}],
        "add": [{"name": "X-Header-Add", "value": "header-val-1"}, {"name": "X-Header-Add-Append", "value": "header-val-2"}],
    }
    # One RequestHeaderModifier per rule (the CRD's rule), the slot headers merged into it.
    assert multi[0]["filters"] == [
        {"type": "RequestHeaderModifier", "requestHeaderModifier": {**modifier, "remove": ["X-Header-Remove", *SLOTS]}},
        mirror("infra-backend-v2"),
        mirror("infra-backend-v3"),
    ]
    assert multi[2]["filters"][1:] == [mirror("infra-backend-v3")]
    assert multi[3]["filters"] == [{"type": "RequestHeaderModifier", "requestHeaderModifier": {**modifier, "remove": ["X-Header-Remove"]}}]
    assert len(rules) == 8
    # Nothing else about the route changed.
    original = docs(CONFORMANCE.read_text())[0]
    assert {k: v for k, v in route.items() if k != "spec"} == {k: v for k, v in original.items() if k != "spec"}
    assert route["spec"]["parentRefs"] == original["spec"]["parentRefs"]


def test_extension_policy_exact() -> None:
    conversion = convert_envoy_gateway([CONFORMANCE])
    assert docs(conversion.files["envoy-extension-policy.yaml"]) == [
        {
            "apiVersion": "gateway.envoyproxy.io/v1alpha1",
            "kind": "EnvoyExtensionPolicy",
            "metadata": {"name": "mirror-sampler", "namespace": "gateway-conformance-infra"},
            "spec": {
                # The whole route: the filter chain comes from the first route matched (the plain rule).
                "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "request-percentage-mirror"}],
                "extProc": [
                    {
                        "backendRefs": [{"group": "", "kind": "Service", "name": "mirror-sampler", "port": 50051}],
                        "processingMode": {"request": {}},
                        "failOpen": True,
                        "messageTimeout": "200ms",
                    }
                ],
            },
        }
    ]
    assert "v1.9" in conversion.files["envoy-extension-policy.yaml"]


def test_client_traffic_policy_exact() -> None:
    conversion = convert_envoy_gateway([CONFORMANCE])
    text = conversion.files["client-traffic-policy.yaml"]
    assert docs(text) == [
        {
            "apiVersion": "gateway.envoyproxy.io/v1alpha1",
            "kind": "ClientTrafficPolicy",
            "metadata": {"name": "mirror-sampler-same-namespace", "namespace": "gateway-conformance-infra"},
            "spec": {
                "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "same-namespace"}],
                "headers": {"earlyRequestHeaders": {"remove": [*SLOTS, MARKER]}},
            },
        }
    ]
    # Which field, and why, is in the file for the user.
    assert "`remove`" in text and "removeOnMatch" in text and "1.2" in text and "1.7" in text


def test_namespaces_gateways_and_reference_grants() -> None:
    conversion = convert_envoy_gateway([SHOP])
    policies = docs(conversion.files["envoy-extension-policy.yaml"])
    eeps = {d["metadata"]["namespace"]: d for d in policies if d["kind"] == "EnvoyExtensionPolicy"}
    assert set(eeps) == {"shop", "search"}
    assert [t["name"] for t in eeps["shop"]["spec"]["targetRefs"]] == ["storefront"]  # "static" has no mirror
    assert eeps["search"]["spec"]["extProc"][0]["backendRefs"][0]["namespace"] == "shop"
    assert "namespace" not in eeps["shop"]["spec"]["extProc"][0]["backendRefs"][0]
    (grant,) = [d for d in policies if d["kind"] == "ReferenceGrant"]
    assert grant["metadata"]["namespace"] == "shop"
    assert grant["spec"] == {
        "from": [{"group": "gateway.envoyproxy.io", "kind": "EnvoyExtensionPolicy", "namespace": "search"}],
        "to": [{"group": "", "kind": "Service", "name": "mirror-sampler"}],
    }
    (ctp,) = docs(conversion.files["client-traffic-policy.yaml"])
    assert ctp["metadata"]["namespace"] == "infra"
    assert ctp["spec"]["targetRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public"}]
    assert all(d["metadata"]["namespace"] == "shop" for d in docs(conversion.files["sampler.yaml"]))
    routes = {d["metadata"]["name"]: d for d in docs(conversion.files["httproutes.yaml"])}
    assert routes["static"] == docs(SHOP.read_text())[2]
    names = [r.get("name") for r in routes["storefront"]["spec"]["rules"]]
    assert names[:4] == ["checkout-mirror-0-1", "checkout-mirror-0", "checkout-mirror-1", "checkout"]
    assert len([n for n in names if n]) == len({n for n in names if n})
    assert any("sectionName" in n for n in conversion.notes)


def test_flags_namespace_image_hpa_service() -> None:
    conversion = convert_envoy_gateway(
        [CONFORMANCE], SamplerDeployment(namespace="mirroring", image="reg.example/ms:2", hpa=True, sampler_service="sampler")
    )
    sampler = docs(conversion.files["sampler.yaml"])
    assert [d["kind"] for d in sampler] == ["ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"]
    assert {d["metadata"]["namespace"] for d in sampler} == {"mirroring"}
    assert sampler[1]["spec"]["template"]["spec"]["containers"][0]["image"] == "reg.example/ms:2"
    for d in sampler:
        kubernetes_validate.validate(d, "1.34", strict=True)
    policies = docs(conversion.files["envoy-extension-policy.yaml"])
    backend = policies[0]["spec"]["extProc"][0]["backendRefs"][0]
    assert backend == {"group": "", "kind": "Service", "name": "sampler", "port": 50051, "namespace": "mirroring"}
    assert [d["kind"] for d in policies] == ["EnvoyExtensionPolicy", "ReferenceGrant"]


def test_outputs_are_generated_multi_document_yaml_and_notes_say_what_to_apply() -> None:
    conversion = convert_envoy_gateway([CONFORMANCE])
    assert set(conversion.files) == {"httproutes.yaml", "envoy-extension-policy.yaml", "client-traffic-policy.yaml", "sampler.yaml"}
    for text in conversion.files.values():
        assert text.startswith("# Generated by `mirror-sampler convert envoy-gateway`")
    assert any("instead" in n and "random" in n for n in conversion.notes)


def test_more_slots_reach_the_sampler_and_the_header_removal() -> None:
    text = CONFORMANCE.read_text()
    conversion = convert([("c.yaml", text)], slot_headers=SlotHeaders(prefix="x-shadow-", count=3))
    (ctp,) = docs(conversion.files["client-traffic-policy.yaml"])
    assert ctp["spec"]["headers"]["earlyRequestHeaders"]["remove"] == ["x-shadow-0", "x-shadow-1", "x-shadow-2", "x-mirror-rule"]
    env = {e["name"]: e["value"] for e in docs(conversion.files["sampler.yaml"])[1]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MIRROR_SLOTS"] == "3" and env["MIRROR_SLOT_PREFIX"] == "x-shadow-"
    assert "x-shadow-0" in conversion.files["httproutes.yaml"]


def _route_with_mirrors(n: int, rules: int = 1) -> str:
    filters = "".join(
        f"""
    - type: RequestMirror
      requestMirror:
        backendRef: {{name: shadow-{i}}}
        percent: 10"""
        for i in range(n)
    )
    rule = f"""
  - matches:
    - path: {{type: PathPrefix, value: /}}
    filters:{filters}
    backendRefs:
    - name: primary"""
    return f"""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: wide}}
spec:
  rules:{rule * rules}
"""


def test_variants_over_the_crd_rule_limit_are_refused() -> None:
    # 4 mirrors: 15 variants + the plain rule = 16 rules, the most an HTTPRoute may have.
    ok = convert([("wide.yaml", _route_with_mirrors(4))], slot_headers=SlotHeaders(count=4))
    assert len(docs(ok.files["httproutes.yaml"])[0]["spec"]["rules"]) == 16
    with pytest.raises(ConvertError, match="limit of 16"):
        convert([("wide.yaml", _route_with_mirrors(4, rules=2))], slot_headers=SlotHeaders(count=4))


def test_invalid_input_names_file_and_field() -> None:
    bad = CONFORMANCE.read_text().replace("percent: 20", "percent: 120")
    with pytest.raises(ConvertError) as info:
        convert([("bad.yaml", bad)])
    assert any("bad.yaml" in p and "percent" in p for p in info.value.problems)
    with pytest.raises(ConvertError, match="no HTTPRoute rule with a RequestMirror"):
        convert([("plain.yaml", SHOP.read_text().split("---")[-1])])


def test_reads_files(tmp_path: Path) -> None:
    with pytest.raises(ConvertError, match="cannot read"):
        convert_envoy_gateway([tmp_path / "missing.yaml"])


# Names the converter gives (rules, objects): unique where Kubernetes wants them unique,
# within the 253 characters of a DNS-1123 subdomain (metadata.name) and of the CRD's
# rules[].name, and the same on every run.
SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def mirrored_rule(path: str, name: str | None = None, mirrors: int = 1) -> dict[str, Any]:
    rule: dict[str, Any] = {} if name is None else {"name": name}
    rule["matches"] = [{"path": {"type": "PathPrefix", "value": path}}]
    if mirrors:
        rule["filters"] = [
            {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": f"shadow-{i}", "port": 8080}, "percent": 10}}
            for i in range(mirrors)
        ]
    rule["backendRefs"] = [{"name": "primary", "port": 8080}]
    return rule


def route_manifest(name: str, rules: list[dict[str, Any]], gateway: str = "public") -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"parentRefs": [{"name": gateway}], "rules": rules},
    }


def manifests(*documents: dict[str, Any]) -> list[tuple[str, str]]:
    return [("edge.yaml", yaml.safe_dump_all(documents, sort_keys=False))]


# The reviewer's cases: a variant name a user rule already has; a rule name so long that the
# variant suffix passes the limit; route and Gateway names so long that the policy names did.
RULE_NAME_CLASH = manifests(route_manifest("clash", [mirrored_rule("/a", "a", mirrors=2), mirrored_rule("/b", "a-mirror-0", mirrors=0)]))
LONG_RULE_NAME = manifests(route_manifest("long-rule", [mirrored_rule("/a", "a" * 250, mirrors=2), mirrored_rule("/b", "a" * 253, 0)]))
LONG_ROUTE_NAME = manifests(route_manifest("r" * 240, [mirrored_rule("/a"), mirrored_rule("/b")]))
LONG_GATEWAY_NAMES = manifests(
    route_manifest("one", [mirrored_rule("/a")], gateway="g" * 245 + "-one"),
    route_manifest("two", [mirrored_rule("/b")], gateway="g" * 245 + "-two"),
)
EDGE_NAMES = {"rule-name-clash": RULE_NAME_CLASH, "long-rule-name": LONG_RULE_NAME, "long-route-name": LONG_ROUTE_NAME}
EDGE_NAMES["long-gateway-names"] = LONG_GATEWAY_NAMES


def object_names(conversion: Conversion) -> dict[tuple[str, str | None], list[str]]:
    """metadata.name of every object written, by (kind, namespace)."""
    names: dict[tuple[str, str | None], list[str]] = {}
    for text in conversion.files.values():
        for d in docs(text):
            names.setdefault((d["kind"], d["metadata"].get("namespace")), []).append(d["metadata"]["name"])
    return names


def assert_names_valid(conversion: Conversion) -> None:
    for (kind, ns), names in object_names(conversion).items():
        # The same name twice: the second `kubectl apply` replaces the first object.
        assert len(names) == len(set(names)), (kind, ns, names)
        for name in names:
            assert len(name) <= 253 and SUBDOMAIN.fullmatch(name), (kind, name)
    for route in docs(conversion.files["httproutes.yaml"]):
        names = [r["name"] for r in route["spec"]["rules"] if "name" in r]
        assert len(names) == len(set(names)), names
        for name in names:
            assert len(name) <= 253 and SUBDOMAIN.fullmatch(name), name


def test_object_name_cuts_long_names_with_a_hash_of_the_whole() -> None:
    assert object_name("mirror-sampler", "shop", "0") == "mirror-sampler-shop-0"
    assert object_name("a" * 240, "mirror", "0") == "a" * 240 + "-mirror-0"  # 249: kept whole
    long = [object_name("r" * 240, "mirror", str(i)) for i in range(12)]
    assert len(set(long)) == 12
    assert all(len(n) <= 253 and SUBDOMAIN.fullmatch(n) for n in long)
    assert long == [object_name("r" * 240, "mirror", str(i)) for i in range(12)]  # deterministic
    # A cut that would end in '.' or '-' does not leave '.-' or '--' before the hash.
    for filler in ("a.", "a-", "a.-"):
        name = object_name("x" * 239 + filler * 10, "0")
        assert len(name) <= 253 and SUBDOMAIN.fullmatch(name), name


@pytest.mark.parametrize("sources", EDGE_NAMES.values(), ids=EDGE_NAMES.keys())
def test_names_are_unique_valid_and_stable(sources: list[tuple[str, str]]) -> None:
    conversion = convert(sources)
    assert_names_valid(conversion)
    # The sampler and the routes still agree: each variant selects the right mirrors.
    test_slot_headers_select_the_variant_with_exactly_the_sampled_mirrors("edge", sources)
    assert convert(sources).files == conversion.files


def test_variant_names_avoid_the_rule_names_the_route_has() -> None:
    conversion = convert(RULE_NAME_CLASH)
    (route,) = docs(conversion.files["httproutes.yaml"])
    names = [r.get("name") for r in route["spec"]["rules"]]
    # "a-mirror-0" is the user's rule: rule a's variants take the next free infix.
    assert names == ["a-mirror2-0-1", "a-mirror2-0", "a-mirror2-1", "a", "a-mirror-0"]
    (note,) = [n for n in conversion.notes if "keeps its name" in n]
    assert "a-mirror2-0-1, a-mirror2-0, a-mirror2-1" in note


def test_variant_names_of_a_long_rule_name_fit_the_crd_limit() -> None:
    conversion = convert(LONG_RULE_NAME)
    (route,) = docs(conversion.files["httproutes.yaml"])
    names = [r["name"] for r in route["spec"]["rules"]]
    assert names[3:] == ["a" * 250, "a" * 253]  # the user's names, unchanged
    assert [len(n) for n in names[:3]] == [253, 253, 253]
    assert len(set(names)) == 5


def test_client_traffic_policies_of_long_gateway_names_are_distinct() -> None:
    conversion = convert(LONG_GATEWAY_NAMES)
    ctps = docs(conversion.files["client-traffic-policy.yaml"])
    assert [c["spec"]["targetRefs"][0]["name"] for c in ctps] == ["g" * 245 + "-one", "g" * 245 + "-two"]
    assert len({c["metadata"]["name"] for c in ctps}) == 2


GRPC_ROUTE: dict[str, Any] = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "GRPCRoute",
    "metadata": {"name": "orders", "namespace": "shop"},
    "spec": {
        "parentRefs": [{"name": "public"}],
        "rules": [
            {
                "filters": [
                    {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "orders-shadow", "port": 9000}, "percent": 10}}
                ],
                "backendRefs": [{"name": "orders", "port": 9000}],
            }
        ],
    },
}
SERVICE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "primary", "namespace": "shop"},
    "spec": {"ports": [{"port": 8080}]},
}


def test_documents_of_other_kinds_are_named_in_a_note() -> None:
    plain_grpc = copy.deepcopy(GRPC_ROUTE)
    plain_grpc["metadata"]["name"] = "plain"
    del plain_grpc["spec"]["rules"][0]["filters"]
    always = copy.deepcopy(GRPC_ROUTE)
    always["metadata"]["name"] = "always"
    del always["spec"]["rules"][0]["filters"][0]["requestMirror"]["percent"]
    route = route_manifest("web", [mirrored_rule("/")])
    conversion = convert(manifests(route, GRPC_ROUTE, SERVICE, plain_grpc, always))
    # Nothing written for them: neither in the routes nor in the sampler's configuration.
    assert "GRPCRoute" not in "".join(conversion.files.values())
    ignored = [n for n in conversion.notes if n.startswith("edge.yaml (document")]
    assert len(ignored) == 4, conversion.notes
    random, service, plain, every = ignored
    # The one that keeps mirroring at random says so, by document, name and mirror backend.
    assert random.startswith("edge.yaml (document 2): GRPCRoute shop/orders")
    assert "orders-shadow" in random and "at random" in random and "NOT converted" in random
    assert service.startswith("edge.yaml (document 3): Service shop/primary ignored")
    assert plain.startswith("edge.yaml (document 4): GRPCRoute shop/plain has no RequestMirror")
    assert every.startswith("edge.yaml (document 5): GRPCRoute shop/always mirrors every request")


def test_a_grpc_route_mirroring_at_random_is_named_when_nothing_converts() -> None:
    route = route_manifest("web", [mirrored_rule("/", mirrors=0)])
    with pytest.raises(ConvertError) as info:
        convert(manifests(route, GRPC_ROUTE))
    assert "no HTTPRoute rule with a RequestMirror" in info.value.problems[0]
    assert "GRPCRoute shop/orders" in info.value.problems[1] and "at random" in info.value.problems[1]


def test_a_grpc_route_with_a_malformed_mirror_is_named_not_a_traceback() -> None:
    """GRPCRoutes are not checked, only named: a backendRef that is no mapping is shown as written."""
    broken = copy.deepcopy(GRPC_ROUTE)
    broken["spec"]["rules"][0]["filters"][0]["requestMirror"]["backendRef"] = "shadow"
    conversion = convert(manifests(route_manifest("web", [mirrored_rule("/")]), broken))
    assert any("GRPCRoute shop/orders mirrors to 'shadow'" in n for n in conversion.notes), conversion.notes
