"""`convert istio`: rewritten VirtualServices keep Istio's first-match routing
and select the variant with exactly the mirrors the sampler sampled (checked
with a small model of Istio's HTTP route matching), the translated HTTPRoutes
decide with the VirtualServices' exact percentages, and the EnvoyFilter has the
structure and context the VirtualService implies. Nothing here runs Istio."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import kubernetes_validate
import pytest
import yaml

from extproc.cli import main
from extproc.config.build import build_policy
from extproc.config.settings import Settings
from extproc.convert import Conversion, ConvertError
from extproc.convert.istio import convert_istio, convert_istio_sources
from extproc.convert.istio_order import may_overlap
from extproc.convert.istio_translate import percent_fraction, token
from extproc.convert.kubernetes import SamplerDeployment
from extproc.convert.module_delivery import ModuleEngine
from extproc.core.matching import compile_regex
from extproc.core.plan import Plan
from extproc.core.policy import Outcome, Policy
from extproc.core.sampling import Fraction, is_sampled, key_hash
from extproc.core.slots import DEFAULT_SLOT_HEADERS
from tests.support.paths import DATA

ISTIO = DATA / "convert" / "istio"
REVIEWS = ISTIO / "reviews.yaml"
LEFT = ISTIO / "left-alone.yaml"
SLOTS = DEFAULT_SLOT_HEADERS.names
MARKER = DEFAULT_SLOT_HEADERS.marker
KEYS = [f"key-{i}" for i in range(1000)]


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


# --------------------------------------------------------------------------
# A model of Istio's HTTP route selection: the first http[] route with a
# match entry that holds (or no match at all). Enough of StringMatch for the
# test data: exact, prefix, regex (RE2 full match), presence; ignoreUriCase;
# sourceLabels never hold (the requests come from no labelled workload).


def string_matches(sm: dict[str, Any] | None, value: str | None, ignore_case: bool = False) -> bool:
    if value is None:
        return False
    if not sm:
        return True
    ((kind, expected),) = sm.items()
    if ignore_case:
        value, expected = value.lower(), expected.lower()
    if kind == "exact":
        return bool(value == expected)
    if kind == "prefix":
        return value.startswith(expected)
    return expected == "*" or compile_regex(expected).fullmatch(value.encode()) is not None


def entry_matches(m: dict[str, Any], request: dict[str, str]) -> bool:
    if m.get("sourceLabels"):
        return False
    path, _, query = request[":path"].partition("?")
    params = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
    if m.get("uri") and not string_matches(m["uri"], path, bool(m.get("ignoreUriCase"))):
        return False
    if m.get("method") and not string_matches(m["method"], request[":method"]):
        return False
    if any(not string_matches(sm, request.get(name)) for name, sm in (m.get("headers") or {}).items()):
        return False
    return all(string_matches(sm, params.get(name)) for name, sm in (m.get("queryParams") or {}).items())


def istio_route(vs: dict[str, Any], request: dict[str, str]) -> dict[str, Any] | None:
    for route in vs["spec"].get("http") or []:
        if not route.get("match") or any(entry_matches(m, request) for m in route["match"]):
            return dict(route)
    return None


def mirrors_of(route: dict[str, Any]) -> list[dict[str, Any]]:
    if route.get("mirror"):
        return [route["mirror"]]
    return [m["destination"] for m in route.get("mirrors") or []]


def percentages(route: dict[str, Any]) -> list[object]:
    return [route.get("mirrorPercentage"), *[m.get("percentage") for m in route.get("mirrors") or []]]


def requests_for(vs: dict[str, Any]) -> list[dict[str, str]]:
    paths = {"/", "/other"}
    header_sets: list[dict[str, str]] = [{}]
    methods = {"GET", "POST"}
    for route in vs["spec"].get("http") or []:
        for m in route.get("match") or []:
            uri = m.get("uri") or {}
            for value in uri.values():
                paths.update({value, value + "/x", value + "x", value.upper()})
            headers = {}
            for name, sm in (m.get("headers") or {}).items():
                headers[name] = next(iter(sm.values())) if sm else "present"
            header_sets.append(headers)
            if m.get("method"):
                methods.add(m["method"]["exact"])
    return [{":path": p, ":method": meth, **h} for p, h, meth in itertools.product(sorted(paths), header_sets, sorted(methods))]


# --------------------------------------------------------------------------


def convert(*paths: Any, **options: Any) -> Conversion:
    return convert_istio(list(paths) or [REVIEWS], SamplerDeployment(**options))


def sampler_policy(conversion: Conversion) -> tuple[Policy, list[dict[str, Any]]]:
    sampler = docs(conversion.files["sampler.yaml"])
    container = next(d for d in sampler if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    config_text = next(d for d in sampler if d["kind"] == "ConfigMap")["data"][env["MIRROR_CONFIG"].rpartition("/")[2]]
    return build_policy(Settings.load(env), config_text), docs(config_text)


def http_index(config_routes: list[dict[str, Any]], rule_id: str) -> tuple[str, int]:
    """VirtualService name and http[] index of a translated rule (from its HTTPRoute's
    annotation: "VirtualService <namespace>/<name> http[<index of rule 0>], ...")."""
    _namespace, name, index = rule_id.split("/")
    route = next(r for r in config_routes if r["metadata"]["name"] == name)
    _, vs_id, sources = route["metadata"]["annotations"]["convert.mirror-sampler.dev/translated-from"].split(" ", 2)
    return vs_id.split("/")[1], int(sources.split(", ")[int(index)].removeprefix("http[").removesuffix("]"))


def host_of(vs: dict[str, Any]) -> str:
    return str(vs["spec"]["hosts"][0])


@pytest.mark.parametrize("path", [REVIEWS, LEFT], ids=["reviews", "left-alone"])
def test_rewritten_virtual_services_route_like_the_originals(path: Any) -> None:
    conversion = convert(path)
    originals = {d["metadata"]["name"]: d for d in docs(path.read_text())}
    for vs in docs(conversion.files["virtualservices.yaml"]):
        original = originals[vs["metadata"]["name"]]
        for request in requests_for(original):
            before, after = istio_route(original, request), istio_route(vs, request)
            assert (before is None) == (after is None), request
            if before is None or after is None:
                continue
            assert after["route"] == before["route"], request
            if mirrors_of(after):
                # Only a route left as it was still mirrors (at its own percentage) without slot headers.
                assert percentages(after) == percentages(before) and mirrors_of(after) == mirrors_of(before)
            # No backend ever sees a slot header.
            assert set(SLOTS) <= set(after["headers"]["request"]["remove"])


@pytest.mark.parametrize("path", [REVIEWS, LEFT], ids=["reviews", "left-alone"])
def test_sampled_slot_headers_select_exactly_the_sampled_mirrors(path: Any) -> None:
    conversion = convert(path)
    policy, config_routes = sampler_policy(conversion)
    originals = {d["metadata"]["name"]: d for d in docs(path.read_text())}
    converted = 0
    for vs in docs(conversion.files["virtualservices.yaml"]):
        original = originals[vs["metadata"]["name"]]
        for request in requests_for(original):
            before = istio_route(original, request)
            for key in KEYS[:60]:
                headers = {k: v.encode() for k, v in request.items()} | {":authority": host_of(vs).encode(), "x-request-id": key.encode()}
                decision = Plan(policy).trace(headers)
                sampled = [t.target.backend for t in decision.targets if t.outcome is Outcome.MIRRORED]
                slotted = {**request, **{SLOTS[t.target.slot]: t.target.backend for t in decision.targets if t.outcome is Outcome.MIRRORED}}
                after = istio_route(vs, slotted)
                assert (before is None) == (after is None)
                if before is None or after is None:
                    continue
                assert after["route"] == before["route"]
                plain = istio_route(vs, request)
                if mirrors_of(before) and plain is not None and not mirrors_of(plain):
                    # A converted route: the sampler decided for the route Istio takes...
                    assert decision.rule is not None
                    assert http_index(config_routes, decision.rule.id) == (vs["metadata"]["name"], vs_index(original, before))
                    # ...and Istio mirrors exactly what it sampled, at 100%.
                    assert sorted(token(d) for d in mirrors_of(after)) == sorted(sampled)
                    assert all(p is None for p in percentages(after))
                    converted += bool(sampled)
                else:
                    # Not converted: whatever the sampler set changes nothing (and is removed).
                    assert mirrors_of(after) == mirrors_of(before) and percentages(after) == percentages(before)
    assert converted > 0


def vs_index(vs: dict[str, Any], route: dict[str, Any]) -> int:
    return next(i for i, r in enumerate(vs["spec"]["http"]) if r == route)


def test_variants_come_first_and_keep_everything_else() -> None:
    conversion = convert()
    reviews = docs(conversion.files["virtualservices.yaml"])[0]
    http = reviews["spec"]["http"]
    assert [r.get("name") for r in http] == ["v2-api-mirror-0", "v2-api", "default-mirror-0", "default"]
    remove = {"request": {"remove": list(SLOTS)}}
    assert http[0] == {
        "name": "v2-api-mirror-0",
        "match": [{"uri": {"prefix": "/api/v2"}, "headers": {"x-tenant": {"exact": "acme"}, SLOTS[0]: {"exact": "reviews-shadow--v2"}}}],
        "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
        "mirror": {"host": "reviews-shadow", "subset": "v2", "port": {"number": 9080}},
        "headers": remove,
    }
    assert http[1] == {
        "name": "v2-api",
        "match": [{"uri": {"prefix": "/api/v2"}, "headers": {"x-tenant": {"exact": "acme"}}}],
        "route": [{"destination": {"host": "reviews", "subset": "v2"}}],
        "headers": remove,
    }
    storefront = docs(conversion.files["virtualservices.yaml"])[1]
    mirrored = storefront["spec"]["http"][1:]
    assert [sorted(m["match"][0].get("headers", {})) for m in mirrored] == [list(SLOTS), [SLOTS[0]], [SLOTS[1]], []]
    assert mirrored[0]["mirrors"] == [
        {"destination": {"host": "storefront-canary.shop.svc.cluster.local"}},
        {"destination": {"host": "storefront-next.shop.svc.cluster.local"}},
    ]
    assert mirrored[3]["headers"]["request"]["remove"] == ["x-debug", *SLOTS]
    assert "mirrors" not in mirrored[3]
    assert storefront["spec"]["http"][0]["timeout"] == "3s"
    assert storefront["spec"]["gateways"] == ["istio-system/public-gateway"]


def test_translated_routes_decide_with_the_exact_percentages() -> None:
    conversion = convert()
    policy, _ = sampler_policy(conversion)
    fractions = {r.id: [(m.backend, m.fraction) for m in r.mirrors] for r in policy.rules}
    assert fractions == {
        "shop/reviews/0": [("reviews-shadow--v2", Fraction(125, 1000))],
        "shop/reviews/1": [("reviews-shadow", Fraction(5, 1000))],
        "shop/storefront/0": [],
        "shop/storefront/1": [
            ("storefront-canary.shop.svc.cluster.local", Fraction(20, 100)),
            ("storefront-next.shop.svc.cluster.local", Fraction(5, 100)),
        ],
    }
    request = {":authority": b"reviews.shop.svc.cluster.local:9080", ":path": b"/api/v2beta", ":method": b"GET", "x-tenant": b"acme"}
    mirrored = 0
    for key in KEYS:
        decision = Plan(policy).trace(request | {"x-request-id": key.encode()})
        assert decision.rule is not None and decision.rule.id == "shop/reviews/0"  # Istio's prefix is a string prefix
        expected = is_sampled(key_hash(b"", key.encode()), Fraction(125, 1000))
        assert (decision.targets[0].outcome is Outcome.MIRRORED) == expected
        mirrored += expected
    assert 80 < mirrored < 170


@pytest.mark.parametrize(
    ("value", "fraction"),
    [
        (12.5, Fraction(125, 1000)),
        (0.5, Fraction(5, 1000)),
        (20, Fraction(20, 100)),
        (20.0, Fraction(20, 100)),
        (100, Fraction(100, 100)),
        (0, Fraction(0, 100)),
        (0.0001, Fraction(1, 1_000_000)),
        (33.333, Fraction(33333, 100_000)),
    ],
)
def test_percent_fraction_is_exact(value: float, fraction: Fraction) -> None:
    assert percent_fraction(value, "x") == fraction


@pytest.mark.parametrize("value", [101, -1, "12", True, None, float("nan")])
def test_percent_fraction_refuses_what_istio_refuses(value: object) -> None:
    with pytest.raises(ConvertError):
        percent_fraction(value, "spec.http[0].mirrorPercentage.value")


def test_envoy_filter_structure_and_contexts() -> None:
    conversion = convert()
    filters = {d["metadata"]["namespace"]: d for d in docs(conversion.files["envoy-filter.yaml"])}
    # reviews: no gateways (mesh) -> sidecars of its namespace; storefront: a gateway in istio-system.
    assert set(filters) == {"shop", "istio-system"}
    for namespace, context in (("shop", "SIDECAR_OUTBOUND"), ("istio-system", "GATEWAY")):
        ef = filters[namespace]
        assert ef["apiVersion"] == "networking.istio.io/v1alpha3" and ef["kind"] == "EnvoyFilter"
        strip, ext_proc = ef["spec"]["configPatches"]
        match = {
            "context": context,
            "listener": {
                "filterChain": {
                    "filter": {"name": "envoy.filters.network.http_connection_manager", "subFilter": {"name": "envoy.filters.http.router"}}
                }
            },
        }
        for patch in (strip, ext_proc):
            assert patch["applyTo"] == "HTTP_FILTER"
            assert patch["match"] == match
            assert patch["patch"]["operation"] == "INSERT_BEFORE"
        # Inserted before the router in this order: the strip filter runs first.
        lua = strip["patch"]["value"]
        assert lua["typed_config"]["@type"] == "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
        code = lua["typed_config"]["default_source_code"]["inline_string"]
        assert all(f'"{n}"' in code for n in (*SLOTS, MARKER)) and "clearRouteCache()" in code
        assert ext_proc["patch"]["value"] == {
            "name": "envoy.filters.http.ext_proc",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                "grpc_service": {
                    "envoy_grpc": {
                        "cluster_name": "outbound|50051||mirror-sampler.shop.svc.cluster.local",
                        "authority": "mirror-sampler.shop.svc.cluster.local",
                    }
                },
                "failure_mode_allow": True,
                "message_timeout": "0.200s",
                # The body modes are NONE, their default (left out, as protobuf JSON does).
                "processing_mode": {
                    "request_header_mode": "SEND",
                    "response_header_mode": "SKIP",
                    "request_trailer_mode": "SKIP",
                    "response_trailer_mode": "SKIP",
                },
            },
        }


def test_mesh_and_gateway_together_get_both_contexts() -> None:
    conversion = convert(LEFT)
    (ef,) = docs(conversion.files["envoy-filter.yaml"])
    assert ef["metadata"]["namespace"] == "shop"
    assert [p["match"]["context"] for p in ef["spec"]["configPatches"]] == ["SIDECAR_OUTBOUND"] * 2 + ["GATEWAY"] * 2


def test_what_cannot_be_translated_exactly_is_left_as_it_was_with_a_note() -> None:
    conversion = convert(LEFT)
    original = docs(LEFT.read_text())[0]
    (catalog,) = [d for d in docs(conversion.files["virtualservices.yaml"]) if d["metadata"]["name"] == "catalog"]
    by_name = {r.get("name"): r for r in catalog["spec"]["http"]}
    for i, name in enumerate(["from-canary", "any-case", "short-prefix"]):
        kept = dict(by_name[name])
        assert kept["headers"]["request"]["remove"] == list(SLOTS)
        del kept["headers"]
        assert kept == original["spec"]["http"][i]  # still mirroring at random, as before
    assert {"long-prefix-mirror-0", "exact-kept-mirror-0"} <= set(by_name)
    notes = "\n".join(conversion.notes)
    assert "http[0] left as it was" in notes and "sourceLabels" in notes
    assert "http[1] left as it was" in notes and "ignoreUriCase" in notes
    assert "http[2] left as it was" in notes and "http[3] comes later" in notes
    assert "shared-a http[0] left as it was" in notes and "shared-b" in notes
    # Neither VirtualService sharing a host is rewritten.
    assert {d["metadata"]["name"] for d in docs(conversion.files["virtualservices.yaml"])} == {"catalog"}
    policy, _ = sampler_policy(conversion)
    assert {r.id: len(r.mirrors) for r in policy.rules} == {"shop/catalog/0": 0, "shop/catalog/1": 1, "shop/catalog/2": 1}


def test_overlap_is_only_ruled_out_when_certain() -> None:
    assert not may_overlap({"uri": {"prefix": "/a"}}, {"uri": {"prefix": "/b"}})
    assert may_overlap({"uri": {"prefix": "/a"}}, {"uri": {"prefix": "/abc"}})
    assert not may_overlap({"uri": {"exact": "/health"}}, {"uri": {"prefix": "/abc"}})
    assert not may_overlap({"uri": {"exact": "/x"}}, {"uri": {"regex": "/[0-9]+"}})
    assert may_overlap({"uri": {"regex": "/a.*"}}, {"uri": {"regex": "/[a-z]+"}})
    assert not may_overlap({"method": {"exact": "GET"}}, {"method": {"exact": "POST"}})
    assert not may_overlap({"headers": {"x": {"exact": "1"}}}, {"headers": {"x": {"exact": "2"}}})
    assert may_overlap({"headers": {"x": {"exact": "1"}}}, {"headers": {"y": {"exact": "2"}}})
    assert may_overlap({}, {"uri": {"exact": "/"}})


def test_sampler_objects_and_generated_headers() -> None:
    conversion = convert(hpa=True, namespace="mirroring", image="reg.example/ms:3")
    assert set(conversion.files) == {"virtualservices.yaml", "envoy-filter.yaml", "sampler.yaml"}
    for text in conversion.files.values():
        assert text.startswith("# Generated by `mirror-sampler convert istio`")
    for d in docs(conversion.files["sampler.yaml"]):
        kubernetes_validate.validate(d, "1.34", strict=True)
        assert d["metadata"]["namespace"] == "mirroring"
    cluster = docs(conversion.files["envoy-filter.yaml"])[0]["spec"]["configPatches"][1]["patch"]["value"]["typed_config"]["grpc_service"]
    assert cluster["envoy_grpc"]["cluster_name"] == "outbound|50051||mirror-sampler.mirroring.svc.cluster.local"
    assert any("instead" in n and "random" in n for n in conversion.notes)


def test_invalid_input_is_refused_with_its_field() -> None:
    text = REVIEWS.read_text().replace("value: 12.5", "value: 120")
    with pytest.raises(ConvertError) as info:
        convert_istio_sources([("bad.yaml", text)])
    assert any("bad.yaml" in p and "mirrorPercentage" in p for p in info.value.problems)
    with pytest.raises(ConvertError, match="no VirtualService"):
        convert_istio_sources([("none.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: x}\n")])


# --------------------------------------------------------------------------
# Input the conversion must refuse by field, or take whole.

MODULE = ModuleEngine()


def mirrored_route(path: str | None = None, percent: float = 50) -> dict[str, Any]:
    route: dict[str, Any] = {"match": [{"uri": {"exact": path}}]} if path else {}
    return {**route, "route": [{"destination": {"host": "web"}}], "mirror": {"host": "shadow"}, "mirrorPercentage": {"value": percent}}


def virtual_service(http: list[Any], name: str = "r", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"hosts": ["web"], **spec, "http": http},
    }


def with_value(doc: dict[str, Any], path: tuple[str | int, ...], value: object) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node: Any = out
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return out


def dump(*documents: dict[str, Any]) -> str:
    return yaml.safe_dump_all(documents, sort_keys=False)


DOC = virtual_service([mirrored_route()], gateways=["mesh"])


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        (("spec", "http"), 5, "spec.http: expected a list of HTTP routes, got 5"),
        (("metadata",), [1], "metadata: expected a mapping with name and namespace, got [1]"),
        (("metadata", "namespace"), 5, "metadata.namespace: must be a DNS-1123 name, got 5"),
        (("spec", "gateways"), 5, "spec.gateways: expected a list of gateway names, got 5"),
        (("spec", "gateways"), [5], "spec.gateways[0]: expected a gateway name, got 5"),
        (("spec", "http", 0, "mirrors"), 5, "spec.http[0].mirrors: expected a list of mirrors, got 5"),
        (("spec", "http", 0, "route"), 5, "spec.http[0].route: expected a list of destinations, got 5"),
        (("spec", "http", 0, "route", 0, "weight"), "50", "spec.http[0].route[0].weight: expected an integer, got '50'"),
        (("spec", "http", 0, "match"), 5, "spec.http[0].match: expected a list of match conditions, got 5"),
        (("spec", "http", 0, "match"), [5], "spec.http[0].match[0]: expected a mapping (a match condition), got 5"),
        (("spec", "http", 0, "match"), [{"headers": [1]}], "spec.http[0].match[0].headers: expected a mapping"),
        (("spec", "http", 0, "headers"), 5, "spec.http[0].headers: expected a mapping (request, response), got 5"),
        (("spec", "http", 0, "headers"), {"request": 5}, "spec.http[0].headers.request: expected a mapping (set, add, remove), got 5"),
        (
            ("spec", "http", 0, "headers"),
            {"request": {"remove": "x-foo"}},
            "spec.http[0].headers.request.remove: expected a list of header names, got 'x-foo'",
        ),
    ],
    ids=lambda v: ".".join(map(str, v)) if isinstance(v, tuple) else None,
)
@pytest.mark.parametrize("engine", ["ext_proc", "module"])
def test_a_mistyped_field_is_refused_by_its_path(
    path: tuple[str | int, ...], value: object, problem: str, engine: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each engine, as a function and on the command line: a problem naming file, document
    and field (the label once), a non-zero exit, never an exception of another kind."""
    source = tmp_path / "bad.yaml"
    source.write_text(dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}, with_value(DOC, path, value)))
    with pytest.raises(ConvertError) as info:
        convert_istio([source], module=MODULE if engine == "module" else None)
    (found,) = info.value.problems
    assert found.startswith(f"{source} (document 2): {problem}")
    inline = ["--inline", "module"] if engine == "module" else []
    assert main(["convert", "istio", str(source), "-o", str(tmp_path / "out"), *inline]) == 2
    assert problem in capsys.readouterr().err


def many_routes(count: int, hosts: tuple[str, ...] = ("web",), name: str = "r") -> dict[str, Any]:
    """``count`` mirrored routes, /p<i> at i + 1 %."""
    return virtual_service([mirrored_route(f"/p{i}", i + 1) for i in range(count)], name=name, hosts=list(hosts))


def test_more_routes_and_host_names_than_an_httproute_holds_are_split() -> None:
    """17 routes and 5 short hosts (20 host names): four HTTPRoutes, each rule mapping to its
    http[] route by its HTTPRoute's annotation; every host decides every path for its route."""
    conversion = convert_istio_sources([("many.yaml", dump(many_routes(17, hosts=("a", "b", "c", "d", "e"))))])
    policy, config_routes = sampler_policy(conversion)
    assert [r["metadata"]["name"] for r in config_routes] == ["r", "r-02", "r-03", "r-04"]
    assert [len(r["spec"]["rules"]) for r in config_routes] == [16, 1, 16, 1]
    assert [len(r["spec"]["hostnames"]) for r in config_routes] == [16, 16, 4, 4]
    hostnames = [h for r in config_routes[::2] for h in r["spec"]["hostnames"]]
    assert len(hostnames) == 20 and "e.shop.svc.cluster.local" in hostnames
    for host in hostnames:
        for i in range(17):
            request = {":authority": host.encode(), ":path": f"/p{i}".encode(), ":method": b"GET", "x-request-id": b"k"}
            rule = Plan(policy).trace(request).rule
            assert rule is not None and http_index(config_routes, rule.id) == ("r", i)
            assert [m.fraction for m in rule.mirrors] == [Fraction(i + 1, 100)]
    (vs,) = docs(conversion.files["virtualservices.yaml"])
    assert [r["match"][0]["uri"]["exact"] for r in vs["spec"]["http"]] == [f"/p{i}" for i in range(17) for _ in range(2)]
    assert not any("left as it was" in n for n in conversion.notes)


def test_an_httproute_name_two_virtual_services_would_need_is_refused() -> None:
    other = virtual_service([mirrored_route()], name="r-02", hosts=["other"])
    with pytest.raises(ConvertError, match="VirtualServices shop/r and shop/r-02 both need the sampler's HTTPRoute shop/r-02"):
        convert_istio_sources([("many.yaml", dump(many_routes(17), other))])
    with pytest.raises(ConvertError, match=r"^\S+ \(document 1\): metadata.name: 252 characters leave no room") as info:
        convert_istio_sources([("many.yaml", dump(many_routes(17, name="r" * 252)))])
    assert info.value.problems[0].count("(document") == 1


def test_a_delegating_route_forwards_without_mirrors_and_drops_the_slot_headers() -> None:
    delegating = {"match": [{"uri": {"prefix": "/reviews"}}], "delegate": {"name": "reviews", "namespace": "shop"}}
    root = virtual_service([delegating, mirrored_route()], name="root", hosts=["shop.example.com"], gateways=["istio-system/gw"])
    for engine in (None, MODULE):
        conversion = convert_istio_sources([("root.yaml", dump(root))], module=engine)
        (vs,) = docs(conversion.files["virtualservices.yaml"])
        assert vs["spec"]["http"][0] == {**delegating, "headers": {"request": {"remove": list(SLOTS)}}}
    conversion = convert_istio_sources([("root.yaml", dump(root))])
    assert any("http[0] delegates to VirtualService shop/reviews" in n and "headers.request.remove" in n for n in conversion.notes)
    policy, config_routes = sampler_policy(conversion)
    for path, index in (("/reviews/1", 0), ("/other", 1)):
        mirrored = 0
        for key in KEYS[:100]:
            request = {":authority": b"shop.example.com", ":path": path.encode(), ":method": b"GET", "x-request-id": key.encode()}
            trace = Plan(policy).trace(request)
            assert trace.rule is not None and http_index(config_routes, trace.rule.id) == ("root", index)
            mirrored += any(t.outcome is Outcome.MIRRORED for t in trace.targets)
        assert (mirrored > 0) == (index == 1)
    # A delegating route that mirrors is left mirroring at random, and still mirrors nothing in the sampler.
    mirroring = {**delegating, "mirror": {"host": "shadow"}, "mirrorPercentage": {"value": 5}}
    conversion = convert_istio_sources([("root.yaml", dump(with_value(root, ("spec", "http", 0), mirroring)))])
    assert any("http[0] left as it was" in n and "delegate" in n for n in conversion.notes)
    policy, config_routes = sampler_policy(conversion)
    request = {":authority": b"shop.example.com", ":path": b"/reviews/1", ":method": b"GET", "x-request-id": b"k"}
    rule = Plan(policy).trace(request).rule
    assert rule is not None and http_index(config_routes, rule.id) == ("root", 0) and not rule.mirrors
    (vs,) = docs(conversion.files["virtualservices.yaml"])
    assert vs["spec"]["http"][0] == {**mirroring, "headers": {"request": {"remove": list(SLOTS)}}}


def test_other_documents_are_noted_by_kind_and_document() -> None:
    others = dump(
        {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "d", "namespace": "shop"}},
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GRPCRoute",
            "metadata": {"name": "g", "namespace": "shop"},
            "spec": {"rules": [{"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "x"}}}]}]},
        },
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "h"}, "spec": {"rules": [{}]}},
    )
    text = dump(DOC) + "---\n# nothing\n---\n" + others  # documents 3, 4 and 5
    for engine in (None, MODULE):
        notes = convert_istio_sources([("in.yaml", text)], module=engine).notes
        assert "in.yaml (document 3): DestinationRule shop/d ignored: not a VirtualService" in notes
        (grpc,) = [n for n in notes if n.startswith("in.yaml (document 4): GRPCRoute shop/g ignored")]
        assert "RequestMirror filters keep mirroring at random" in grpc
        assert any(n.startswith("in.yaml (document 5): HTTPRoute h ignored") for n in notes)
    with pytest.raises(ConvertError) as info:
        convert_istio_sources([("in.yaml", others)])
    assert "in.yaml: no VirtualService" in info.value.problems[0]
    assert [p.split(" ignored")[0] for p in info.value.problems[1:]] == [
        "in.yaml (document 1): DestinationRule shop/d",
        "in.yaml (document 2): GRPCRoute shop/g",
        "in.yaml (document 3): HTTPRoute h",
    ]
    with pytest.raises(ConvertError, match=r"in.yaml \(document 6\): kind: unknown kind 'Virtualservice'; did you mean VirtualService\?"):
        convert_istio_sources([("in.yaml", text + "---\nkind: Virtualservice\n")])


def test_what_the_sampler_refuses_is_noted_in_the_virtual_services_terms() -> None:
    route = {**mirrored_route(), "match": [{"uri": {"regex": "/(?<=x)a"}}]}
    conversion = convert_istio_sources([("r.yaml", dump(virtual_service([route, mirrored_route()])))])
    (note,) = [n for n in conversion.notes if "left as it was" in n]
    assert "http[0] left as it was" in note and "as the sampler's HTTPRoute rule: matches[0].path.value: not a regular expression" in note
    assert "check" not in note and note.count("(document") == 1


def test_kinds_of_other_groups_close_to_virtual_service_are_noted_not_refused() -> None:
    """NGINX's VirtualServer and a VirtualServiceList are real kinds: only in
    Istio's group (or with no group) is a near miss a typo."""
    others = dump(
        {"apiVersion": "k8s.nginx.org/v1", "kind": "VirtualServer", "metadata": {"name": "n", "namespace": "shop"}},
        {"apiVersion": "v1", "kind": "VirtualServiceList", "metadata": {"name": "l"}},
    )
    notes = convert_istio_sources([("in.yaml", dump(DOC) + "---\n" + others)]).notes
    assert any(n.startswith("in.yaml (document 2): VirtualServer") and "ignored" in n for n in notes), notes
    assert any(n.startswith("in.yaml (document 3): VirtualServiceList") and "ignored" in n for n in notes), notes
    with pytest.raises(ConvertError, match=r"unknown kind 'VirtualServer'; did you mean VirtualService\?"):
        convert_istio_sources([("in.yaml", dump(DOC) + "---\napiVersion: networking.istio.io/v1\nkind: VirtualServer\n")])


def test_a_delegating_route_that_would_outrank_an_earlier_mirrored_one_is_left_out_of_the_sampler() -> None:
    """http[0] /api with a header, mirrored; http[1] /api/reviews delegates: in
    Gateway API precedence the longer prefix ranks first, so in the sampler's
    copy it would take /api/reviews requests with the header, which Istio
    gives http[0]. Left out of the copy, http[0] converts (it failed before)."""
    tenant = {**mirrored_route(), "match": [{"uri": {"prefix": "/api"}, "headers": {"x-tenant": {"exact": "acme"}}}]}
    delegating = {"match": [{"uri": {"prefix": "/api/reviews"}}], "delegate": {"name": "reviews", "namespace": "shop"}}
    rest = {"route": [{"destination": {"host": "app"}}]}
    root = virtual_service([tenant, delegating, rest], name="root", hosts=["shop.example.com"], gateways=["istio-system/gw"])
    conversion = convert_istio_sources([("root.yaml", dump(root))])
    assert any("http[1] delegates" in n and "would outrank an earlier mirrored route" in n for n in conversion.notes)
    policy, config_routes = sampler_policy(conversion)
    request = {":authority": b"shop.example.com", ":path": b"/api/reviews/1", ":method": b"GET", "x-tenant": b"acme"}
    mirrored = 0
    for key in KEYS[:100]:
        trace = Plan(policy).trace({**request, "x-request-id": key.encode()})
        assert trace.rule is not None and http_index(config_routes, trace.rule.id) == ("root", 0)
        mirrored += any(t.outcome is Outcome.MIRRORED for t in trace.targets)
    assert mirrored > 0
    (vs,) = docs(conversion.files["virtualservices.yaml"])
    assert vs["spec"]["http"][1]["headers"] == {"request": {"remove": list(SLOTS)}}
