"""The module engine's configuration (pure): settings from the Policy, the routes that
carry them, the Envoy version guard, the --inline option."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from extproc.config.build import build_policy
from extproc.config.settings import Settings, parse_inline
from extproc.core.keys import parse_key_chain
from extproc.core.matching import Match
from extproc.core.policy import BackendRef, MirrorTarget, Policy, Route, Rule
from extproc.core.sampling import Fraction
from extproc.core.slots import SlotHeaders
from extproc.envoy import module
from extproc.envoy.lua import DECIDE_FILTER
from extproc.envoy.render import Topology, as_data, route_configuration
from extproc.module.support import SUPPORTED, UnsupportedEnvoy, check_supported, parse_version
from tests.support.paths import CONFORMANCE

SO = "/cache/libmirror_sampler-test.so"


def conformance(**env: str) -> Policy:
    return build_policy(Settings.load({"MIRROR_CONFIG": str(CONFORMANCE), **env}), CONFORMANCE.read_text())


def test_rule_settings_carry_the_decision() -> None:
    targets = (MirrorTarget("a", Fraction(35), 0), MirrorTarget("b", Fraction(100), 1, salt=b"\x00\xff"))
    rule = Rule("ns/r/0", (Match(),), targets, (BackendRef("web"),), methods=frozenset({"POST", "GET"}), max_mirrors_per_second=2.5)
    policy = Policy((Route("ns", "r", (), (rule,)),), parse_key_chain("cookie:s,traceparent"), salt=b"v2", enabled=False)
    settings = json.loads(module.to_json(module.rule_settings(policy, rule)))
    assert settings == {
        "rule": "ns/r/0",
        "enabled": False,
        "methods": ["GET", "POST"],
        "key_chain": [{"kind": "cookie", "name": "s"}, {"kind": "traceparent", "name": ""}],
        "max_mirrors_per_second": 2.5,
        "targets": [
            {"slot": "x-mirror-cluster-0", "cluster": "a", "salt_hex": "7632", "threshold": str(Fraction(35).threshold)},
            {"slot": "x-mirror-cluster-1", "cluster": "b", "salt_hex": "00ff", "threshold": str(2**64)},
        ],
    }
    assert module.filter_settings(policy) == {
        "slot_headers": ["x-mirror-cluster-0", "x-mirror-cluster-1"],
        "marker_header": "x-mirror-rule",
        "counted": [{"rule": "ns/r/0", "clusters": ["a", "b"]}],
    }
    assert "counted" not in module.filter_settings(policy, count=False)


def test_counted_pairs_are_those_the_stats_tags_read_back() -> None:
    """A rule id holding ".target." or ending in ".target" would be cut at the wrong
    place by STATS_TAGS: those keep the labelled counter; any cluster name reads back.
    Two targets on one cluster share its counters (the labels are the same)."""
    targets = (
        MirrorTarget("a", Fraction(35), 0),
        MirrorTarget("a", Fraction(5), 1, salt=b"x"),
        MirrorTarget("x.outcome.y", Fraction(5), 2),
    )
    rules = (
        Rule("ns/r/0", (Match(),), targets, (BackendRef("web"),)),
        Rule("ns/r.target.v2/0", (Match(),), targets[:1], (BackendRef("web"),)),
        Rule("ns/r.target", (Match(),), targets[:1], (BackendRef("web"),)),
        Rule("ns/plain/0", (Match(),), (), (BackendRef("web"),)),
    )
    policy = Policy((Route("ns", "r", (), rules),), parse_key_chain("header:x-user"), slot_headers=SlotHeaders(count=3))
    assert module.counted(policy) == [{"rule": "ns/r/0", "clusters": ["a", "x.outcome.y"]}]


def test_counted_pairs_stop_at_the_modules_limit() -> None:
    """Past MAX_COUNTED pairs (the module refuses a longer list), rules keep the
    labelled counter instead of making Envoy refuse the configuration."""
    targets = tuple(MirrorTarget(f"t{i}", Fraction(5), i) for i in range(3))
    rules = tuple(Rule(f"ns/r/{i}", (Match(),), targets, (BackendRef("web"),)) for i in range(module.MAX_COUNTED // 3 + 2))
    policy = Policy((Route("ns", "r", (), rules),), parse_key_chain("header:x-user"), slot_headers=SlotHeaders(count=3))
    pairs = module.counted(policy)
    assert sum(len(p["clusters"]) for p in pairs) == module.MAX_COUNTED
    assert pairs[-1] == {"rule": f"ns/r/{module.MAX_COUNTED // 3}", "clusters": ["t0"]}


def test_the_limit_is_the_modules() -> None:
    header = (Path(module.__file__).parents[1] / "module" / "decision.h").read_text()
    assert f"#define MS_MAX_COUNTED {module.MAX_COUNTED}\n" in header


@pytest.mark.parametrize(
    ("rule_id", "cluster"),
    [
        ("ns/r/0", "shadow"),
        ("a.b/c.d/1", "svc.ns.svc.cluster.local"),
        ("x.outcome.y", "t.target.u"),
        ("r", "c.outcome"),
        ("target.x", "a.outcome.b"),
        ("r.", "c.outcome.mirrored"),
        (".rule.x", ".target."),
    ],
)
def test_stats_tags_read_the_labels_back_from_the_counter_name(rule_id: str, cluster: str) -> None:
    """What Envoy's tag extraction does with STATS_TAGS (the first group is cut from the
    name, the second is the value), on the name the module gives a counted counter."""
    assert module.tag_safe(rule_id)
    for outcome in ("mirrored", "no_key"):
        name = f"dynamicmodulescustom.mirror_sampler_decisions.rule.{rule_id}.target.{cluster}.outcome.{outcome}"
        tags, cut = {}, []
        for tag, regex in module.STATS_TAGS:
            found = re.search(regex, name)
            assert found is not None, tag
            tags[tag] = found.group(2)
            cut.append(found.span(1))
        assert tags == {"rule": rule_id, "target": cluster, "outcome": outcome}
        rest = "".join(c for i, c in enumerate(name) if not any(a <= i < b for a, b in cut))
        assert rest == "dynamicmodulescustom.mirror_sampler_decisions"


@pytest.mark.parametrize("rule_id", ["ns/r.target.v2/0", "x.target", "a.target.target"])
def test_rule_ids_the_tags_would_cut_wrongly_are_not_tag_safe(rule_id: str) -> None:
    name = f"dynamicmodulescustom.mirror_sampler_decisions.rule.{rule_id}.target.c.outcome.mirrored"
    found = re.search(dict(module.STATS_TAGS)["rule"], name)
    assert found is not None and found.group(2) != rule_id
    assert not module.tag_safe(rule_id)


def per_route_filters(config: Any) -> list[dict[str, Any]]:
    data = as_data(config)
    return [r.get("typedPerFilterConfig", {}) for vh in data["virtualHosts"] for r in vh.get("routes", [])]


def test_the_module_decides_exactly_where_the_lua_would() -> None:
    """The same routes as the Lua engine, each rule's script swapped for its settings."""
    policy = conformance(MIRROR_SALT="s")
    lua_routes = per_route_filters(route_configuration(policy, in_envoy=True))
    module_routes = per_route_filters(module.route_configuration(policy, SO))
    assert len(lua_routes) == len(module_routes)
    rules = {r.id: r for r in policy.rules}
    for lua, mod in zip(lua_routes, module_routes, strict=True):
        assert (DECIDE_FILTER in lua) == (module.MODULE_FILTER in mod)
        if module.MODULE_FILTER in mod:
            per_route = mod[module.MODULE_FILTER]
            assert per_route["dynamicModuleConfig"]["module"]["local"]["filename"] == SO
            settings = json.loads(per_route["filterConfig"]["value"])
            assert settings == module.rule_settings(policy, rules[settings["rule"]])


def test_bootstrap_runs_the_module_before_the_router_and_no_sampler() -> None:
    policy = conformance()
    data = as_data(module.bootstrap_config(policy, Topology(), SO))
    hcm = data["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
    assert [f["name"] for f in hcm["httpFilters"]] == [module.MODULE_FILTER, "envoy.filters.http.router"]
    assert json.loads(hcm["httpFilters"][0]["typedConfig"]["filterConfig"]["value"]) == module.filter_settings(policy)
    assert [(t["tagName"], t["regex"]) for t in data["statsConfig"]["statsTags"]] == list(module.STATS_TAGS)
    assert "mirror-sampler" not in [c["name"] for c in data["staticResources"]["clusters"]]
    rds = module.route_discovery(policy, SO)
    assert rds["resources"][0]["virtualHosts"] == as_data(module.route_configuration(policy, SO))["virtualHosts"]


@pytest.mark.parametrize("version", ["1.39.0", "1.39.3", "1.40.0", "1.40.7"])
def test_supported_versions(version: str) -> None:
    check_supported(version)


@pytest.mark.parametrize("version", ["1.38.3", "1.36.4", "1.41.0", "2.0.0"])
def test_unsupported_version_names_it_and_the_alternatives(version: str) -> None:
    with pytest.raises(UnsupportedEnvoy) as e:
        check_supported(version)
    message = str(e.value)
    assert version in message and "--inline lua" in message and "ext_proc" in message
    assert all(v in message for v in SUPPORTED)


def test_version_from_envoy_version_output() -> None:
    text = "\nenvoy  version: 9e5580933739775e8bce696a57a2e1bc99368f23/1.40.0/Clean/RELEASE/BoringSSL\n\n"
    assert parse_version(text) == "1.40.0"
    with pytest.raises(UnsupportedEnvoy, match="cannot read"):
        parse_version("command not found")


@pytest.mark.parametrize(
    ("text", "engine"), [("off", ""), ("on", "lua"), ("yes", "lua"), ("lua", "lua"), ("module", "module"), ("Module", "module")]
)
def test_inline_option(text: str, engine: str) -> None:
    assert parse_inline(text) == engine


def test_inline_option_refuses_other_engines() -> None:
    with pytest.raises(ValueError, match=r"off, on .* lua or module"):
        parse_inline("wasm")
