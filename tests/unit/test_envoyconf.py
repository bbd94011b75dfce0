"""`mirror-sampler envoy-config`: fresh, accepted by the real Envoy, and shaped
as docs/DESIGN.md's route-selected mirroring says.

Every configuration is rendered once per module through the CLI; the Envoy
validations of all of them run side by side in one batch (each `envoy --mode
validate` is a separate process, about a second of CPU each).
"""

from __future__ import annotations

import copy
import fcntl
import itertools
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

import extproc.envoy.render as envoyconf
from extproc import cli
from extproc.config.settings import Settings
from extproc.config.source import load_policy
from extproc.core.matching import Match, PathMatch, PathType, ValueMatch, ValueType
from extproc.core.policy import SAMPLER_CLUSTER, Policy, Rule
from tests.support.harness import static_cluster
from tests.support.paths import CONFORMANCE, REPO

DEFAULT_CONFIG = "extproc/data/http-mirror.yaml"  # as the Makefile names it
COMPOSE_ENVOY = REPO / "envoy" / "envoy.yaml"
ROUTER = "envoy.filters.http.router"
HCM = "envoy.filters.network.http_connection_manager"

# Every match kind, wildcard hostnames, weights, header modifiers and three
# mirrors in one rule (MIRROR_SLOTS=3). Rules are listed out of precedence
# order on purpose: the generated routes must come out sorted.
ROUTES = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: shop
  namespace: prod
spec:
  hostnames: ["shop.example.com", "*.example.com"]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /api}
    - path: {type: PathPrefix, value: /api/v1/}
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow-a, port: 8081}, percent: 50}
    backendRefs:
    - {name: shop-v1, port: 8080}
  - matches:
    - path: {type: RegularExpression, value: "/items/[0-9]+"}
    backendRefs:
    - {name: shop-v1, port: 8080}
  - matches:
    - path: {type: Exact, value: /checkout}
      method: POST
      headers:
      - {name: X-Tenant, value: acme}
      - {name: x-version, type: RegularExpression, value: "v[0-9]+"}
      queryParams:
      - {name: debug, value: "1"}
      - {name: lang, type: RegularExpression, value: "en|fr"}
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Set, value: set-value}]
        add: [{name: X-Add, value: add-value}]
        remove: [X-Remove]
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow-a, port: 8081}, percent: 10}
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow-b, port: 8082}, fraction: {numerator: 5, denominator: 1000}}
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow-c, port: 8083}}
    backendRefs:
    - {name: shop-v1, port: 8080, weight: 90}
    - {name: shop-v2, port: 8080, weight: 10}
  - matches:
    - path: {type: PathPrefix, value: /static}
    backendRefs:
    - {name: shop-v2, port: 8080}
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata:
  name: api
  namespace: prod
spec:
  hostnames: ["api.example.com"]
  rules:
  - filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow-b, port: 8082}, percent: 25}
    backendRefs:
    - {name: api, port: 9000}
  - matches:
    - path: {type: Exact, value: /healthz}
      headers:
      - {name: x-probe, type: RegularExpression, value: "k8s|lb"}
      queryParams:
      - {name: verbose, value: "true"}
    backendRefs:
    - {name: api, port: 9000}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: fallback
spec:
  rules:
  - filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow-a, port: 8081}, percent: 1}
    backendRefs:
    - {name: shop-v1, port: 8080}
"""

# Configurations `check-config` accepts that Envoy must accept too.
MIRROR_WITHOUT_BACKEND = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mirror-only}
spec:
  rules:
  - filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 8081}, percent: 10}
  - matches:
    - path: {type: PathPrefix, value: /drained}
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 8081}, percent: 10}
    backendRefs:
    - {name: primary, port: 8080, weight: 0}
"""

HOST_HEADER_MODIFIER = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: host-rewrite}
spec:
  rules:
  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: Host, value: internal.example}]
    backendRefs:
    - {name: primary, port: 8080}
"""


@dataclass(frozen=True)
class Case:
    name: str
    config: str | None  # path relative to the repository, or a key of INLINE
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ("--for", "local")
    message_timeout_ms: int = 200


# spec.compare on two of ROUTES' rules: all of one's mirrors, two of the other's three.
COMPARE = """\
apiVersion: mirror-sampler.io/v1alpha1
kind: MirrorSampler
metadata: {name: shop}
spec:
  compare:
    rules:
    - {rule: prod/shop/0}
    - {rule: prod/shop/2, targets: [shadow-a, shadow-c], secondary: shadow-c}
---
"""

INLINE = {
    "routes": ROUTES,
    "mirror-without-backend": MIRROR_WITHOUT_BACKEND,
    "host-header-modifier": HOST_HEADER_MODIFIER,
    "compare": COMPARE + ROUTES,
}

CASES = {
    c.name: c
    for c in (
        Case("default-local", DEFAULT_CONFIG),
        Case("default-compose", DEFAULT_CONFIG, args=("--for", "compose")),
        Case("conformance", str(CONFORMANCE.relative_to(REPO))),
        Case("simple", None, {"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "5"}),
        Case("routes", "routes", {"MIRROR_SLOTS": "3"}, ("--for", "local", "--message-timeout-ms", "150"), 150),
        Case("snippet", "routes", {"MIRROR_SLOTS": "3"}, ("--snippet", "--message-timeout-ms", "150"), 150),
        # Every rule names a hostname: no '*' host of its own to clash with the user's.
        Case("snippet-default", DEFAULT_CONFIG, args=("--snippet",)),
        Case("mirror-without-backend", "mirror-without-backend"),
        Case("host-header-modifier", "host-header-modifier"),
        Case("inline-routes", "routes", {"MIRROR_SLOTS": "3"}, ("--for", "local", "--inline")),
        Case("inline-compose", DEFAULT_CONFIG, args=("--for", "compose", "--inline")),
        Case("inline-snippet", "routes", {"MIRROR_SLOTS": "3"}, ("--snippet", "--inline")),
        # spec.compare: the capture points with every engine, whole, as a snippet, for compose.
        Case("compare-local", "compare", {"MIRROR_SLOTS": "3"}),
        Case("compare-inline", "compare", {"MIRROR_SLOTS": "3"}, ("--for", "local", "--inline", "lua")),
        Case("compare-module", "compare", {"MIRROR_SLOTS": "3"}, ("--for", "local", "--inline", "module")),
        Case("compare-compose", "compare", {"MIRROR_SLOTS": "3"}, ("--for", "compose")),
        Case("compare-module-compose", "compare", {"MIRROR_SLOTS": "3"}, ("--for", "compose", "--inline", "module")),
        Case("compare-snippet", "compare", {"MIRROR_SLOTS": "3"}, ("--snippet", "--observer", "10.0.0.7:50061")),
        Case("compare-inline-snippet", "compare", {"MIRROR_SLOTS": "3"}, ("--snippet", "--inline")),
        Case("compare-module-snippet", "compare", {"MIRROR_SLOTS": "3"}, ("--snippet", "--inline", "module")),
    )
}
SNIPPET_CASES = ("snippet", "snippet-default", "inline-snippet", "compare-snippet", "compare-inline-snippet", "compare-module-snippet")
# Whole bootstraps whose structure the tests below check.
STRUCTURE_CASES = ["default-local", "default-compose", "conformance", "simple", "routes"]


@dataclass
class Rendered:
    case: Case
    path: Path | None = None
    policy: Policy | None = None
    error: str = ""

    @property
    def text(self) -> str:
        assert self.path is not None, self.error
        return self.path.read_text(encoding="utf-8")

    parsed: Any = field(default=None, repr=False)

    @property
    def data(self) -> Any:
        """The rendering as snake_case data, parsed once; a copy each time (tests edit it)."""
        if self.parsed is None:
            self.parsed = snake(yaml.safe_load(self.text))
        return copy.deepcopy(self.parsed)


def _clean_environ(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIRROR_")}
    env.update(extra)
    return env


def render_cli(argv: list[str], env: dict[str, str]) -> int:
    """cli.main in the repository root with only ``env``'s MIRROR_* settings."""
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        with mock.patch.dict(os.environ, _clean_environ(env), clear=True):
            return cli.main(argv)
    finally:
        os.chdir(cwd)


def _policy(config: Path | None, env: dict[str, str]) -> Policy:
    return load_policy(Settings.load({**env, **({"MIRROR_CONFIG": str(config)} if config else {})}))


def _renderings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every case rendered through the CLI once per test run, into files: the
    first module to need them (this one or
    tests/service/test_envoyconf_validate.py, maybe on another xdist worker)
    renders, the other reads (a rendering is up to two seconds of CPU)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, shared by its workers (fresh per run)
    folder = root / "envoyconf-renderings"
    with open(root / "envoyconf-renderings.lock", "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "errors.json").exists():
            return folder
        folder.mkdir(exist_ok=True)
        errors: dict[str, str] = {}
        for name, case in CASES.items():
            config = _config_path(case, folder)
            argv = ["envoy-config", *case.args, *(["--config", str(config)] if config else []), "-o", str(folder / f"envoy-{name}.yaml")]
            try:
                rc = render_cli(argv, case.env)
            except Exception as e:  # reported by the tests that need this rendering
                errors[name] = f"{type(e).__name__}: {e}"
                continue
            if rc != 0:
                errors[name] = f"mirror-sampler {' '.join(argv)} exited {rc}"
        # Written last: its presence says the folder is complete.
        (folder / "errors.json").write_text(json.dumps(errors), encoding="utf-8")
    return folder


def _config_path(case: Case, folder: Path) -> Path | None:
    if case.config in INLINE:
        config = folder / f"manifest-{case.config}.yaml"
        if not config.exists():
            config.write_text(INLINE[case.config], encoding="utf-8")
        return config
    return None if case.config is None else REPO / case.config


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rendered]:
    folder = _renderings(tmp_path_factory)
    errors = json.loads((folder / "errors.json").read_text(encoding="utf-8"))
    out: dict[str, Rendered] = {}
    for name, case in CASES.items():
        r = out[name] = Rendered(case)
        try:
            r.policy = _policy(_config_path(case, folder), case.env)
        except Exception as e:  # reported by the tests that need this rendering
            r.error = f"{type(e).__name__}: {e}"
            continue
        if name in errors:
            r.error = errors[name]
            continue
        r.path = folder / f"envoy-{name}.yaml"
    return out


# --------------------------------------------------------------------------
# Helpers: the rendered YAML as snake_case data.

_CAMEL = re.compile(r"^[a-z][a-zA-Z0-9]*$")


def snake(value: Any) -> Any:
    """Protobuf JSON field names (camelCase) as proto names; map keys with dots
    (filter names, extension types) and '@type' stay as they are."""
    if isinstance(value, dict):
        return {(re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), k) if _CAMEL.match(k) else k): snake(v) for k, v in value.items()}
    if isinstance(value, list):
        return [snake(v) for v in value]
    return value


def hcm_of(bootstrap: dict[str, Any]) -> dict[str, Any]:
    (listener,) = bootstrap["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    assert hcm["name"] == HCM
    config: dict[str, Any] = hcm["typed_config"]
    return config


def clusters_of(bootstrap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}


def endpoint_of(cluster: dict[str, Any]) -> tuple[str, int]:
    (locality,) = cluster["load_assignment"]["endpoints"]
    (lb,) = locality["lb_endpoints"]
    sock = lb["endpoint"]["address"]["socket_address"]
    return sock["address"], sock["port_value"]


def is_variant(r: dict[str, Any]) -> bool:
    return bool(r.get("route", {}).get("request_mirror_policies"))


def canon(items: list[Any]) -> list[str]:
    return sorted(json.dumps(i, sort_keys=True) for i in items)


def _string_matcher(kind: ValueType | PathType, value: str) -> dict[str, Any]:
    if kind in (ValueType.REGEX, PathType.REGEX):
        return {"safe_regex": {"regex": value}}
    return {"exact": value}


def expected_match(match: Match) -> dict[str, Any]:
    """Gateway API match -> Envoy RouteMatch, written out independently."""
    out: dict[str, Any] = {}
    if match.path.type is PathType.EXACT:
        out["path"] = match.path.value
    elif match.path.type is PathType.REGEX:
        out["safe_regex"] = {"regex": match.path.value}
    elif match.path.value.rstrip("/") == "":
        out["prefix"] = "/"
    else:
        out["path_separated_prefix"] = match.path.value.rstrip("/")
    headers = [{"name": h.name, "string_match": _string_matcher(h.type, h.value)} for h in match.headers]
    if match.method:
        headers.append({"name": ":method", "string_match": {"exact": match.method}})
    if headers:
        out["headers"] = headers
    query = [{"name": q.name, "string_match": _string_matcher(q.type, q.value)} for q in match.query_params]
    if query:
        out["query_parameters"] = query
    return out


def normalized_match(m: dict[str, Any], drop_headers: tuple[str, ...] = ()) -> dict[str, Any]:
    out = {k: v for k, v in m.items() if k not in ("headers", "query_parameters")}
    headers = [h for h in m.get("headers", []) if h["name"] not in drop_headers]
    if headers:
        out["headers"] = canon(headers)
    if m.get("query_parameters"):
        out["query_parameters"] = canon(m["query_parameters"])
    return out


def path_precedence(m: dict[str, Any]) -> tuple[int, int]:
    """Exact, then regular expression, then prefix; longer first."""
    if "path" in m:
        return (3, len(m["path"]))
    if "safe_regex" in m:
        return (2, len(m["safe_regex"]["regex"]))
    prefix = m.get("path_separated_prefix", m.get("prefix"))
    assert prefix is not None, f"unknown path match {m}"
    return (1, len(prefix))


@dataclass
class Group:
    """A rule's plain route and the variant routes ahead of it."""

    plain: dict[str, Any]
    variants: list[dict[str, Any]]


def groups(routes: list[dict[str, Any]], slot_names: tuple[str, ...]) -> Iterator[Group]:
    pending: list[dict[str, Any]] = []
    for r in routes:
        if is_variant(r):
            pending.append(r)
            continue
        for v in pending:
            # The variant is this plain route plus slot-header matchers.
            assert normalized_match(v["match"], slot_names) == normalized_match(r["match"]), (
                f"variant {v['name']!r} is followed by plain route {r['name']!r} of another match"
            )
            assert v["name"].startswith(f"{r['name']} "), (v["name"], r["name"])
        yield Group(r, pending)
        pending = []
    assert not pending, f"variant routes with no plain route after them: {[v['name'] for v in pending]}"


def live_backends(rule: Rule) -> list[tuple[str, int]]:
    return [(b.name, b.weight) for b in rule.backends if b.weight > 0]


def check_action(r: dict[str, Any], rule: Rule) -> None:
    live = live_backends(rule)
    action = r["route"]
    if len(live) == 1:
        assert action["cluster"] == live[0][0]
        assert "weighted_clusters" not in action
    else:
        clusters = action["weighted_clusters"]["clusters"]
        assert [(c["name"], c["weight"]) for c in clusters] == live


def check_headers(r: dict[str, Any], rule: Rule, policy: Policy) -> None:
    removed = [h.lower() for h in r.get("request_headers_to_remove", [])]
    missing = set(policy.slot_names) - set(removed)
    assert not missing, f"route {r['name']!r} lets slot headers {sorted(missing)} through to the backend"
    mod = rule.header_modifier
    added = [
        (a["header"]["key"].lower(), a["header"].get("value", ""), a.get("append_action", "APPEND_IF_EXISTS_OR_ADD"))
        for a in r.get("request_headers_to_add", [])
    ]
    expected = []
    if mod is not None:
        expected += [(n.lower(), v, "OVERWRITE_IF_EXISTS_OR_ADD") for n, v in mod.set]
        expected += [(n.lower(), v, "APPEND_IF_EXISTS_OR_ADD") for n, v in mod.add]
        assert {n.lower() for n in mod.remove} <= set(removed)
    assert sorted(added) == sorted(expected)
    assert not {n for n, _, _ in added} & set(policy.slot_headers.reserved), "a route adds a slot or marker header"


def check_variant(v: dict[str, Any], rule: Rule, policy: Policy) -> frozenset[str]:
    """The variant's slot matchers name exactly the rule's slot headers: the
    sampled ones by exact backend name, the others as absent. Returns the
    sampled backends, which are exactly the mirror policies' clusters."""
    by_slot = {policy.slot_names[m.slot]: m for m in rule.mirrors}
    slot_matchers = [h for h in v["match"].get("headers", []) if h["name"] in policy.slot_names]
    names = [h["name"] for h in slot_matchers]
    assert sorted(names) == sorted(by_slot), f"{v['name']!r} matches slot headers {names}, the rule has {sorted(by_slot)}"
    sampled = set()
    for h in slot_matchers:
        target = by_slot[h["name"]]
        assert not h.get("invert_match"), h
        if "string_match" in h:
            assert h["string_match"] == {"exact": target.backend}, h
            assert set(h) == {"name", "string_match"}, h
            sampled.add(target.backend)
        else:
            assert h == {"name": h["name"], "present_match": False}, f"{v['name']!r}: unsampled slot must be absent, got {h}"
    policies = v["route"]["request_mirror_policies"]
    assert sorted(p["cluster"] for p in policies) == sorted(sampled) and sampled
    for p in policies:
        assert p.get("disable_shadow_host_suffix_append") is True, p
        assert "runtime_fraction" not in p and "cluster_header" not in p, "Envoy must not sample again, nor read a header"
        markers = [m["append"]["header"] for m in p.get("request_headers_mutations", []) if "append" in m]
        assert {"key": policy.slot_headers.marker, "value": rule.id} in markers, p
    return frozenset(sampled)


def ext_proc_disabled(r: dict[str, Any]) -> bool:
    cfg = r.get("typed_per_filter_config", {}).get(envoyconf.EXT_PROC_FILTER)
    return bool(cfg and cfg.get("disabled") is True)


def check_virtual_hosts(vhosts: list[dict[str, Any]], policy: Policy) -> None:
    by_domain: dict[str, dict[str, Any]] = {}
    for vh in vhosts:
        for d in vh["domains"]:
            assert d not in by_domain, f"domain {d} in two virtual hosts"
            by_domain[d] = vh
    expected_domains = {h or "*" for h, _ in policy.table.vhosts} | {"*"}
    assert set(by_domain) == expected_domains
    if "" not in {h for h, _ in policy.table.vhosts}:
        # Hosts no route names get Envoy's 404, as the sampler matches nothing.
        assert not by_domain["*"].get("routes")
    for hostname, entries in policy.table.vhosts:
        routes = by_domain[hostname or "*"].get("routes", [])
        gs = list(groups(routes, policy.slot_names))
        # Envoy's first match is the sampler's: same entries, same order.
        assert [g.plain["name"] for g in gs] == [e.rule.id for e in entries], hostname
        precedence = [path_precedence(g.plain["match"]) for g in gs]
        assert precedence == sorted(precedence, reverse=True), f"{hostname}: routes out of Gateway API precedence: {precedence}"
        for g, entry in zip(gs, entries, strict=False):
            rule = entry.rule
            assert normalized_match(g.plain["match"]) == normalized_match(expected_match(entry.match)), g.plain["name"]
            assert "request_mirror_policies" not in g.plain.get("route", {})
            for r in (*g.variants, g.plain):
                check_headers(r, rule, policy)
            if live_backends(rule):
                for r in (*g.variants, g.plain):
                    check_action(r, rule)
            else:
                assert g.plain["direct_response"]["status"] == 500
            # ext_proc runs where there is something to decide, and only there.
            assert ext_proc_disabled(g.plain) is (not rule.mirrors), g.plain["name"]
            sampled = [check_variant(v, rule, policy) for v in g.variants]
            every_subset = {
                frozenset(c) for n in range(1, len(rule.mirrors) + 1) for c in itertools.combinations([m.backend for m in rule.mirrors], n)
            }
            assert len(sampled) == len(set(sampled)) and set(sampled) == every_subset, g.plain["name"]


def check_filters(filters: list[dict[str, Any]], policy: Policy, timeout_ms: int) -> None:
    names = [f["name"] for f in filters]
    lua_at, ext_at = names.index(envoyconf.ANTI_SPOOF_FILTER), names.index(envoyconf.EXT_PROC_FILTER)
    assert lua_at < ext_at, "the anti-spoofing filter must run before ext_proc"
    lua = filters[lua_at]["typed_config"]
    assert lua["@type"] == "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
    source = lua["default_source_code"]["inline_string"]
    for name in policy.slot_headers.reserved:
        assert f'"{name}"' in source, f"the Lua filter does not strip {name}"
    assert "envoy_on_request" in source and "clearRouteCache()" in source
    proc = filters[ext_at]["typed_config"]
    assert proc["@type"] == "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
    assert proc["failure_mode_allow"] is True
    assert proc["grpc_service"]["envoy_grpc"]["cluster_name"] == SAMPLER_CLUSTER
    mode = proc["processing_mode"]
    assert mode.get("request_header_mode", "SEND") in ("SEND", "DEFAULT")
    assert mode["response_header_mode"] == "SKIP"
    assert mode.get("request_body_mode", "NONE") == "NONE" and mode.get("response_body_mode", "NONE") == "NONE"
    timeout = proc["message_timeout"]
    assert timeout.endswith("s") and round(float(timeout[:-1]) * 1000) == timeout_ms, timeout


def check_sampler_cluster(c: dict[str, Any]) -> None:
    options = c["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"], "gRPC needs HTTP/2"
    assert any("grpc_health_check" in h for h in c["health_checks"])


# --------------------------------------------------------------------------
# envoy/envoy.yaml is what `make envoy-config` writes now.


def test_compose_config_is_fresh(tmp_path: Path) -> None:
    out = tmp_path / "envoy.yaml"
    assert render_cli(["envoy-config", "--for", "compose", "--config", DEFAULT_CONFIG, "-o", str(out)], {}) == 0
    assert COMPOSE_ENVOY.exists(), "envoy/envoy.yaml is missing: run `make envoy-config`"
    assert out.read_bytes() == COMPOSE_ENVOY.read_bytes(), "envoy/envoy.yaml is stale: run `make envoy-config` and commit it"


def test_makefile_renders_what_the_freshness_test_compares() -> None:
    recipe = re.search(r"^envoy-config:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(encoding="utf-8"), re.M)
    assert recipe
    assert re.search(
        rf"envoy-config --for compose --config {re.escape(DEFAULT_CONFIG)} (--output|-o) envoy/envoy\.yaml\s*$", recipe.group(1), re.M
    )
    # envoy-compare.yaml is made from envoy.yaml: after it.
    assert " ".join(COMPARE_ENVOY_ARGV) in recipe.group(1).replace("\\\n\t\t", "")
    assert recipe.group(1).index("envoy/envoy.yaml") < recipe.group(1).index("envoy/envoy-compare.yaml")


# docker compose's comparison: envoy.yaml with the capture points of extproc/data/compare.yaml,
# streaming to the observer's compose service (named like its cluster, as the sampler's is).
COMPARE_ENVOY = REPO / "envoy" / "envoy-compare.yaml"
COMPARE_CONFIG = "extproc/data/compare.yaml"
COMPARE_ENVOY_ARGV = [
    "compare", "envoy-config", "envoy/envoy.yaml", "--config", COMPARE_CONFIG, "--routes", DEFAULT_CONFIG,
    "--observer", "mirror-sampler-compare:50061", "--output", "envoy/envoy-compare.yaml",
]  # fmt: skip


def test_compose_compare_config_is_fresh(tmp_path: Path) -> None:
    out = tmp_path / "envoy-compare.yaml"
    assert render_cli([*COMPARE_ENVOY_ARGV[:-1], str(out)], {}) == 0
    assert COMPARE_ENVOY.read_bytes() == out.read_bytes(), "envoy/envoy-compare.yaml is stale: run `make envoy-config` and commit it"
    config = snake(yaml.safe_load(out.read_text(encoding="utf-8")))
    from extproc.compare.envoy import CAPTURE_SERVICE_CLUSTER

    observer = clusters_of(config)[CAPTURE_SERVICE_CLUSTER]
    assert observer["type"] == "STRICT_DNS" and endpoint_of(observer) == (CAPTURE_SERVICE_CLUSTER, 50061)


# --------------------------------------------------------------------------
# The real Envoy accepts every rendering.


def snippet_bootstrap(snippet: dict[str, Any], policy: Policy) -> dict[str, Any]:
    """An existing Envoy that pasted the snippet where its comment says."""
    backends = [static_cluster(name, 18080 + i) for i, name in enumerate(envoyconf.backend_names(policy))]
    vhosts = list(snippet["virtual_hosts"])
    if not any("*" in vh["domains"] for vh in vhosts):
        # The user's own catch-all host, which Envoy allows only once.
        catch_all = [{"match": {"prefix": "/"}, "direct_response": {"status": 404}}]
        vhosts.append({"name": "existing", "domains": ["*"], "routes": catch_all})
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "existing",
        "route_config": {"name": "existing", "virtual_hosts": vhosts},
        "http_filters": [
            *snippet["http_filters"],
            {"name": ROUTER, "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
        # With spec.compare: the access log of the captures.
        **({"access_log": snippet["access_log"]} if "access_log" in snippet else {}),
    }
    bootstrap: dict[str, Any] = {
        "static_resources": {
            "listeners": [
                {
                    "name": "existing",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 18000}},
                    "filter_chains": [{"filters": [{"name": HCM, "typed_config": manager}]}],
                },
                # With spec.compare: the capture listener, and the extension that runs it.
                *snippet.get("listeners", []),
            ],
            "clusters": [*snippet["clusters"], *backends],
        }
    }
    if "bootstrap_extensions" in snippet:
        bootstrap["bootstrap_extensions"] = snippet["bootstrap_extensions"]
    return bootstrap


# --------------------------------------------------------------------------
# Structure.


@pytest.mark.parametrize("name", STRUCTURE_CASES)
def test_structure(name: str, rendered: dict[str, Rendered]) -> None:
    r = rendered[name]
    assert r.path is not None and r.policy is not None, r.error
    assert r.text.startswith(envoyconf.GENERATED_HEADER)
    doc = r.data
    policy = r.policy
    hcm = hcm_of(doc)
    check_filters(hcm["http_filters"], policy, r.case.message_timeout_ms)
    assert hcm["http_filters"][-1]["name"] == ROUTER
    assert hcm.get("use_remote_address") is True, "edge proxy: clients must not choose x-request-id"
    clusters = clusters_of(doc)
    check_sampler_cluster(clusters[SAMPLER_CLUSTER])
    assert set(clusters) == {SAMPLER_CLUSTER, *envoyconf.backend_names(policy)}
    check_virtual_hosts(hcm["route_config"]["virtual_hosts"], policy)


def test_routes_case_exercises_everything(rendered: dict[str, Rendered]) -> None:
    """The structure checks above see every feature at least once."""
    r = rendered["routes"]
    assert r.policy is not None, r.error
    text = r.text
    for needle in (
        "path:",
        "safeRegex",
        "pathSeparatedPrefix",
        "queryParameters",
        ":method",
        "weightedClusters",
        "'*.example.com'",
        "requestHeadersToAdd",
        "presentMatch: false",
    ):
        assert needle in text, needle
    assert max(len(rule.mirrors) for rule in r.policy.rules) == 3
    assert r.policy.slot_names == ("x-mirror-cluster-0", "x-mirror-cluster-1", "x-mirror-cluster-2")


def test_compose_uses_service_names_and_local_uses_loopback(rendered: dict[str, Rendered]) -> None:
    compose = clusters_of(rendered["default-compose"].data)
    local = clusters_of(rendered["default-local"].data)
    assert set(compose) == set(local)
    for name, c in compose.items():
        assert c["type"] == "STRICT_DNS"
        assert endpoint_of(c) == (name, 50051 if name == SAMPLER_CLUSTER else 3000)
    for c in local.values():
        assert c["type"] == "STATIC"
        assert endpoint_of(c)[0] == "127.0.0.1"
    assert endpoint_of(local[SAMPLER_CLUSTER]) == ("127.0.0.1", 50051)
    assert endpoint_of(local["backend"]) == ("127.0.0.1", 3000)


@pytest.mark.parametrize("name", ["default-local", "conformance"])
def test_local_clusters_use_the_backend_ref_port_mirrors_included(name: str, rendered: dict[str, Rendered]) -> None:
    """`--for local` puts a backend at 127.0.0.1:<backendRef port> (the CLI's
    --backend-address help says so). A backend that is only a RequestMirror
    target has a port in its backendRef too (backend-2: 3000 in
    http-mirror.yaml; infra-backend-v2/v3: 8080 in the conformance route),
    but the policy drops it and the cluster gets port 80."""
    r = rendered[name]
    assert r.path is not None, r.error
    manifest = (REPO / (r.case.config or "")).read_text(encoding="utf-8")
    ports: dict[str, int] = {}
    for doc in yaml.safe_load_all(manifest):
        for rule in doc["spec"]["rules"]:
            refs = [
                *rule.get("backendRefs", []),
                *(f["requestMirror"]["backendRef"] for f in rule.get("filters", []) if f["type"] == "RequestMirror"),
            ]
            ports.update({ref["name"]: ref["port"] for ref in refs if "port" in ref})
    clusters = clusters_of(r.data)
    assert {n: endpoint_of(clusters[n])[1] for n in ports} == ports


# --------------------------------------------------------------------------
# Snippet mode.


def test_snippet_is_filters_clusters_and_virtual_hosts(rendered: dict[str, Rendered]) -> None:
    r = rendered["snippet"]
    assert r.path is not None and r.policy is not None, r.error
    assert r.text.startswith(envoyconf.GENERATED_HEADER)
    raw = yaml.safe_load(r.text)
    assert set(raw) == {"http_filters", "clusters", "virtual_hosts"}
    snip = r.data
    names = [f["name"] for f in snip["http_filters"]]
    assert names == [envoyconf.ANTI_SPOOF_FILTER, envoyconf.EXT_PROC_FILTER], "filters to paste ahead of the router, in order"
    check_filters(snip["http_filters"], r.policy, r.case.message_timeout_ms)
    (sampler,) = snip["clusters"]
    assert sampler["name"] == SAMPLER_CLUSTER
    check_sampler_cluster(sampler)
    check_virtual_hosts(snip["virtual_hosts"], r.policy)


def test_snippet_has_no_catch_all_host_of_its_own(rendered: dict[str, Rendered]) -> None:
    """Merged into an Envoy that has its own '*' host, an empty '*' host in the
    snippet made Envoy refuse the result ("Only a single wildcard domain is
    permitted"); the full configuration keeps its 404 catch-all."""
    snip = rendered["snippet-default"]
    assert snip.path is not None, snip.error
    domains = [d for vh in yaml.safe_load(snip.text)["virtual_hosts"] for d in vh["domains"]]
    assert domains == ["backends.example"]
    full = hcm_of(rendered["default-local"].data)["route_config"]["virtual_hosts"]
    assert [vh["domains"] for vh in full] == [["backends.example"], ["*"]]


@pytest.mark.parametrize("name", SNIPPET_CASES)
def test_snippet_is_snake_case_like_envoys_docs(name: str, rendered: dict[str, Rendered]) -> None:
    r = rendered[name]
    assert r.path is not None, r.error
    camel: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            camel.extend(k for k in value if _CAMEL.match(k) and k != k.lower())
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(yaml.safe_load(r.text))
    assert not camel, f"camelCase keys in the snippet: {sorted(set(camel))}"


def test_snippet_comment_says_what_the_user_must_know(rendered: dict[str, Rendered]) -> None:
    text = rendered["snippet-default"].text
    comment = text[: text.index("\nhttp_filters:")]
    needles = ("--sampler HOST:PORT", "convert envoy", "timeouts", "use_remote_address", "internal_address_config", "x-request-id")
    for needle in (*needles, "ignore_port_in_host_matching"):
        assert needle in comment, needle


def test_snippet_matches_the_full_configuration(rendered: dict[str, Rendered]) -> None:
    snip, full = rendered["snippet"].data, rendered["routes"].data
    hcm = hcm_of(full)
    assert snip["virtual_hosts"] == hcm["route_config"]["virtual_hosts"]
    assert snip["http_filters"] == hcm["http_filters"][:2]
    assert snip["clusters"] == [clusters_of(full)[SAMPLER_CLUSTER]]


# --------------------------------------------------------------------------
# The helpers are not vacuous.


def test_expected_match_covers_every_kind() -> None:
    m = Match(
        path=PathMatch(PathType.PREFIX, "/a/"),
        headers=(ValueMatch("x", "1"),),
        query_params=(ValueMatch("q", "a|b", ValueType.REGEX),),
        method="GET",
    )
    assert expected_match(m) == {
        "path_separated_prefix": "/a",
        "headers": [{"name": "x", "string_match": {"exact": "1"}}, {"name": ":method", "string_match": {"exact": "GET"}}],
        "query_parameters": [{"name": "q", "string_match": {"safe_regex": {"regex": "a|b"}}}],
    }


def test_snake_leaves_map_keys_alone() -> None:
    assert snake({"typedConfig": {"@type": "t", "envoy.filters.http.ext_proc": {"disabled": True}}, "portValue": 1}) == {
        "typed_config": {"@type": "t", "envoy.filters.http.ext_proc": {"disabled": True}},
        "port_value": 1,
    }


def test_inline_puts_each_rules_script_on_every_route_of_the_rule(rendered: dict[str, Rendered]) -> None:
    """The rule's script on its plain route and on its variants (a forged slot
    header can select a variant before anything runs); nothing elsewhere."""
    from extproc.envoy.lua import DECIDE_FILTER, rule_script

    r = rendered["inline-routes"]
    assert r.policy is not None
    data = r.data
    filters = [f["name"] for f in hcm_of(data)["http_filters"]]
    assert filters == [DECIDE_FILTER, ROUTER]
    assert "mirror-sampler" not in clusters_of(data)
    with_mirrors = {rule.id: rule for rule in r.policy.rules if rule.mirrors and live_backends(rule)}
    seen: set[str] = set()
    for vhost in hcm_of(data)["route_config"]["virtual_hosts"]:
        for route in vhost["routes"]:
            rule_id = route["name"].split(" mirror ")[0]
            per_route = (route.get("typed_per_filter_config") or {}).get(DECIDE_FILTER)
            if rule_id not in with_mirrors:
                assert per_route is None, route["name"]
                continue
            is_variant_route = " mirror " in route["name"]
            assert per_route is not None, route["name"]
            assert per_route["source_code"]["inline_string"] == rule_script(r.policy, with_mirrors[rule_id], variant=is_variant_route)
            seen.add(rule_id)
    assert seen == set(with_mirrors)


# --------------------------------------------------------------------------
# spec.compare: the capture points (extproc/compare/envoy.py) with every engine.

COMPARED = {"prod/shop/0": ("shadow-a",), "prod/shop/2": ("shadow-a", "shadow-c")}


def capture_pieces(doc: dict[str, Any], filters: list[dict[str, Any]], vhosts: list[dict[str, Any]]) -> None:
    """The capture filter last before the router, with no default script; each variant of a
    compared rule captures what it mirrors of the compared targets, through the capture
    cluster; plain routes capture nothing; nothing else is touched."""
    from extproc.compare.envoy import CAPTURE_FILTER, CAPTURE_SCRIPT, CAPTURE_SHADOW_CLUSTER, TARGET_HEADER
    from extproc.compare.records import TAG_FIELD, CaptureTag, Side

    names = [f["name"] for f in filters]
    assert names.index(CAPTURE_FILTER) == len(names) - 1 or names[names.index(CAPTURE_FILTER) + 1] == ROUTER
    assert "default_source_code" not in filters[names.index(CAPTURE_FILTER)]["typed_config"]
    seen = set()
    for vh in vhosts:
        for route in vh.get("routes", []):
            rule_id, variant, mirrored = route["name"].partition(" mirror ")
            capture = route.get("typed_per_filter_config", {}).get(CAPTURE_FILTER)
            if rule_id not in COMPARED:
                assert capture is None, route["name"]
                continue
            seen.add(rule_id)
            if not variant:
                assert capture is None, route["name"]
                continue
            compared = [t for t in mirrored.split("+") if t in COMPARED[rule_id]]
            policies = route["route"]["request_mirror_policies"]
            through = [p for p in policies if p["cluster"] == CAPTURE_SHADOW_CLUSTER]
            assert [p["cluster"] for p in policies if p not in through] == [t for t in mirrored.split("+") if t not in compared]
            targets = [
                m["append"]["header"]["value"]
                for p in through
                for m in p["request_headers_mutations"]
                if m["append"]["header"]["key"] == TARGET_HEADER
            ]
            assert targets == compared, route["name"]
            if not compared:
                assert capture is None, route["name"]
                continue
            assert capture == {"@type": capture["@type"], "name": CAPTURE_SCRIPT}, route["name"]
            tag = route["metadata"]["filter_metadata"][CAPTURE_FILTER][TAG_FIELD]
            assert CaptureTag.decode(tag) == CaptureTag(Side.PRIMARY, rule_id, tuple(compared)), route["name"]
    assert seen == set(COMPARED)


def capture_listener_of(listeners: list[dict[str, Any]]) -> dict[str, Any]:
    from extproc.compare.envoy import CAPTURE_LISTENER

    (listener,) = [entry for entry in listeners if entry["name"] == CAPTURE_LISTENER]
    assert "internal_listener" in listener and "address" not in listener
    return listener


@pytest.mark.parametrize(
    ("name", "deciders"),
    [
        ("compare-local", [envoyconf.ANTI_SPOOF_FILTER, envoyconf.EXT_PROC_FILTER]),
        ("compare-inline", ["mirror-sampler.decide"]),
        ("compare-module", ["mirror-sampler.module"]),
        ("compare-compose", [envoyconf.ANTI_SPOOF_FILTER, envoyconf.EXT_PROC_FILTER]),
        ("compare-module-compose", ["mirror-sampler.module"]),
    ],
)
def test_capture_points_follow_the_deciding_filter_with_every_engine(name: str, deciders: list[str], rendered: dict[str, Rendered]) -> None:
    from extproc.compare.envoy import CAPTURE_FILTER

    r = rendered[name]
    assert r.path is not None, r.error
    doc = r.data
    hcm = hcm_of({"static_resources": {"listeners": doc["static_resources"]["listeners"][:1]}})
    assert [f["name"] for f in hcm["http_filters"]] == [*deciders, CAPTURE_FILTER, ROUTER]
    capture_pieces(doc, hcm["http_filters"], hcm["route_config"]["virtual_hosts"])
    capture_listener_of(doc["static_resources"]["listeners"])
    assert [e["name"] for e in doc["bootstrap_extensions"]] == ["envoy.bootstrap.internal_listener"]


def test_the_decision_is_the_same_with_and_without_the_capture_points(rendered: dict[str, Rendered]) -> None:
    """Capturing adds its own per-route configuration and leaves the deciding filter's alone."""
    from extproc.compare.envoy import CAPTURE_FILTER

    def decisions(name: str) -> list[tuple[str, Any]]:
        hcm = hcm_of({"static_resources": {"listeners": rendered[name].data["static_resources"]["listeners"][:1]}})
        return [
            (route["name"], {k: v for k, v in route.get("typed_per_filter_config", {}).items() if k != CAPTURE_FILTER})
            for vh in hcm["route_config"]["virtual_hosts"]
            for route in vh["routes"]
        ]

    assert decisions("compare-inline") == decisions("inline-routes")
    assert decisions("compare-local") == decisions("routes")


def test_compose_streams_to_the_observer_service(rendered: dict[str, Rendered]) -> None:
    """The observer is addressed in compose as the sampler is: its service name (the
    cluster's name) resolved by DNS; locally, loopback."""
    from extproc.compare.envoy import CAPTURE_SERVICE_CLUSTER

    compose = clusters_of(rendered["compare-compose"].data)[CAPTURE_SERVICE_CLUSTER]
    assert compose["type"] == "STRICT_DNS" and endpoint_of(compose) == (CAPTURE_SERVICE_CLUSTER, 50061)
    local = clusters_of(rendered["compare-local"].data)[CAPTURE_SERVICE_CLUSTER]
    assert local["type"] == "STATIC" and endpoint_of(local) == ("127.0.0.1", 50061)


@pytest.mark.parametrize(
    ("name", "deciders"),
    [
        ("compare-snippet", [envoyconf.ANTI_SPOOF_FILTER, envoyconf.EXT_PROC_FILTER]),
        ("compare-inline-snippet", ["mirror-sampler.decide"]),
        ("compare-module-snippet", ["mirror-sampler.module"]),
    ],
)
def test_the_snippet_carries_the_capture_points(name: str, deciders: list[str], rendered: dict[str, Rendered]) -> None:
    from extproc.compare.envoy import CAPTURE_FILTER, CAPTURE_SERVICE_CLUSTER, CAPTURE_SHADOW_CLUSTER

    r = rendered[name]
    assert r.path is not None, r.error
    snip = yaml.safe_load(r.text)
    assert set(snip) == {"http_filters", "clusters", "virtual_hosts", "access_log", "listeners", "bootstrap_extensions"}
    assert [f["name"] for f in snip["http_filters"]] == [*deciders, CAPTURE_FILTER], "the capture filter last, ahead of the router"
    [log] = snip["access_log"]
    assert log["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == CAPTURE_SERVICE_CLUSTER
    capture_pieces(snip, snip["http_filters"], snip["virtual_hosts"])
    capture_listener_of(snip["listeners"])
    clusters = {c["name"]: c for c in snip["clusters"]}
    assert {CAPTURE_SERVICE_CLUSTER, CAPTURE_SHADOW_CLUSTER} <= set(clusters)
    observer = "10.0.0.7" if name == "compare-snippet" else "127.0.0.1"
    assert endpoint_of(clusters[CAPTURE_SERVICE_CLUSTER]) == (observer, 50061), "--observer, or its default"
    assert [e["name"] for e in snip["bootstrap_extensions"]] == ["envoy.bootstrap.internal_listener"]
    comment = r.text[: r.text.index("\nhttp_filters:")]
    needles = ("spec.compare", CAPTURE_FILTER, "access_log", "--observer HOST:PORT", "static_resources.listeners", "bootstrap_extensions")
    for needle in needles:
        assert needle in comment, needle
