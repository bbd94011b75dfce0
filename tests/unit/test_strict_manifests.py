"""Manifests as strict as the Kubernetes API server with the Gateway API CRDs
(v1.6.1, experimental channel): unknown fields, duplicate keys, near-miss
kinds and the CRD's rules are errors naming file, route, rule and field."""

from __future__ import annotations

import textwrap
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.config import schema
from extproc.config.build import build_policy
from extproc.config.errors import ConfigError
from extproc.config.manifests import ParseResult, Skipped, parse_manifests
from extproc.config.settings import Settings
from extproc.core.policy import Route
from extproc.core.sampling import Fraction
from tests.support.manifests import API, dump, httproute, mirror
from tests.support.paths import CONFORMANCE, EG_SEED, GEP_SEED, REPO
from tests.support.seeds import httproute_manifests, seed_text

SRC = "routes.yaml"
WHERE = f"{SRC} (document 1): HTTPRoute team-a/web"
MIRROR = "spec.rules[0].filters[0].requestMirror"
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def route(*rules: dict[str, Any], annotations: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return httproute(*(rules or [rule()]), annotations=annotations, **spec)


def rule(*filters: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"backendRefs": [{"name": "web", "port": 8080}], "filters": list(filters) or [mirror()], **fields}


def parse(*docs: dict[str, Any] | str) -> ParseResult:
    return parse_manifests(dump(*docs), SRC)


def problems(*docs: dict[str, Any] | str) -> list[str]:
    result = parse(*docs)
    assert all(isinstance(p, str) and p for p in result.problems)
    return result.problems


def only_problem(*docs: dict[str, Any] | str) -> str:
    found = problems(*docs)
    assert len(found) == 1, found
    return found[0]


def loaded(*docs: dict[str, Any] | str) -> list[Route]:
    result = parse(*docs)
    assert result.problems == [], result.problems
    return result.routes


# --------------------------------------------------------------------------
# The typos users hit: each one an error naming file, route, rule and field.


def test_misspelt_percent_is_an_unknown_field_not_a_100_percent_mirror() -> None:
    d = route(rule(mirror(percnt=10)))
    result = parse(d)
    assert result.routes == []
    assert result.problems == [f"{WHERE}: {MIRROR}.percnt: unknown field; did you mean percent?"]


def test_hostname_instead_of_hostnames() -> None:
    d = route(hostname=["a.example"])
    assert only_problem(d) == f"{WHERE}: spec.hostname: unknown field; did you mean hostnames?"


def test_typ_instead_of_type_in_a_path_match() -> None:
    d = route(rule(matches=[{"path": {"typ": "PathPrefix", "value": "/a"}}]))
    assert only_problem(d) == f"{WHERE}: spec.rules[0].matches[0].path.typ: unknown field; did you mean type?"


def test_percent_and_fraction_together_is_the_crd_error() -> None:
    d = route(rule(mirror(percent=10, fraction={"numerator": 1})))
    assert only_problem(d) == f"{WHERE}: {MIRROR}: Only one of percent or fraction may be specified in HTTPRequestMirrorFilter"


def test_a_null_percent_is_absent_as_for_the_api_server() -> None:
    (r,) = loaded(route(rule(mirror(percent=None, fraction={"numerator": 1}))))
    assert r.rules[0].mirrors[0].fraction == Fraction(1, 100)


@pytest.mark.parametrize("kind", ["HTTPRoutes", "HttpRoute", "HTTPRoue", "httproute", "HTTPRoute "])
@pytest.mark.parametrize("api", [API, "gateway.networking.k8s.io/v1beta1", "v1", "example.com/v1"])
def test_near_miss_of_httproute_is_an_error_in_any_api_version(kind: str, api: str) -> None:
    d = route()
    d["kind"], d["apiVersion"] = kind, api
    problem = only_problem(d)
    assert problem.startswith(f"{SRC} (document 1): kind: ")
    assert f"{kind!r}" in problem and "did you mean HTTPRoute?" in problem


def test_duplicate_key_is_an_error_with_both_lines() -> None:
    text = textwrap.dedent(f"""\
        apiVersion: {API}
        kind: HTTPRoute
        metadata:
          name: web
          namespace: team-a
        spec:
          rules:
          - backendRefs: [{{name: web, port: 8080}}]
            filters:
            - type: RequestMirror
              requestMirror:
                backendRef: {{name: shadow, port: 8080}}
                percent: 10
                percent: 90
        """)
    result = parse_manifests(text, SRC)
    assert result.routes == []
    assert result.problems == [f"{WHERE}: {MIRROR}.percent: duplicate key 'percent' at line 14 (first at line 13)"]


def test_duplicate_keys_at_top_level_and_in_skipped_documents() -> None:
    text = "apiVersion: v1\nkind: Service\nkind: Service\nmetadata: {name: a}\n---\n" + dump(route())
    found = parse_manifests(text, SRC).problems
    assert found == [f"{SRC} (document 1): kind: duplicate key 'kind' at line 3 (first at line 2)"]
    text = dump(route()).replace("metadata:\n", "metadata:\n  name: other\n", 1)
    (problem,) = parse_manifests(text, SRC).problems
    assert "metadata.name: duplicate key 'name' at line 5 (first at line 4)" in problem


def test_duplicate_keys_inside_flow_mappings_and_lists() -> None:
    text = dump(route()) + textwrap.dedent(f"""\
        ---
        apiVersion: {API}
        kind: HTTPRoute
        metadata: {{name: web2, namespace: team-a}}
        spec:
          rules:
          - backendRefs: [{{name: web, port: 8080}}, {{name: web, name: web3}}]
        """)
    line = text.splitlines().index("  - backendRefs: [{name: web, port: 8080}, {name: web, name: web3}]") + 1
    found = parse_manifests(text, SRC).problems
    assert found == [
        f"{SRC} (document 2): HTTPRoute team-a/web2: spec.rules[0].backendRefs[1].name: "
        f"duplicate key 'name' at line {line} (first at line {line})"
    ]


# --------------------------------------------------------------------------
# Unknown fields anywhere, known-and-ignored fields accepted.


def test_unknown_field_without_a_close_match_lists_the_known_ones() -> None:
    problem = only_problem(route(rule(mirror(fraction={"numerator": 1, "zzz": 2}))))
    assert problem == f"{WHERE}: {MIRROR}.fraction.zzz: unknown field (known: denominator, numerator)"


@pytest.mark.parametrize(
    ("where", "field", "guess"),
    [
        ("top", "metdata", "metadata"),
        ("top", "Spec", "spec"),
        ("metadata", "anotations", "annotations"),
        ("metadata", "lables", "labels"),
        ("spec", "rule", "rules"),
        ("spec", "parentRef", "parentRefs"),
        ("rule", "filter", "filters"),
        ("rule", "backendRef", "backendRefs"),
        ("rule", "match", "matches"),
        ("rule", "timeout", "timeouts"),
        ("mirror", "backendref", "backendRef"),
        ("mirror", "fractions", "fraction"),
        ("backendRef", "prot", "port"),
    ],
)
def test_did_you_mean(where: str, field: str, guess: str) -> None:
    d = route()
    target: dict[str, Any] = {
        "top": d,
        "metadata": d["metadata"],
        "spec": d["spec"],
        "rule": d["spec"]["rules"][0],
        "mirror": d["spec"]["rules"][0]["filters"][0]["requestMirror"],
        "backendRef": d["spec"]["rules"][0]["filters"][0]["requestMirror"]["backendRef"],
    }[where]
    target[field] = {}
    found = problems(d)
    assert any(
        f": {field}: unknown field; did you mean {guess}?" in p or f".{field}: unknown field; did you mean {guess}?" in p for p in found
    ), found


FULL_ROUTE = f"""\
apiVersion: {API}
kind: HTTPRoute
metadata:
  name: web
  namespace: team-a
  labels: {{app: web}}
  annotations: {{kubectl.kubernetes.io/last-applied-configuration: "{{}}", mirror-sampler.io/methods: GET}}
  uid: 0b7c9a9e-0000-4000-8000-000000000000
  resourceVersion: "12345"
  generation: 3
  creationTimestamp: "2024-06-01T05:00:00Z"
  finalizers: [example.com/keep]
  ownerReferences: [{{apiVersion: v1, kind: ConfigMap, name: owner, uid: x}}]
  managedFields: [{{manager: kubectl, operation: Apply, fieldsV1: {{f:spec: {{}}}}}}]
spec:
  parentRefs: [{{name: gw, namespace: infra, sectionName: http, port: 80, group: gateway.networking.k8s.io, kind: Gateway}}]
  hostnames: [web.example]
  rules:
  - name: main
    matches:
    - path: {{type: PathPrefix, value: /}}
      headers: [{{name: x-env, value: canary, type: Exact}}]
      queryParams: [{{name: q, value: "1"}}]
      method: GET
    filters:
    - type: RequestMirror
      requestMirror: {{backendRef: {{name: shadow, port: 8080, group: "", kind: Service, namespace: team-a}}, percent: 5}}
    - type: RequestHeaderModifier
      requestHeaderModifier: {{set: [{{name: x-a, value: "1"}}], add: [{{name: x-b, value: "2"}}], remove: [x-c]}}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {{set: [{{name: x-r, value: "1"}}]}}
    - type: URLRewrite
      urlRewrite: {{hostname: other.example, path: {{type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}}
    - type: ExtensionRef
      extensionRef: {{group: example.com, kind: Thing, name: t}}
    - type: CORS
      cors:
        allowOrigins: ["https://a.example"]
        allowMethods: [GET]
        allowHeaders: [x-a]
        exposeHeaders: [x-b]
        maxAge: 10
        allowCredentials: true
    - type: ExternalAuth
      externalAuth:
        protocol: HTTP
        backendRef: {{name: auth, port: 9000}}
        http: {{path: /check, allowedHeaders: [x-a]}}
        forwardBody: {{maxSize: 10}}
    backendRefs:
    - name: web
      port: 8080
      weight: 2
      group: ""
      kind: Service
      namespace: team-a
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {{add: [{{name: x-backend, value: web}}]}}
    timeouts: {{request: 10s, backendRequest: 5s}}
    retry: {{attempts: 2, backoff: 100ms, codes: [503]}}
    sessionPersistence: {{sessionName: s, type: Cookie, absoluteTimeout: 1h, cookieConfig: {{lifetimeType: Session}}}}
  - name: redirect
    matches: [{{path: {{type: Exact, value: /old}}}}]
    filters:
    - type: RequestRedirect
      requestRedirect:
        scheme: https
        hostname: new.example
        port: 443
        statusCode: 301
        path: {{type: ReplaceFullPath, replaceFullPath: /new}}
status:
  parents: [{{parentRef: {{name: gw}}, controllerName: example.com/c, conditions: [{{type: Accepted, status: "True"}}]}}]
"""


def test_every_known_field_is_accepted_and_the_ignored_ones_are_listed() -> None:
    result = parse_manifests(FULL_ROUTE, SRC)
    assert result.problems == []
    (r,) = result.routes
    assert [m.backend for m in r.rules[0].mirrors] == ["shadow"]
    ignored = {s.what: s.why for s in result.skipped}
    assert all(s.route == "team-a/web" and s.document == f"{SRC} (document 1)" for s in result.skipped)
    assert ignored == {
        "spec.parentRefs": "not used by the sampler (it decides for whatever Envoy asks about)",
        "spec.rules[0].filters[2].responseHeaderModifier": "ResponseHeaderModifier filter: not used by the sampler",
        "spec.rules[0].filters[3].urlRewrite": "URLRewrite filter: not used by the sampler",
        "spec.rules[0].filters[4].extensionRef": "ExtensionRef filter: not used by the sampler",
        "spec.rules[0].filters[5].cors": "CORS filter: not used by the sampler",
        "spec.rules[0].filters[6].externalAuth": "ExternalAuth filter: not used by the sampler",
        "spec.rules[0].backendRefs[0].filters": "a backendRef's filters: not used by the sampler",
        "spec.rules[0].timeouts": "not used by the sampler",
        "spec.rules[0].retry": "not used by the sampler",
        "spec.rules[0].sessionPersistence": "not used by the sampler",
        "spec.rules[1].filters[0].requestRedirect": "RequestRedirect filter: not used by the sampler",
    }


@pytest.mark.parametrize(
    ("old", "new", "path", "message"),
    [
        ("request: 10s", "requst: 10s", "spec.rules[0].timeouts.requst", "unknown field; did you mean request?"),
        ("timeouts: {request: 10s, backendRequest: 5s}", "timeouts: 10s", "spec.rules[0].timeouts", "must be a mapping, got str"),
        ("attempts: 2", "attempts: two", "spec.rules[0].retry.attempts", "must be an integer, got 'two'"),
        (
            "maxAge: 10\n",
            "maxAge: 10\n        maxAgeSeconds: 5\n",
            "spec.rules[0].filters[5].cors.maxAgeSeconds",
            "unknown field; did you mean maxAge?",
        ),
        (
            "extensionRef: {group: example.com, kind: Thing, name: t}",
            "extensionRef: {group: example.com, kind: Thing}",
            "spec.rules[0].filters[4].extensionRef.name",
            "is required",
        ),
        (
            "parentRefs: [{name: gw, namespace: infra, sectionName: http, ",
            "parentRefs: [{sectionNme: http, name: gw, namespace: infra, ",
            "spec.parentRefs[0].sectionNme",
            "unknown field; did you mean sectionName?",
        ),
        ("parentRefs: [{name: gw, ", "parentRefs: [{", "spec.parentRefs[0].name", "is required"),
        ("labels: {app: web}", "labels: {app: 5}", "metadata.labels.app", "must be a string, got 5"),
        ("uid: 0b7c", "uuid: 0b7c", "metadata.uuid", "unknown field; did you mean uid?"),
        (
            "replaceFullPath: /new",
            "replaceFullPth: /new",
            "spec.rules[1].filters[0].requestRedirect.path.replaceFullPth",
            "unknown field; did you mean replaceFullPath?",
        ),
        (
            "add: [{name: x-backend",
            "ad: [{name: x-backend",
            "spec.rules[0].backendRefs[0].filters[0].requestHeaderModifier.ad",
            "unknown field; did you mean add?",
        ),
    ],
)
def test_ignored_fields_are_still_checked(old: str, new: str, path: str, message: str) -> None:
    assert old in FULL_ROUTE
    found = parse_manifests(FULL_ROUTE.replace(old, new, 1), SRC).problems
    assert found == [f"{WHERE}: {path}: {message}"]


def test_status_is_ignored_whatever_it_holds() -> None:
    d = route()
    d["status"] = {"anything": [1, {"goes": None}]}
    assert len(loaded(d)) == 1


# --------------------------------------------------------------------------
# The CRD's rules on the fields the sampler reads.


@pytest.mark.parametrize(
    ("build", "path", "limit"),
    [
        (lambda: route(hostnames=[f"h{i}.example" for i in range(17)]), "spec.hostnames", 16),
        (lambda: route(*[rule() for _ in range(17)]), "spec.rules", 16),
        (lambda: route(rule(matches=[{"path": {"value": f"/{i}"}} for i in range(65)])), "spec.rules[0].matches", 64),
        (lambda: route(rule(*[mirror(f"m{i}") for i in range(17)])), "spec.rules[0].filters", 16),
        (lambda: route({"backendRefs": [{"name": f"b{i}"} for i in range(17)]}), "spec.rules[0].backendRefs", 16),
        (
            lambda: route(rule(matches=[{"headers": [{"name": f"x-{i}", "value": "v"} for i in range(17)]}])),
            "spec.rules[0].matches[0].headers",
            16,
        ),
        (
            lambda: route(rule(matches=[{"queryParams": [{"name": f"q{i}", "value": "v"} for i in range(17)]}])),
            "spec.rules[0].matches[0].queryParams",
            16,
        ),
    ],
)
def test_list_size_limits_are_the_crds_max_items(build: Any, path: str, limit: int) -> None:
    found = problems(build())
    assert f"{WHERE}: {path}: must have at most {limit} items, got {limit + 1}" in found, found


def test_lists_at_the_limit_are_fine() -> None:
    d = route(
        *[rule(matches=[{"path": {"value": f"/{i}/{j}"}} for j in range(7)]) for i in range(16)],
        hostnames=[f"h{i}.example" for i in range(16)],
    )
    assert len(loaded(d)[0].rules) == 16


def test_128_matches_in_a_route_are_fine() -> None:
    """The CRD's rule is ``sum of matches.size() <= 128`` (its message says
    "less than 128"): exactly 128 passes the API server, so it passes here."""
    d = route(*[rule(matches=[{"path": {"value": f"/{i}/{j}"}} for j in range(8)]) for i in range(16)])
    assert schema.route_match_count(d["spec"]["rules"]) == 128
    assert len(loaded(d)[0].rules) == 16


def test_at_most_128_matches_in_a_route() -> None:
    rules = [rule(matches=[{"path": {"value": f"/{i}/{j}"}} for j in range(8)]) for i in range(15)]
    rules.append(rule(matches=[{"path": {"value": f"/15/{j}"}} for j in range(9)]))
    problem = only_problem(route(*rules))
    assert problem.startswith(f"{WHERE}: spec.rules: While 16 rules and 64 matches per rule are allowed")
    assert "got 129" in problem


def test_a_rule_without_matches_counts_its_default_match() -> None:
    """After defaulting, a rule without ``matches`` has one (PathPrefix /)."""
    rules = [rule(matches=[{"path": {"value": f"/{i}/{j}"}} for j in range(8)]) for i in range(14)]
    rules.append(rule(matches=[{"path": {"value": f"/14/{j}"}} for j in range(16)]))
    rules.append(rule())
    problem = only_problem(route(*rules))
    assert problem.startswith(f"{WHERE}: spec.rules: While 16 rules and 64 matches per rule are allowed")
    assert "got 129" in problem
    assert schema.route_match_count([*rules[:-1], rule(matches=[])]) == 128


def test_rules_may_not_be_an_empty_list() -> None:
    d = route()
    d["spec"]["rules"] = []
    assert only_problem(d) == f"{WHERE}: spec.rules: must have at least 1 item(s), got 0"


def test_rule_names_are_unique() -> None:
    problem = only_problem(route(rule(name="a"), rule(name="a")))
    assert problem == f"{WHERE}: spec.rules[1].name: Rule name must be unique within the route"


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("/a//b", "'//'"),
        ("/a/./b", "'/./'"),
        ("/a/../b", "'/../'"),
        ("/a%2fb", "'%2f'"),
        ("/a%2Fb", "'%2F'"),
        ("/a/..", "'/..'"),
        ("/a/.", "'/.'"),
        ("/" + "a" * 1024, "at most 1024"),
        ("api", "starting with '/'"),
    ],
)
@pytest.mark.parametrize("ptype", ["Exact", "PathPrefix"])
def test_path_values_follow_the_crd(ptype: str, value: str, words: str) -> None:
    problem = only_problem(route(rule(matches=[{"path": {"type": ptype, "value": value}}])))
    assert problem.startswith(f"{WHERE}: spec.rules[0].matches[0].path.value: "), problem
    assert words in problem


def test_regex_paths_are_not_held_to_the_prefix_rules() -> None:
    (r,) = loaded(route(rule(matches=[{"path": {"type": "RegularExpression", "value": "/a/.*//b"}}])))
    assert r.rules[0].matches[0].path.value == "/a/.*//b"


@pytest.mark.parametrize(
    ("match", "path", "words"),
    [
        ({"headers": [{"name": "x a", "value": "v"}]}, "headers[0].name", "not a valid header name"),
        ({"headers": [{"name": "x" * 257, "value": "v"}]}, "headers[0].name", "not a valid header name"),
        ({"queryParams": [{"name": "q a", "value": "v"}]}, "queryParams[0].name", "not a valid query parameter name"),
        ({"headers": [{"name": "x", "value": " v"}]}, "headers[0].value", "blanks"),
        ({"headers": [{"name": "x", "value": "a  b"}]}, "headers[0].value", "blanks"),
        ({"headers": [{"name": "x", "value": ""}]}, "headers[0].value", "1..4096"),
        ({"queryParams": [{"name": "q", "value": ""}]}, "queryParams[0].value", "1..1024"),
        ({"headers": [{"name": "x", "value": "1"}, {"name": "x", "value": "2"}]}, "headers[1].name", "keyed by name"),
        ({"queryParams": [{"name": "q", "value": "1"}, {"name": "q", "value": "2"}]}, "queryParams[1].name", "keyed by name"),
    ],
)
def test_header_and_query_matches_follow_the_crd(match: dict[str, Any], path: str, words: str) -> None:
    problem = only_problem(route(rule(matches=[match])))
    assert problem.startswith(f"{WHERE}: spec.rules[0].matches[0].{path}: "), problem
    assert words in problem


def test_header_names_differing_in_case_are_equivalent_not_duplicates() -> None:
    (r,) = loaded(route(rule(matches=[{"headers": [{"name": "X-A", "value": "1"}, {"name": "x-a", "value": "2"}]}])))
    assert [(h.name, h.value) for h in r.rules[0].matches[0].headers] == [("x-a", "1")]


@pytest.mark.parametrize(
    ("filters", "path", "message"),
    [
        (
            [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "s"}}, "requestRedirect": {}}],
            "filters[0].requestRedirect",
            "must not be set on a RequestMirror filter (filter.requestRedirect must be nil if the filter.type is not RequestRedirect)",
        ),
        ([{"type": "URLRewrite"}], "filters[0].urlRewrite", "is required (filter.urlRewrite must be specified for URLRewrite filter.type)"),
        (
            [{"type": "RequestMiror", "requestMirror": {"backendRef": {"name": "s"}}}],
            "filters[0].type",
            "unknown filter type 'RequestMiror'; did you mean RequestMirror?",
        ),
        ([{"requestMirror": {"backendRef": {"name": "s"}}}], "filters[0].type", "is required"),
        ([{"type": "CORS", "cors": {}}, {"type": "CORS", "cors": {}}], "filters[1].type", "CORS filter cannot be repeated"),
        (
            [{"type": "RequestHeaderModifier", "requestHeaderModifier": {}} for _ in range(2)],
            "filters[1].type",
            "RequestHeaderModifier filter cannot be repeated",
        ),
        (
            [{"type": "RequestRedirect", "requestRedirect": {}}, {"type": "URLRewrite", "urlRewrite": {}}],
            "filters",
            "May specify either httpRouteFilterRequestRedirect or httpRouteFilterRequestRewrite, but not both",
        ),
        (
            [{"type": "RequestMirror"}],
            "filters[0].requestMirror",
            "is required (filter.requestMirror must be specified for RequestMirror filter.type)",
        ),
        ([{"type": "RequestMirror", "requestMirror": {"percent": 5}}], "filters[0].requestMirror.backendRef", "is required"),
        ([mirror(fraction={"denominator": 10})], "filters[0].requestMirror.fraction.numerator", "is required"),
    ],
)
def test_filter_rules_of_the_crd(filters: list[dict[str, Any]], path: str, message: str) -> None:
    d = route({"backendRefs": [{"name": "web"}], "filters": filters})
    problem = only_problem(d)
    assert problem.startswith(f"{WHERE}: spec.rules[0].{path}: "), problem
    assert message in problem


def test_backend_ref_filters_follow_the_same_rules() -> None:
    d = route({"backendRefs": [{"name": "web", "filters": [{"type": "RequestHeaderModifier", "urlRewrite": {}}]}]})
    found = problems(d)
    required = "is required (filter.requestHeaderModifier must be specified for RequestHeaderModifier filter.type)"
    assert f"{WHERE}: spec.rules[0].backendRefs[0].filters[0].requestHeaderModifier: {required}" in found
    assert any(p.startswith(f"{WHERE}: spec.rules[0].backendRefs[0].filters[0].urlRewrite: must not be set") for p in found)


def test_several_mirrors_in_one_rule_are_not_a_repeat() -> None:
    (r,) = loaded(route(rule(mirror("a"), mirror("b"))))
    assert [m.backend for m in r.rules[0].mirrors] == ["a", "b"]


# --------------------------------------------------------------------------
# Kinds: which documents are errors, which are skipped (and listed).


@pytest.mark.parametrize("kind", ["HTTPRoutes", "Gatway", "HTTPRouteList", "Foo"])
def test_unknown_kind_of_the_gateway_api_group_is_an_error(kind: str) -> None:
    problem = only_problem({"apiVersion": API, "kind": kind, "metadata": {"name": "x"}}, route())
    assert problem.startswith(f"{SRC} (document 1): kind: {kind!r} is not a kind of gateway.networking.k8s.io; ")


def test_well_known_kinds_are_skipped_and_listed() -> None:
    others: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "shadow"}, "spec": {"ports": [{"port": 80}]}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}},
        {"apiVersion": API, "kind": "Gateway", "metadata": {"name": "gw"}, "spec": {"listeners": []}},
        {"apiVersion": API, "kind": "GatewayClass", "metadata": {"name": "gc"}},
        {"apiVersion": API, "kind": "GRPCRoute", "metadata": {"name": "g"}, "spec": {"rules": "not even valid"}},
        {"apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant", "metadata": {"name": "rg"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"a": "b"}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}},
        {"apiVersion": "example.com/v1", "kind": "Widget"},
    ]
    result = parse(others[0], route(), *others[1:])
    assert result.problems == [] and [r.id for r in result.routes] == ["team-a/web"]
    docs = [s for s in result.skipped if s.route is None]
    assert [(s.document, s.what) for s in docs] == [
        (f"{SRC} (document 1)", "Service shadow"),
        (f"{SRC} (document 3)", "Deployment d"),
        (f"{SRC} (document 4)", "Gateway gw"),
        (f"{SRC} (document 5)", "GatewayClass gc"),
        (f"{SRC} (document 6)", "GRPCRoute g"),
        (f"{SRC} (document 7)", "ReferenceGrant rg"),
        (f"{SRC} (document 8)", "ConfigMap cm"),
        (f"{SRC} (document 9)", "Namespace team-a"),
        (f"{SRC} (document 10)", "Widget"),
    ]
    assert all("not an HTTPRoute" in s.why for s in docs)


@pytest.mark.parametrize("kind", [None, "", 5])
def test_a_document_without_a_kind_is_an_error(kind: Any) -> None:
    d: dict[str, Any] = {"apiVersion": API, "metadata": {"name": "x"}}
    if kind is not None:
        d["kind"] = kind
    problem = only_problem(d, route())
    assert problem.startswith(f"{SRC} (document 1): kind: is required")


def test_skipped_documents_still_need_sound_yaml_but_not_our_schema() -> None:
    # A Service's own fields are its business; only YAML-level mistakes are ours.
    text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {anything: [1]}\n---\n" + dump(route())
    assert parse_manifests(text, SRC).problems == []


# --------------------------------------------------------------------------
# The MirrorSampler document and the sampler's annotations.

SWITCH = {"apiVersion": "mirror-sampler.io/v1alpha1", "kind": "MirrorSampler", "spec": {"mirroring": "Disabled"}}


def test_mirror_sampler_document_still_switches_mirroring_off() -> None:
    result = parse(route(), {**SWITCH, "metadata": {"name": "switch", "labels": {"a": "b"}}})
    assert result.problems == [] and result.enabled is False


@pytest.mark.parametrize(
    ("change", "path", "message"),
    [
        ({"spec": {"mirroring": "Disabled", "mirorring": "x"}}, "spec.mirorring", "unknown field; did you mean mirroring?"),
        ({"sepc": {}}, "sepc", "unknown field; did you mean spec?"),
        ({"metadata": {"nme": "x"}}, "metadata.nme", "unknown field; did you mean name?"),
        (
            {"metadata": {"annotations": {"mirror-sampler.io/methods": "GET"}}},
            "metadata.annotations.mirror-sampler.io/methods",
            "unknown mirror-sampler.io annotation; known: none on this kind",
        ),
        ({"spec": {"mirroring": "Off"}}, "spec.mirroring", "must be Enabled or Disabled"),
    ],
)
def test_mirror_sampler_strictness(change: dict[str, Any], path: str, message: str) -> None:
    found = problems(route(), {**SWITCH, **change})
    assert any(p.startswith(f"{SRC} (document 2): {path}: {message}") for p in found), found
    assert parse(route(), {**SWITCH, **change}).enabled is True  # an invalid switch is not obeyed


@pytest.mark.parametrize(
    ("kind", "api"), [("MirrorSamplers", "mirror-sampler.io/v1alpha1"), ("Mirrorsampler", "v1"), ("MirrorSampler", "mirror-sampler.io/v1")]
)
def test_mirror_sampler_kind_and_version_mistakes(kind: str, api: str) -> None:
    problem = only_problem(route(), {**SWITCH, "kind": kind, "apiVersion": api})
    assert problem.startswith(f"{SRC} (document 2): ")
    assert "MirrorSampler" in problem


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        (
            {"mirror-sampler.io/methds": "GET"},
            "mirror-sampler.io/methds: unknown mirror-sampler.io annotation; did you mean mirror-sampler.io/methods?",
        ),
        (
            {"mirror-sampler.io/max-mirrors-per-sec": "5"},
            "mirror-sampler.io/max-mirrors-per-sec: unknown mirror-sampler.io annotation; "
            "did you mean mirror-sampler.io/max-mirrors-per-second?",
        ),
        (
            {"mirror-sampler.io/target-salt": "shadow=a"},
            "mirror-sampler.io/target-salt: unknown mirror-sampler.io annotation; did you mean mirror-sampler.io/target-salts?",
        ),
        ({"mirror-sampler.io/max-mirrors-per-second": 5}, "mirror-sampler.io/max-mirrors-per-second: must be a string"),
    ],
)
def test_annotation_strictness(annotations: dict[str, Any], message: str) -> None:
    problem = only_problem(route(annotations=annotations))
    assert problem.startswith(f"{WHERE}: metadata.annotations.{message}"), problem


def test_other_annotations_are_left_alone() -> None:
    assert loaded(route(annotations={"example.com/x": "1", "mirror-sampler.example/y": "2", "kubectl.kubernetes.io/restartedAt": "now"}))


# --------------------------------------------------------------------------
# mirror-sampler.io/target-salts.

SALTS = "mirror-sampler.io/target-salts"


def test_target_salts_set_the_salt_of_every_target_of_that_backend() -> None:
    d = route(rule(mirror("a"), mirror("b")), rule(mirror("a", percent=5)), annotations={SALTS: "a=v2, b = other salt "})
    (r,) = loaded(d)
    assert [(m.backend, m.salt) for rule_ in r.rules for m in rule_.mirrors] == [("a", b"v2"), ("b", b"other salt"), ("a", b"v2")]


def test_without_target_salts_targets_share_the_policy_salt() -> None:
    (r,) = loaded(route(rule(mirror("a"), mirror("b"))))
    assert [m.salt for m in r.rules[0].mirrors] == [None, None]


def test_a_salt_for_one_backend_leaves_the_others_nested() -> None:
    (r,) = loaded(route(rule(mirror("a"), mirror("b")), annotations={SALTS: "b=x=y"}))
    assert [m.salt for m in r.rules[0].mirrors] == [None, b"x=y"]


def test_target_salts_reach_the_policy() -> None:
    text = dump(route(rule(mirror("a")), annotations={SALTS: "a=ü"}))
    policy = build_policy(Settings.load({"MIRROR_CONFIG": SRC}), text)
    assert policy.rules[0].mirrors[0].salt == "ü".encode()


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("shadw=v2", "'shadw' is not the backendRef of a RequestMirror filter in this route; did you mean shadow?"),
        ("web=v2", "'web' is not the backendRef of a RequestMirror filter in this route"),
        ("zzz=v2", "mirrored backends: shadow"),
        ("shadow", "must be a comma-separated list of BACKEND=SALT"),
        ("shadow=", "must be a comma-separated list of BACKEND=SALT"),
        ("=v2", "must be a comma-separated list of BACKEND=SALT"),
        ("", "must be a comma-separated list of BACKEND=SALT"),
        ("shadow=a,", "must be a comma-separated list of BACKEND=SALT"),
        ("shadow=a,shadow=b", "names backend 'shadow' twice"),
    ],
)
def test_target_salts_problems_name_the_annotation(value: str, words: str) -> None:
    problem = only_problem(route(annotations={SALTS: value}))
    assert problem.startswith(f"{WHERE}: metadata.annotations.{SALTS}: "), problem
    assert words in problem


# --------------------------------------------------------------------------
# What must still load: the seeds, the conformance route, the bundled example.


def test_the_contract_manifests_load_without_problems_or_surprises() -> None:
    texts = [
        (str(CONFORMANCE), CONFORMANCE.read_text(encoding="utf-8")),
        ("http-mirror.yaml", (REPO / "extproc" / "data" / "http-mirror.yaml").read_text()),
    ]
    texts += [(EG_SEED, t) for t in httproute_manifests(seed_text(EG_SEED))]
    texts += [(GEP_SEED, t) for t in httproute_manifests(seed_text(GEP_SEED))]
    for source, text in texts:
        result = parse_manifests(text, source)
        assert result.problems == [] and len(result.routes) == 1, (source, result.problems)
        assert all(s.route is not None for s in result.skipped)


def test_other_kinds_are_skipped_with_a_reason() -> None:
    text = dump(route(), {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}}, SWITCH)
    detailed = parse_manifests(text, SRC)
    assert len(detailed.routes) == 1 and detailed.problems == [] and not detailed.enabled
    assert detailed.skipped == [
        Skipped(f"{SRC} (document 2)", None, "Service s", "not an HTTPRoute: the sampler reads HTTPRoute and MirrorSampler documents")
    ]


def test_build_policy_refuses_a_typo() -> None:
    with pytest.raises(ConfigError) as e:
        build_policy(Settings.load({"MIRROR_CONFIG": SRC}), dump(route(rule(mirror(percnt=10)))))
    assert e.value.problems == [f"{WHERE}: {MIRROR}.percnt: unknown field; did you mean percent?"]


# --------------------------------------------------------------------------
# Properties.


def _mirror_node() -> schema.Node:
    rules = schema.HTTPROUTE.fields["spec"].fields["rules"].items
    assert rules is not None
    filters = rules.fields["filters"].items
    assert filters is not None
    return filters.fields["requestMirror"]


KNOWN_MIRROR_FIELDS = sorted(_mirror_node().fields)


@FAST
@given(field=st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=12))
def test_any_unknown_mirror_field_is_named(field: str) -> None:
    m = mirror()
    m["requestMirror"][field] = 1
    d = route(rule(m))
    found = problems(d)
    if field in KNOWN_MIRROR_FIELDS:
        return
    assert any(p.startswith(f"{WHERE}: {MIRROR}.{field}: unknown field") for p in found), found


@FAST
@given(key=st.sampled_from(["percent", "name", "type", "value", "port"]), n=st.integers(min_value=2, max_value=4))
def test_any_repeated_key_is_reported_with_lines(key: str, n: int) -> None:
    lines = [f"{key}: {i}" for i in range(n)]
    text = "apiVersion: v1\nkind: Thing\nspec:\n" + "".join(f"  {line}\n" for line in lines)
    found = parse_manifests(text, SRC).problems
    assert found == [f"{SRC} (document 1): spec.{key}: duplicate key {key!r} at line {4 + i} (first at line 4)" for i in range(1, n)]


def test_did_you_mean_prefers_a_case_difference() -> None:
    assert schema.did_you_mean("Denominator", ["numerator", "denominator"]) == "denominator"
    assert schema.did_you_mean("xyz", ["numerator", "denominator"]) is None


# --------------------------------------------------------------------------
# Values the CRD's patterns refuse that a "$"-anchored Python regex lets through.


@pytest.mark.parametrize(
    ("build", "path"),
    [
        (lambda: route(rule(matches=[{"headers": [{"name": "x-a\n", "value": "v"}]}])), "spec.rules[0].matches[0].headers[0].name"),
        (lambda: route(rule(matches=[{"headers": [{"name": "x-a", "value": "v\n"}]}])), "spec.rules[0].matches[0].headers[0].value"),
        (lambda: route(hostnames=["a.example\n"]), "spec.hostnames[0]"),
        (lambda: route(rule(mirror("shadow\n"))), f"{MIRROR}.backendRef.name"),
    ],
)
def test_a_trailing_newline_is_refused(build: Any, path: str) -> None:
    problem = only_problem(build())
    assert problem.startswith(f"{WHERE}: {path}: "), problem


def test_a_long_bad_header_value_is_refused_quickly() -> None:
    """The CRD's pattern, as written, backtracks exponentially in Python's engine."""
    start = time.perf_counter()
    problem = only_problem(route(rule(matches=[{"headers": [{"name": "x", "value": "a" * 4000 + "\x01"}]}])))
    assert time.perf_counter() - start < 1.0
    assert "spec.rules[0].matches[0].headers[0].value" in problem
