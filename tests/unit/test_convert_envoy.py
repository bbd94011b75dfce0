"""`convert envoy`: random Envoy mirrors become route-selected mirrors the
sampler decides, every other setting of the user's routes kept.

The realistic input is tests/data/convert/envoy/ (two listeners, one with
routes from an RDS file); smaller bootstraps are built here for each refusal
and parse error.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config import schema
from extproc.config.build import build_policy
from extproc.config.errors import ConfigError
from extproc.config.schema import MAX_BACKEND_REFS_PER_RULE, MAX_RULES_PER_ROUTE
from extproc.config.settings import Settings
from extproc.config.source import load_policy
from extproc.convert import Conversion, ConvertError
from extproc.convert.envoy import convert_envoy
from extproc.convert.envoy_routes import METADATA_KEY, SAMPLER_FILTER
from extproc.core.policy import Policy
from extproc.core.sampling import Fraction
from extproc.core.slots import DEFAULT_SLOT_HEADERS, SlotHeaders, SlotHeadersError
from extproc.envoy.render import ANTI_SPOOF_FILTER
from tests.support.paths import DATA

SOURCE = DATA / "convert" / "envoy"
SLOTS = DEFAULT_SLOT_HEADERS.names
MARKER = DEFAULT_SLOT_HEADERS.marker
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
ROUTER = {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}


def write(conversion: Conversion, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in conversion.files.items():
        (out / name).write_text(text, encoding="utf-8")


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """The realistic configuration, copied so that the RDS path next to it resolves."""
    target = tmp_path / "in"
    shutil.copytree(SOURCE, target)
    return target


@pytest.fixture
def converted(inputs: Path, tmp_path: Path) -> tuple[Conversion, Path]:
    out = tmp_path / "out"
    conversion = convert_envoy([inputs / "envoy.yaml"], output_dir=out)
    write(conversion, out)
    return conversion, out


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def managers(bootstrap: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        listener["name"]: listener["filter_chains"][0]["filters"][0]["typed_config"]
        for listener in bootstrap["static_resources"]["listeners"]
    }


def routes_of(hcm: dict[str, Any], rds: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    rc = hcm["route_config"] if "route_config" in hcm else rds["resources"][0]  # type: ignore[index]
    return [r for vh in rc["virtual_hosts"] for r in vh["routes"]]


def by_name(routes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in routes}


def all_routes(root: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(front listener's routes, internal listener's RDS routes) by name."""
    boot = load(root / "envoy.yaml")
    hcms = managers(boot)
    return by_name(routes_of(hcms["front"])), by_name(routes_of(hcms["internal"], load(root / "routes.yaml")))


def ours(route: dict[str, Any]) -> dict[str, Any]:
    return route["metadata"]["filter_metadata"][METADATA_KEY]  # type: ignore[no-any-return]


def rule_id_of(route: dict[str, Any]) -> str:
    (meta,) = route["typed_per_filter_config"][SAMPLER_FILTER]["overrides"]["grpc_initial_metadata"]
    assert meta["key"] == "x-mirror-rule-id"
    return meta["value"]  # type: ignore[no-any-return]


def without_ours(route: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
    """A converted route with exactly the documented changes taken out."""
    r = copy.deepcopy(route)
    r["name"] = original.get("name")
    match = r["match"]
    match["headers"] = [h for h in match.get("headers", []) if h["name"] not in SLOTS]
    if not match["headers"] and "headers" not in original["match"]:
        del match["headers"]
    r["route"].pop("request_mirror_policies", None)
    removed = [h for h in r["request_headers_to_remove"] if h not in SLOTS]
    if removed or "request_headers_to_remove" in original:
        r["request_headers_to_remove"] = removed
    else:
        del r["request_headers_to_remove"]
    del r["typed_per_filter_config"][SAMPLER_FILTER]
    if not r["typed_per_filter_config"]:
        del r["typed_per_filter_config"]
    del r["metadata"]["filter_metadata"][METADATA_KEY]
    if not r["metadata"]["filter_metadata"]:
        del r["metadata"]
    expected = copy.deepcopy(original)
    expected["route"].pop("request_mirror_policies")
    return r if r.keys() == expected.keys() else {"keys differ": sorted(r), "expected": sorted(expected)}


def group(routes: list[dict[str, Any]], name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The plain route ``name`` and the variant routes right before it."""
    at = next(i for i, r in enumerate(routes) if r.get("name") == name)
    variants: list[dict[str, Any]] = []
    i = at - 1
    while i >= 0 and routes[i]["name"].startswith(f"{name} mirror "):
        variants.insert(0, routes[i])
        i -= 1
    return routes[at], variants


# --------------------------------------------------------------------------
# The realistic configuration


MIRRORING = {
    # route name -> [(mirror cluster, numerator, denominator)]
    "api": [("shadow-a", 30, 100)],
    "checkout": [("shadow-a", 333333, 1_000_000), ("shadow-b", 333333, 1_000_000)],
    "reports": [("shadow-b", 5000, 10_000)],
    "jobs": [("shadow-b", 50, 100)],
}


def original_routes() -> dict[str, dict[str, Any]]:
    boot = load(SOURCE / "envoy.yaml")
    front = routes_of(managers(boot)["front"])
    internal = routes_of(managers(boot)["internal"], load(SOURCE / "routes.yaml"))
    return by_name(front + internal)


def test_every_user_setting_is_kept_on_every_variant_and_the_plain_route(converted: tuple[Conversion, Path]) -> None:
    _, out = converted
    boot = load(out / "envoy.yaml")
    hcms = managers(boot)
    listed = {"front": routes_of(hcms["front"]), "internal": routes_of(hcms["internal"], load(out / "routes.yaml"))}
    originals = original_routes()
    for name, mirrors in MIRRORING.items():
        routes = listed["internal" if name == "jobs" else "front"]
        plain, variants = group(routes, name)
        original = originals[name]
        assert len(variants) == 2 ** len(mirrors) - 1, name
        assert "request_mirror_policies" not in plain["route"], "the plain route mirrors nothing itself"
        for r in (*variants, plain):
            stripped = without_ours(r, original)
            expected = copy.deepcopy(original)
            expected["route"].pop("request_mirror_policies")
            assert stripped == expected, r["name"]
            # What was added: slot headers removed for every backend, the rule named for the sampler.
            assert r["request_headers_to_remove"][-2:] == list(SLOTS)
            assert rule_id_of(r) == rule_id_of(plain)
        # The settings the issue names, spelled out once.
        if name == "api":
            for r in (*variants, plain):
                assert r["route"]["prefix_rewrite"] == "/v2/" and r["route"]["timeout"] == "3s"
                assert r["route"]["retry_policy"] == {"retry_on": "5xx,reset", "num_retries": 2, "per_try_timeout": "1s"}
                assert r["request_headers_to_add"][0]["header"] == {"key": "x-shop-api", "value": "v2"}
                assert r["request_headers_to_remove"][0] == "x-debug"
                assert r["decorator"] == {"operation": "shop-api"}
        if name == "checkout":
            for r in (*variants, plain):
                assert r["typed_per_filter_config"]["envoy.filters.http.lua"]["disabled"] is True
                assert r["metadata"]["filter_metadata"]["team"] == {"owner": "payments"}
                assert r["match"]["headers"][0] == {"name": "x-tenant", "string_match": {"exact": "acme"}}
                assert r["route"]["host_rewrite_literal"] == "checkout.internal"


def test_variants_match_the_slot_headers_and_mirror_statically(converted: tuple[Conversion, Path]) -> None:
    _, out = converted
    front, _ = all_routes(out)
    originals = original_routes()
    plain, variants = group(list(front.values()), "checkout")
    assert [v["name"] for v in variants] == ["checkout mirror shadow-a+shadow-b", "checkout mirror shadow-a", "checkout mirror shadow-b"]
    chosen_sets = [["shadow-a", "shadow-b"], ["shadow-a"], ["shadow-b"]]
    user_policies = {p["cluster"]: p for p in originals["checkout"]["route"]["request_mirror_policies"]}
    for v, chosen in zip(variants, chosen_sets, strict=True):
        # Envoy requires every header matcher of a route: their order means nothing.
        slots = sorted((h for h in v["match"]["headers"] if h["name"] in SLOTS), key=lambda h: str(h["name"]))
        expected = [
            {"name": SLOTS[i], "string_match": {"exact": c}} if c in chosen else {"name": SLOTS[i], "present_match": False}
            for i, c in enumerate(["shadow-a", "shadow-b"])
        ]
        assert slots == expected
        policies = v["route"]["request_mirror_policies"]
        assert [p["cluster"] for p in policies] == chosen
        for p in policies:
            user = copy.deepcopy(user_policies[p["cluster"]])
            del user["runtime_fraction"]
            header = {"key": MARKER, "value": rule_id_of(plain)}
            marker = {"append": {"header": header, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}
            user["request_headers_mutations"] = [*user.get("request_headers_mutations", []), marker]
            assert p == user, "the user's mirror policy, without runtime_fraction, plus the marker"
    assert ours(plain)["request_mirror_policies"] == originals["checkout"]["route"]["request_mirror_policies"]


def test_routes_without_mirrors_and_refused_ones_only_skip_the_sampler(converted: tuple[Conversion, Path]) -> None:
    _, out = converted
    front, internal = all_routes(out)
    originals = original_routes()
    for name, route in [("static", front["static"]), ("legacy", front["legacy"]), ("health", internal["health"])]:
        assert route["typed_per_filter_config"] == {
            SAMPLER_FILTER: {"@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute", "disabled": True}
        }, name
        rest = {k: v for k, v in route.items() if k != "typed_per_filter_config"}
        assert rest == originals[name], f"{name} changed"
    assert not any(n.startswith("legacy mirror") for n in front)


def test_filters_ahead_of_the_router_and_the_sampler_cluster(converted: tuple[Conversion, Path]) -> None:
    _, out = converted
    boot = load(out / "envoy.yaml")
    hcms = managers(boot)
    front_filters = [f["name"] for f in hcms["front"]["http_filters"]]
    assert front_filters == ["envoy.filters.http.lua", ANTI_SPOOF_FILTER, SAMPLER_FILTER, ROUTER["name"]]
    assert [f["name"] for f in hcms["internal"]["http_filters"]] == [ANTI_SPOOF_FILTER, SAMPLER_FILTER, ROUTER["name"]]
    proc = hcms["front"]["http_filters"][2]["typed_config"]
    assert proc["failure_mode_allow"] is True and proc["grpc_service"]["envoy_grpc"]["cluster_name"] == "mirror-sampler"
    assert proc["processing_mode"]["response_header_mode"] == "SKIP"
    lua = hcms["front"]["http_filters"][1]["typed_config"]["default_source_code"]["inline_string"]
    assert all(f'"{h}"' in lua for h in (*SLOTS, MARKER)) and "clearRouteCache" in lua
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    assert list(clusters) == ["shop", "shadow-a", "shadow-b", "jobs", "mirror-sampler"]
    sampler = clusters["mirror-sampler"]
    assert sampler["type"] == "STATIC"
    address = sampler["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert address == {"address": "127.0.0.1", "port_value": 50051}
    # Everything else in the bootstrap is as it was.
    original = load(SOURCE / "envoy.yaml")
    assert boot["admin"] == original["admin"] and boot["node"] == original["node"]
    assert [c for c in boot["static_resources"]["clusters"] if c["name"] != "mirror-sampler"] == original["static_resources"]["clusters"]
    rds = hcms["internal"]["rds"]
    assert rds["config_source"]["path_config_source"]["path"] == str(out / "routes.yaml")
    assert rds["route_config_name"] == "internal_routes"


def test_output_is_snake_case(converted: tuple[Conversion, Path]) -> None:
    conversion, _ = converted
    for name in ("envoy.yaml", "routes.yaml"):
        text = conversion.files[name]
        for camel in ("typedPerFilterConfig", "requestMirrorPolicies", "stringMatch", "grpcInitialMetadata", "failureModeAllow"):
            assert camel not in text, (name, camel)


def test_sampler_address_and_tls(inputs: Path) -> None:
    conversion = convert_envoy(
        [inputs / "envoy.yaml"], sampler="sampler.internal:7000", sampler_ca="/etc/ca.pem",
        sampler_client_cert="/etc/envoy.pem", sampler_client_key="/etc/envoy.key",
    )  # fmt: skip
    clusters = {c["name"]: c for c in load_text(conversion.files["envoy.yaml"])["static_resources"]["clusters"]}
    sampler = clusters["mirror-sampler"]
    assert sampler["type"] == "STRICT_DNS", "a host name needs DNS"
    assert sampler["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
        "address": "sampler.internal",
        "port_value": 7000,
    }
    tls = sampler["transport_socket"]["typed_config"]
    assert tls["sni"] == "sampler.internal"
    assert tls["common_tls_context"]["validation_context"]["trusted_ca"] == {"filename": "/etc/ca.pem"}
    assert tls["common_tls_context"]["tls_certificates"][0]["private_key"] == {"filename": "/etc/envoy.key"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sampler": "nope"}, "--sampler: must be HOST:PORT"),
        ({"sampler": "host:0"}, "--sampler: must be HOST:PORT"),
        ({"sampler_client_cert": "c.pem"}, "--sampler-client-cert and --sampler-client-key: set both"),
        ({"sampler_client_cert": "c.pem", "sampler_client_key": "k.pem"}, "--sampler-client-cert: needs --sampler-ca"),
    ],
)
def test_bad_options(inputs: Path, kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ConvertError) as e:
        convert_envoy([inputs / "envoy.yaml"], **kwargs)  # type: ignore[arg-type]
    assert message in str(e.value)


def load_text(text: str) -> Any:
    return yaml.safe_load(text)


def test_notes(converted: tuple[Conversion, Path]) -> None:
    conversion, _ = converted
    notes = "\n".join(conversion.notes)
    assert "runtime_key 'mirror.reports' (mirror to 'shadow-b') is no longer in effect" in notes
    assert "rule envoy/front-local-route-shop/2 in policy.yaml" in notes
    legacy = [n for n in conversion.notes if "route 'legacy' left as it was" in n]
    assert len(legacy) == 1 and "cluster_header 'x-shadow-cluster'" in legacy[0]
    assert "virtual_hosts[0].routes[2]" in legacy[0], "the note names the field path"
    rds = [n for n in conversion.notes if "routes.yaml are written to routes.yaml" in n]
    assert len(rds) == 1 and "now reads" in rds[0]
    remote = [n for n in conversion.notes if "use_remote_address is not true" in n]
    assert len(remote) == 1 and "listeners[1]" in remote[0], "only the internal listener lacks use_remote_address"
    assert any("comments are not carried over" in n for n in conversion.notes)


# --------------------------------------------------------------------------
# policy.yaml


def test_policy_loads_with_the_rule_ids_envoy_sends(converted: tuple[Conversion, Path]) -> None:
    conversion, out = converted
    text = conversion.files["policy.yaml"]
    assert text.startswith("# Generated by `mirror-sampler convert envoy`")
    assert "Edit live: each RequestMirror's fraction" in text
    assert "percent" not in text, "fraction only: the stricter loader refuses both together"
    policy: Policy = load_policy(Settings.load({"MIRROR_CONFIG": str(out / "policy.yaml")}))
    front, internal = all_routes(out)
    for name, mirrors in MIRRORING.items():
        route = (internal if name == "jobs" else front)[name]
        rule = policy.rules_by_id[rule_id_of(route)]
        assert [(m.backend, m.fraction) for m in rule.mirrors] == [(c, Fraction(n, d)) for c, n, d in mirrors]
        assert [m.slot for m in rule.mirrors] == list(range(len(mirrors)))
    assert len(policy.rules) == len(MIRRORING)
    assert {r.namespace for r in policy.routes} == {"envoy"}


def test_policy_carries_fractions_exactly() -> None:
    def boot(numerator: int, denominator: str) -> dict[str, Any]:
        fraction = {"default_value": {"numerator": numerator, "denominator": denominator}}
        return bootstrap([route("r", mirrors=[{"cluster": "shadow", "runtime_fraction": fraction}])])

    cases = [(7, "HUNDRED", (7, 100)), (7, "TEN_THOUSAND", (7, 10_000)), (7, "MILLION", (7, 1_000_000)), (0, "HUNDRED", (0, 100))]
    for numerator, denominator, expected in cases:
        conversion = convert_dict(boot(numerator, denominator))
        doc = next(iter(yaml.safe_load_all(conversion.files["policy.yaml"])))
        fraction = doc["spec"]["rules"][0]["filters"][0]["requestMirror"]["fraction"]
        assert (fraction["numerator"], fraction["denominator"]) == expected
    # No runtime_fraction: Envoy mirrors every request.
    conversion = convert_dict(bootstrap([route("r", mirrors=[{"cluster": "shadow"}])]))
    doc = next(iter(yaml.safe_load_all(conversion.files["policy.yaml"])))
    assert doc["spec"]["rules"][0]["filters"][0]["requestMirror"]["fraction"] == {"numerator": 100, "denominator": 100}


# --------------------------------------------------------------------------
# Converting again changes nothing


def test_converting_the_output_again_changes_nothing(converted: tuple[Conversion, Path]) -> None:
    first, out = converted
    again = convert_envoy([out / "envoy.yaml"], output_dir=out)
    assert again.files == first.files


def test_converting_again_with_other_settings_replaces_the_old_conversion(converted: tuple[Conversion, Path], inputs: Path) -> None:
    _, out = converted
    direct = convert_envoy([inputs / "envoy.yaml"], output_dir=out, sampler="10.0.0.9:9000", slot_headers=SlotHeaders(count=3))
    again = convert_envoy([out / "envoy.yaml"], output_dir=out, sampler="10.0.0.9:9000", slot_headers=SlotHeaders(count=3))
    assert again.files == direct.files


# --------------------------------------------------------------------------
# Small bootstraps: refusals, input formats, parse errors


def route(name: str, mirrors: list[Any] | None = None, **extra: Any) -> dict[str, Any]:
    action: dict[str, Any] = {"cluster": "primary"}
    if mirrors is not None:
        action["request_mirror_policies"] = mirrors
    return {"name": name, "match": {"prefix": f"/{name}"}, "route": action, **extra}


def cluster(name: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}],
        },
    }


def bootstrap(routes: list[dict[str, Any]], vhost_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "ingress",
        "use_remote_address": True,
        "route_config": {"name": "rc", "virtual_hosts": [{"name": "vh", "domains": ["*"], "routes": routes, **(vhost_extra or {})}]},
        "http_filters": [ROUTER],
    }
    names = ["primary", "shadow", "shadow-2", "shadow-3", "other_cluster"]
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "l",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
                    "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
                }
            ],
            "clusters": [cluster(n, 18000 + i) for i, n in enumerate(names)],
        }
    }


def convert_dict(data: dict[str, Any], suffix: str = ".yaml", **kwargs: Any) -> Conversion:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"envoy{suffix}"
        path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return convert_envoy([path], **kwargs)


GOOD = route("good", mirrors=[{"cluster": "shadow", "runtime_fraction": {"default_value": {"numerator": 10}}}])
FRACTION = {"runtime_fraction": {"default_value": {"numerator": 10, "denominator": "HUNDRED"}}}


@pytest.mark.parametrize(
    ("mirrors", "message"),
    [
        ([{"cluster_header": "x-shadow", **FRACTION}], "cluster_header 'x-shadow': the mirror goes to the cluster a request header names"),
        ([{"cluster": "shadow", "future_field": True, **FRACTION}], "unknown field(s) future_field: the sampler cannot tell"),
        (
            [{"cluster": "shadow", **FRACTION}, {"cluster": "shadow-2", **FRACTION}, {"cluster": "shadow-3", **FRACTION}],
            "3 mirrors but only 2 slot headers (convert with --slots 3 and run the sampler with MIRROR_SLOTS=3)",
        ),
        ([{"cluster": f"shadow-{i}", **FRACTION} for i in range(9)], "9 mirrors; the sampler has at most 8 slot headers"),
        ([{"cluster": "other_cluster", **FRACTION}], "cluster 'other_cluster' is not a lower-case DNS-1123 name"),
        ([{"cluster": "shadow", **FRACTION}, {"cluster": "shadow", **FRACTION}], "mirrors to 'shadow' twice"),
        ([{"cluster": "mirror-sampler", **FRACTION}], "cluster 'mirror-sampler' is the sampler's own cluster name"),
    ],
    ids=[
        "cluster_header",
        "unknown-field",
        "too-many-mirrors",
        "over-the-slot-bound",
        "not-dns-1123",
        "same-cluster-twice",
        "sampler-cluster",
    ],
)
def test_refused_mirrors_leave_their_route_as_it_was(mirrors: list[dict[str, Any]], message: str) -> None:
    refused = route("refused", mirrors=mirrors, timeout="7s")
    conversion = convert_dict(bootstrap([refused, GOOD]))
    notes = [n for n in conversion.notes if "route 'refused' left as it was" in n]
    assert len(notes) == 1 and message in notes[0], conversion.notes
    assert "virtual_hosts[0].routes[0]" in notes[0]
    routes = routes_of(managers(load_text(conversion.files["envoy.yaml"]))["l"])
    (kept,) = [r for r in routes if r["name"].startswith("refused")]
    assert {k: v for k, v in kept.items() if k != "typed_per_filter_config"} == refused
    assert kept["typed_per_filter_config"][SAMPLER_FILTER]["disabled"] is True
    assert "refused" not in conversion.files["policy.yaml"] and "good" in conversion.files["policy.yaml"]


def test_more_slots_take_more_mirrors() -> None:
    mirrors = [{"cluster": n, **FRACTION} for n in ("shadow", "shadow-2", "shadow-3")]
    conversion = convert_dict(bootstrap([route("three", mirrors=mirrors)]), slot_headers=SlotHeaders(count=3))
    routes = routes_of(managers(load_text(conversion.files["envoy.yaml"]))["l"])
    assert len(routes) == 8, "seven variants and the plain route"
    assert "MIRROR_SLOTS=3 mirror-sampler serve --config policy.yaml" in conversion.files["policy.yaml"]


def test_mirrors_of_a_whole_virtual_host_are_left_alone() -> None:
    vhost_mirrors = {"request_mirror_policies": [{"cluster": "shadow", **FRACTION}]}
    with pytest.raises(ConvertError) as e:
        convert_dict(bootstrap([GOOD], vhost_extra=vhost_mirrors))
    assert any("mirrors for a whole virtual host are not converted; virtual host 'vh' left as it was" in p for p in e.value.problems)
    assert any("nothing to convert" in p for p in e.value.problems)


def test_trace_sampled_is_kept_it_only_decides_the_shadow_span() -> None:
    """Envoy 1.40: trace_sampled says whether the shadow request's trace span
    is sampled, not whether the request is mirrored; the static policy keeps it."""
    conversion = convert_dict(bootstrap([route("t", mirrors=[{"cluster": "shadow", "trace_sampled": True, **FRACTION}])]))
    routes = routes_of(managers(load_text(conversion.files["envoy.yaml"]))["l"])
    (policy,) = routes[0]["route"]["request_mirror_policies"]
    assert policy["trace_sampled"] is True and "runtime_fraction" not in policy


def test_json_input(tmp_path: Path) -> None:
    (tmp_path / "routes.json").write_text(
        json.dumps({"resources": [{"@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration", "name": "rc", "virtual_hosts": [
            {"name": "vh", "domains": ["*"], "routes": [GOOD, route("plain")]}
        ]}]}),
        encoding="utf-8",
    )  # fmt: skip
    boot = bootstrap([])
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    del hcm["route_config"]
    hcm["rds"] = {"route_config_name": "rc", "config_source": {"path": str(tmp_path / "routes.json")}}
    boot["node"] = {"id": "n", "cluster": "c"}
    (tmp_path / "envoy.json").write_text(json.dumps(boot), encoding="utf-8")
    out = tmp_path / "out"
    conversion = convert_envoy([tmp_path / "envoy.json", tmp_path / "routes.json"], output_dir=out)
    assert set(conversion.files) == {"envoy.yaml", "routes.json", "policy.yaml"}
    rds = json.loads(conversion.files["routes.json"])
    names = [r["name"] for r in rds["resources"][0]["virtual_hosts"][0]["routes"]]
    assert names == ["good mirror shadow", "good", "plain"]
    converted_boot = load_text(conversion.files["envoy.yaml"])
    # The legacy config_source.path, pointed at the converted copy.
    assert managers(converted_boot)["l"]["rds"]["config_source"]["path"] == str(out / "routes.json")
    write(conversion, out)
    assert convert_envoy([out / "envoy.yaml"], output_dir=out).files == conversion.files


def test_camel_case_input_stays_camel_case() -> None:
    mirror = {"cluster": "shadow", "runtimeFraction": {"defaultValue": {"numerator": 5, "denominator": "TEN_THOUSAND"}}}
    routes = [{"name": "r", "match": {"prefix": "/"}, "route": {"cluster": "primary", "requestMirrorPolicies": [mirror]}}]
    manager = {
        "@type": HCM_TYPE,
        "statPrefix": "x",
        "httpFilters": [{"name": ROUTER["name"], "typedConfig": ROUTER["typed_config"]}],
        "routeConfig": {"name": "rc", "virtualHosts": [{"name": "vh", "domains": ["*"], "routes": routes}]},
    }
    chain = {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typedConfig": manager}]}
    camel = {
        "staticResources": {
            "listeners": [{"name": "l", "address": {"socketAddress": {"address": "127.0.0.1", "portValue": 1}}, "filterChains": [chain]}],
            "clusters": [cluster("primary", 18000), cluster("shadow", 18001)],
        }
    }  # fmt: skip
    conversion = convert_dict(camel)
    text = conversion.files["envoy.yaml"]
    assert "typed_per_filter_config" not in text and "typedPerFilterConfig" in text and "stringMatch" in text
    assert "numerator: 5\n          denominator: 10000" in conversion.files["policy.yaml"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("static_resources: [unclosed", "not valid YAML at line 1"),
        ("- a list", "must be a mapping (an Envoy bootstrap or RDS file), got list"),
        ("admin: {}", "static_resources: is required"),
        ("static_resources: {listeners: {a: 1}}", "static_resources.listeners: must be a list, got dict"),
    ],
)
def test_unparseable_input_names_the_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConvertError) as e:
        convert_envoy([path])
    assert any(p.startswith(f"{path}: ") and message in p for p in e.value.problems), e.value.problems


@pytest.mark.parametrize(
    ("fraction", "field", "message"),
    [
        ({"default_value": {"denominator": "THOUSAND"}}, "runtime_fraction.default_value.denominator", "must be HUNDRED, TEN_THOUSAND"),
        ({"default_value": {"numerator": -1}}, "runtime_fraction.default_value.numerator", "must be an integer 0..4294967295"),
        ({"default_value": {"numerator": 1, "extra": 1}}, "runtime_fraction.default_value.extra", "unknown field"),
        ({"runtime_key": 5}, "runtime_fraction.runtime_key", "must be a string"),
        ([], "runtime_fraction", "must be a mapping"),
    ],
)
def test_malformed_mirror_policies_name_the_field(fraction: Any, field: str, message: str) -> None:
    boot = bootstrap([route("r", mirrors=[{"cluster": "shadow", "runtime_fraction": fraction}])])
    with pytest.raises(ConvertError) as e:
        convert_dict(boot)
    route_path = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes[0]"
    path = f"{route_path}.route.request_mirror_policies[0].{field}"
    assert any(f"{path}: {message}" in p for p in e.value.problems), e.value.problems


def test_missing_rds_file_and_extra_bootstraps(tmp_path: Path) -> None:
    boot = bootstrap([])
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    del hcm["route_config"]
    hcm["rds"] = {"route_config_name": "rc", "config_source": {"path_config_source": {"path": "missing.yaml"}}}
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(boot), encoding="utf-8")
    with pytest.raises(ConvertError) as e:
        convert_envoy([path])
    assert any("rds.config_source.path_config_source.path: RDS file 'missing.yaml' not found" in p for p in e.value.problems)
    other = path.with_name("other.yaml")
    other.write_text("static_resources: {}", encoding="utf-8")
    with pytest.raises(ConvertError) as e:
        convert_envoy([path, other])
    assert "exactly one bootstrap" in str(e.value)


def test_an_unnamed_route_gets_variants_named_by_its_rule() -> None:
    unnamed = {k: v for k, v in GOOD.items() if k != "name"}
    conversion = convert_dict(bootstrap([unnamed]))
    routes = routes_of(managers(load_text(conversion.files["envoy.yaml"]))["l"])
    assert [r.get("name") for r in routes] == ["envoy/l-rc-vh/0 mirror shadow", None]
    assert rule_id_of(routes[1]) == "envoy/l-rc-vh/0"


def test_variant_routes_rendered_by_envoy_config_are_left_alone() -> None:
    variant = route("v", mirrors=[{"cluster": "shadow"}])
    variant["match"]["headers"] = [{"name": "x-mirror-cluster-0", "string_match": {"exact": "shadow"}}]
    conversion = convert_dict(bootstrap([variant, GOOD]))
    (note,) = [n for n in conversion.notes if "route 'v' left as it was" in n]
    assert "matches slot header(s) x-mirror-cluster-0: already a mirror-sampler variant route" in note


def test_several_samplers_are_endpoints_of_one_cluster(inputs: Path) -> None:
    conversion = convert_envoy([inputs / "envoy.yaml"], sampler=["127.0.0.1:50051", "127.0.0.2:50052"])
    clusters = {c["name"]: c for c in load_text(conversion.files["envoy.yaml"])["static_resources"]["clusters"]}
    endpoints = clusters["mirror-sampler"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == [50051, 50052]


@pytest.mark.parametrize("count", [0, 1, 2, 8, 9, 16])
def test_convert_envoy_takes_the_samplers_slot_count_bound(inputs: Path, count: int) -> None:
    """One bound (core.slots): a slot count the sampler refuses, convert envoy
    refuses too (it once took up to 16 while the sampler took 1..8)."""
    try:
        Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_SLOTS": str(count)})
        sampler_takes = True
    except ConfigError:
        sampler_takes = False
    try:
        convert_envoy([inputs / "envoy.yaml"], slot_headers=SlotHeaders(count=count))
        converter_takes = True
    except SlotHeadersError as e:
        assert e.field == "count" and "1..8" in str(e)
        converter_takes = False
    assert converter_takes == sampler_takes == (1 <= count <= 8)


# --------------------------------------------------------------------------
# Gateway API's limits: policy.yaml as check-config and the sampler read it


def check_config(text: str, **environ: str) -> Policy:
    """policy.yaml as `check-config` reads it (config.build: parse, then policy_from)."""
    return build_policy(Settings.load({**environ, "MIRROR_CONFIG": "policy.yaml"}), text)


def many_routes(count: int) -> list[dict[str, Any]]:
    """``count`` mirroring routes, each with its own fraction (i+1)/100, to tell their rules apart."""
    return [
        route(f"r{i}", mirrors=[{"cluster": "shadow", "runtime_fraction": {"default_value": {"numerator": i + 1}}}]) for i in range(count)
    ]


def weighted_route(name: str, count: int) -> dict[str, Any]:
    r = route(name, mirrors=[{"cluster": "shadow", **FRACTION}])
    del r["route"]["cluster"]
    r["route"]["weighted_clusters"] = {"clusters": [{"name": f"w-{i}", "weight": 1} for i in range(count)]}
    return r


def test_the_limits_are_the_ones_check_config_holds_policy_yaml_to() -> None:
    spec = schema.HTTPROUTE.fields["spec"]
    assert spec.fields["rules"].max_items == MAX_RULES_PER_ROUTE == 16
    assert spec.fields["rules"].items is not None
    assert spec.fields["rules"].items.fields["backendRefs"].max_items == MAX_BACKEND_REFS_PER_RULE == 16


def test_a_virtual_host_with_more_than_16_mirroring_routes_takes_more_httproutes() -> None:
    conversion = convert_dict(bootstrap(many_routes(MAX_RULES_PER_ROUTE + 4)))
    text = conversion.files["policy.yaml"]
    docs = list(yaml.safe_load_all(text))
    assert [(d["metadata"]["name"], len(d["spec"]["rules"])) for d in docs] == [("l-rc-vh", 16), ("l-rc-vh-2", 4)]
    assert "virtual host 'vh', continued (an HTTPRoute holds at most 16 rules)" in text
    policy = check_config(text)
    assert len(policy.rules) == MAX_RULES_PER_ROUTE + 4
    # Each Envoy route names the rule holding its own fraction, variants and markers alike.
    envoy_routes = routes_of(managers(load_text(conversion.files["envoy.yaml"]))["l"])
    for i in range(MAX_RULES_PER_ROUTE + 4):
        plain, variants = group(envoy_routes, f"r{i}")
        rule = policy.rules_by_id[rule_id_of(plain)]
        assert [(m.backend, m.fraction) for m in rule.mirrors] == [("shadow", Fraction(i + 1, 100))], rule.id
        assert ours(plain)["rule"] == rule.id
        for v in variants:
            assert rule_id_of(v) == ours(v)["rule"] == rule.id
            marker = v["route"]["request_mirror_policies"][0]["request_headers_mutations"][-1]["append"]["header"]
            assert marker == {"key": MARKER, "value": rule.id}
    assert rule_id_of(group(envoy_routes, "r15")[0]) == "envoy/l-rc-vh/15"
    assert rule_id_of(group(envoy_routes, "r16")[0]) == "envoy/l-rc-vh-2/0"


def test_a_route_over_16_weighted_clusters_names_one_backend_the_sampler_needs_no_more() -> None:
    """The sampler reads backendRefs only to know the rule has a live backend (a rule
    without one mirrors nothing): over Gateway API's 16, the first is written."""
    conversion = convert_dict(bootstrap([weighted_route("many", MAX_BACKEND_REFS_PER_RULE + 1), weighted_route("few", 3)]))
    text = conversion.files["policy.yaml"]
    (doc,) = yaml.safe_load_all(text)
    many, few = doc["spec"]["rules"]
    assert many["backendRefs"] == [{"name": "w-0"}]
    assert few["backendRefs"] == [{"name": f"w-{i}"} for i in range(3)], "under the limit, every cluster for reference"
    assert "route 'many' (virtual_hosts[0].routes[0]); backendRefs: the first of its 17 weighted clusters only" in text
    policy = check_config(text)
    assert all(rule.mirrors and rule.backends for rule in policy.rules), "both rules still mirror"


# --------------------------------------------------------------------------
# A lone value where Envoy takes a list (checked against Envoy by tests/service)


MUTATION = {"append": {"header": {"key": "x-shadow", "value": "b"}}}
TENANT = {"name": "x-tenant", "string_match": {"exact": "acme"}}


def lone_values_route() -> dict[str, Any]:
    """Envoy reads each of these as a list of one: a header name, one header matcher, one
    mirror policy, one header mutation."""
    mirror = {"cluster": "shadow", "request_headers_mutations": MUTATION, **FRACTION}
    return {
        "name": "lone",
        "match": {"prefix": "/lone", "headers": TENANT},
        "route": {"cluster": "primary", "request_mirror_policies": mirror},
        "request_headers_to_remove": "x-foo",
    }


def test_a_lone_value_where_envoy_takes_a_list_is_a_list_of_one(tmp_path: Path) -> None:
    source = lone_values_route()
    conversion = convert_dict(bootstrap([source]))
    routes = routes_of(managers(load_text(conversion.files["envoy.yaml"]))["l"])
    plain, (variant,) = group(routes, "lone")
    for r in (variant, plain):
        assert r["request_headers_to_remove"] == ["x-foo", *SLOTS], "x-foo is still removed"
    assert variant["match"]["headers"][0] == TENANT
    assert {h["name"] for h in variant["match"]["headers"][1:]} <= set(SLOTS)
    marker = {"append": {"header": {"key": MARKER, "value": rule_id_of(plain)}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}
    assert variant["route"]["request_mirror_policies"] == [{"cluster": "shadow", "request_headers_mutations": [MUTATION, marker]}]
    assert plain["match"] == source["match"], "the plain route's match as the user wrote it"
    assert ours(plain)["request_mirror_policies"] == source["route"]["request_mirror_policies"]
    out = tmp_path / "out"
    write(conversion, out)
    assert convert_envoy([out / "envoy.yaml"]).files == conversion.files


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"request_headers_to_remove": {"x-foo": 1}}, "request_headers_to_remove", "must be a string or a list of them, got dict"),
        ({"request_headers_to_remove": ["x-foo", 5]}, "request_headers_to_remove[1]", "must be a string, got int"),
        ({"match": {"prefix": "/", "headers": "x-tenant"}}, "match.headers", "must be a mapping or a list of them, got str"),
        ({"match": {"prefix": "/", "headers": [TENANT, "x-b"]}}, "match.headers[1]", "must be a mapping, got str"),
        (
            {"route": {"cluster": "primary", "request_mirror_policies": [{"cluster": "shadow", "request_headers_mutations": "x"}]}},
            "route.request_mirror_policies[0].request_headers_mutations",
            "must be a mapping or a list of them, got str",
        ),
        ({"route": {"cluster": "primary", "request_mirror_policies": "shadow"}}, "route.request_mirror_policies", "must be a mapping or"),
    ],
    ids=["remove-mapping", "remove-number", "headers-string", "headers-item-string", "mutations-string", "mirrors-string"],
)
def test_a_value_envoy_refuses_where_it_takes_a_list_names_the_field(change: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ConvertError) as e:
        convert_dict(bootstrap([{**lone_values_route(), **change}]))
    route_path = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes[0]"
    assert any(f"{route_path}.{field}: {message}" in p for p in e.value.problems), e.value.problems


# --------------------------------------------------------------------------
# A cluster of the user's named like the sampler's


def with_users_sampler_cluster(routes: list[dict[str, Any]]) -> dict[str, Any]:
    boot = bootstrap(routes)
    boot["static_resources"]["clusters"].append(cluster("mirror-sampler", 1))
    return boot


USERS_SAMPLER = "static_resources.clusters[5]"
ROUTES = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config.virtual_hosts[0].routes"


def to_sampler(name: str, weighted: bool = False) -> dict[str, Any]:
    r = route(name)
    if weighted:
        del r["route"]["cluster"]
        r["route"]["weighted_clusters"] = {"clusters": [{"name": "primary", "weight": 1}, {"name": "mirror-sampler", "weight": 1}]}
    else:
        r["route"]["cluster"] = "mirror-sampler"
    return r


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        ([to_sampler("p"), GOOD], [f"{ROUTES}[0]: route 'p' sends its requests to cluster 'mirror-sampler'"]),
        ([GOOD, to_sampler("w", weighted=True)], [f"{ROUTES}[1]: route 'w' sends its requests to cluster 'mirror-sampler'"]),
        ([GOOD, route("m", mirrors=[{"cluster": "mirror-sampler"}])], [f"{ROUTES}[1]: route 'm' mirrors to cluster 'mirror-sampler'"]),
        ([GOOD], [f"{USERS_SAMPLER}: cluster 'mirror-sampler' is a cluster of your own, not one an earlier conversion added"]),
    ],
    ids=["primary", "weighted", "mirror", "unused"],
)
def test_a_cluster_of_the_users_named_like_the_samplers_stops_the_conversion(routes: list[dict[str, Any]], expected: list[str]) -> None:
    with pytest.raises(ConvertError) as e:
        convert_dict(with_users_sampler_cluster(routes))
    assert len(e.value.problems) == len(expected), e.value.problems
    for problem, part in zip(e.value.problems, expected, strict=True):
        assert part in problem and f"envoy.yaml: {USERS_SAMPLER}" in problem and "rename your cluster" in problem, problem


def test_without_the_sampler_a_cluster_of_the_users_named_like_it_is_kept() -> None:
    """--inline: no sampler cluster is added, so the user's stays, and so do its routes."""
    boot = with_users_sampler_cluster([to_sampler("p"), GOOD])
    conversion = convert_dict(boot, lua=True)
    converted = load_text(conversion.files["envoy.yaml"])
    assert converted["static_resources"]["clusters"] == boot["static_resources"]["clusters"]
    (p,) = [r for r in routes_of(managers(converted)["l"]) if r["name"] == "p"]
    assert p["route"] == {"cluster": "mirror-sampler"}


def test_the_sampler_cluster_of_an_earlier_conversion_is_replaced_or_dropped(tmp_path: Path) -> None:
    first = convert_dict(bootstrap([GOOD]), output_dir=tmp_path)
    write(first, tmp_path)

    def samplers(conversion: Conversion) -> list[dict[str, Any]]:
        clusters = load_text(conversion.files["envoy.yaml"])["static_resources"]["clusters"]
        return [c for c in clusters if c["name"] == "mirror-sampler"]

    (before,) = samplers(first)
    (after,) = samplers(convert_envoy([tmp_path / "envoy.yaml"], output_dir=tmp_path, sampler="10.0.0.9:9000"))
    address = after["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert address == {"address": "10.0.0.9", "port_value": 9000} and before != after
    assert samplers(convert_envoy([tmp_path / "envoy.yaml"], output_dir=tmp_path, lua=True)) == []
