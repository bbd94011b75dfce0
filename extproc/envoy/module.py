"""Envoy configuration for the dynamic-module engine (``--inline module``).

The same route layout as the other engines (render.py: variant routes that match the
slot headers carry the static mirror policies), with the decision made by the C module
(extproc/module): one ``envoy.filters.http.dynamic_modules`` filter on every route,
which strips client-sent slot and marker headers, and on each route of a mirror rule
the rule itself as per-route configuration, so Envoy's own route match picks it. The
configuration is data: JSON derived here from the compiled Policy (nothing generated
per rule is code), read by extproc/module/decision.c. Pure but for nothing: text in,
messages out.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from typing import Any

from betterproto2 import Casing

from ..core.policy import Policy, Rule, target_salt
from ..core.slots import SlotHeaders
from . import lua as scripts
from . import render

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import envoy_data_plane.envoy.config.core.v3 as core
    import envoy_data_plane.envoy.config.metrics.v3 as metrics
    import envoy_data_plane.envoy.config.route.v3 as route
    import envoy_data_plane.envoy.extensions.dynamic_modules.v3 as dynamic_modules
    import envoy_data_plane.envoy.extensions.filters.http.dynamic_modules.v3 as module_filter
    import envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 as hcm
    from envoy_data_plane.google.protobuf import Any as AnyMessage
    from envoy_data_plane.google.protobuf import StringValue

MODULE_FILTER = "mirror-sampler.module"
MODULE_NAME = "mirror_sampler"
# Where docker compose's Envoy finds the module (docker-compose.module.yml installs it there from the Dockerfile's module stage).
COMPOSE_MODULE_PATH = "/etc/envoy/module/libmirror_sampler.so"


# The module's decision counter, labelled (rule, target, outcome): Envoy writes it as
# <namespace>.mirror_sampler_decisions.rule.<id>.target.<cluster>.outcome.<outcome>.
# A labelled increment costs Envoy a stat lookup by name on every request (about 5,000
# instructions: bench/module_instructions.py), so the module defines the counters of the
# (rule, target) pairs its filter config lists ("counted") up front, without labels, under
# that same name; these tags, in the bootstrap, give them back the same labels, so
# /stats and /stats/prometheus read alike either way. Rules that appear later (a live
# edit) or in a config we do not own (the snippet, converters) keep the labelled counter.
_DECISIONS = r"^dynamicmodulescustom\.mirror_sampler_decisions"
STATS_TAGS = (
    ("rule", _DECISIONS + r"(\.rule\.(.+?))\.target\."),
    ("target", _DECISIONS + r"\.rule\..+?(\.target\.(.+?))\.outcome\.[^.]+$"),
    ("outcome", _DECISIONS + r"\.rule\..+?(\.outcome\.([^.]+))$"),
)


# The module refuses a filter config listing more (MS_MAX_COUNTED, extproc/module/decision.h).
MAX_COUNTED = 4096


def tag_safe(rule_id: str) -> bool:
    """Whether STATS_TAGS read the rule's and its targets' labels back from the counter's name
    "...rule.<rule_id>.target.<cluster>.outcome.<o>": the rule's tag ends at the first
    ".target." after it, which must be the separator (a rule id ending in ".target"
    would end it early); the target's tag ends at the last ".outcome.", always the
    separator (outcomes hold no dot), so any cluster name reads back."""
    return ".target." not in rule_id + "."


def counted(policy: Policy) -> list[dict[str, Any]]:
    """The (rule, cluster) pairs whose counters the filter defines up front: the first
    MAX_COUNTED, in rule order; the others keep the labelled counter."""
    pairs: list[dict[str, Any]] = []
    room = MAX_COUNTED
    for rule in policy.rules:
        if not tag_safe(rule.id):
            continue
        clusters = list(dict.fromkeys(t.backend for t in rule.mirrors))[:room]
        if clusters:
            pairs.append({"rule": rule.id, "clusters": clusters})
            room -= len(clusters)
    return pairs


def stats_config() -> metrics.StatsConfig:
    return metrics.StatsConfig(stats_tags=[metrics.TagSpecifier(tag_name=name, regex=regex) for name, regex in STATS_TAGS])


def filter_settings(policy: Policy, *, count: bool = True) -> dict[str, Any]:
    """The filter-level configuration: the headers that are the filter's alone, and
    (``count``: where the bootstrap carries STATS_TAGS) the counters to define."""
    settings = slot_settings(policy.slot_headers)
    if count:
        settings["counted"] = counted(policy)
    return settings


def slot_settings(slot_headers: SlotHeaders) -> dict[str, Any]:
    return {"slot_headers": list(slot_headers.names), "marker_header": slot_headers.marker}


def rule_settings(policy: Policy, rule: Rule) -> dict[str, Any]:
    """One rule as the module decides it (policy.gate, keys.extract_key, target_salt,
    in_sample and the rate cap). Salts travel as hex: they are bytes. The threshold is
    Fraction.threshold, up to 2**64 (every key), as a decimal string: a JSON number that
    large would not survive a double (Envoy Gateway passes configs as Structs)."""
    return {
        "rule": rule.id,
        "enabled": policy.enabled,
        "methods": sorted(rule.methods),
        "key_chain": [{"kind": s.kind.value, "name": s.name} for s in policy.key_chain],
        "max_mirrors_per_second": rule.max_mirrors_per_second,
        "targets": [
            {
                "slot": policy.slot_names[t.slot],
                "cluster": t.backend,
                "salt_hex": target_salt(policy.salt, t).hex(),
                "threshold": str(t.threshold),
            }
            for t in rule.mirrors
        ],
    }


def to_json(settings: dict[str, Any]) -> str:
    return json.dumps(settings, separators=(",", ":"), ensure_ascii=True)


def _module(path: str) -> dynamic_modules.DynamicModuleConfig:
    return dynamic_modules.DynamicModuleConfig(name=MODULE_NAME, module=core.AsyncDataSource(local=core.DataSource(filename=path)))


def _text(text: str) -> AnyMessage:
    return AnyMessage.pack(StringValue(value=text))


def http_filter(policy: Policy, module_path: str, *, count: bool = True) -> hcm.HttpFilter:
    return _http_filter(filter_settings(policy, count=count), module_path)


def slot_http_filter(slot_headers: SlotHeaders, module_path: str) -> hcm.HttpFilter:
    return _http_filter(slot_settings(slot_headers), module_path)


def _http_filter(settings: dict[str, Any], module_path: str) -> hcm.HttpFilter:
    """The module's filter on the connection manager: it strips client-sent slot and
    marker headers everywhere, and decides where a route carries a rule."""
    config = module_filter.DynamicModuleFilter(
        dynamic_module_config=_module(module_path), filter_name=MODULE_NAME, filter_config=_text(to_json(settings))
    )
    return hcm.HttpFilter(name=MODULE_FILTER, typed_config=AnyMessage.pack(config))


def per_route(policy: Policy, rule: Rule, module_path: str) -> AnyMessage:
    config = module_filter.DynamicModuleFilterPerRoute(
        dynamic_module_config=_module(module_path),
        filter_name=MODULE_NAME,
        filter_config=_text(to_json(rule_settings(policy, rule))),
    )
    return AnyMessage.pack(config)


def virtual_hosts(policy: Policy, module_path: str, catch_all: bool = True) -> list[route.VirtualHost]:
    """render's routes for in-Envoy deciding, each rule's decision handed to the module
    instead of a script: where render attaches the rule's Lua, the rule's settings go."""
    hosts = []
    for hostname, entries in policy.table.vhosts:
        routes = []
        for entry in entries:
            for r in render.rule_routes(entry.rule, entry.match, policy, in_envoy=True):
                if r.typed_per_filter_config and scripts.DECIDE_FILTER in r.typed_per_filter_config:
                    r.typed_per_filter_config = {MODULE_FILTER: per_route(policy, entry.rule, module_path)}
                routes.append(r)
        hosts.append(route.VirtualHost(name=hostname or "any-host", domains=[hostname or "*"], routes=routes))
    if catch_all and not any(h.domains == ["*"] for h in hosts):
        hosts.append(route.VirtualHost(name="any-host", domains=["*"], routes=[]))
    return hosts


def route_configuration(policy: Policy, module_path: str) -> route.RouteConfiguration:
    config = render.route_configuration(policy, in_envoy=True)
    config.virtual_hosts = virtual_hosts(policy, module_path)
    return config


def http_connection_manager(policy: Policy, topology: render.Topology, module_path: str) -> hcm.HttpConnectionManager:
    manager = render.http_connection_manager(policy, replace(topology, inline=True))
    manager.http_filters = [http_filter(policy, module_path), manager.http_filters[-1]]
    if manager.route_config is not None:
        manager.route_config = route_configuration(policy, module_path)
    return manager


def bootstrap_config(policy: Policy, topology: render.Topology, module_path: str) -> Any:
    config = render.bootstrap_config(policy, replace(topology, inline=True))
    assert config.static_resources is not None
    chain = config.static_resources.listeners[0].filter_chains[0]
    chain.filters[0].typed_config = AnyMessage.pack(http_connection_manager(policy, topology, module_path))
    config.stats_config = stats_config()
    return config


def route_discovery(policy: Policy, module_path: str) -> dict[str, Any]:
    """The file behind filesystem RDS (``up``'s live reload)."""
    return {"resources": [AnyMessage.pack(route_configuration(policy, module_path)).to_dict()]}


def snippet(policy: Policy, topology: render.Topology, module_path: str) -> dict[str, Any]:
    return {
        "http_filters": [render.as_data(http_filter(policy, module_path, count=False), Casing.SNAKE)],
        "clusters": [],
        "virtual_hosts": [render.as_data(v, Casing.SNAKE) for v in virtual_hosts(policy, module_path, catch_all=False)],
    }


def render_module(policy: Policy, topology: render.Topology, module_path: str, *, snippet_only: bool = False) -> str:
    if snippet_only:
        return render.to_yaml(snippet(policy, topology, module_path), SNIPPET_COMMENT)
    return render.to_yaml(bootstrap_config(policy, topology, module_path))


SNIPPET_COMMENT = """\
# Paste into an existing Envoy (1.39 or 1.40):
#  - http_filters: ahead of envoy.filters.http.router; it loads the dynamic module
#    from the path shown (built by mirror-sampler for this machine);
#  - virtual_hosts: the routes, each mirror-carrying rule preceded by its variant
#    routes, the rule's decision settings on each; the backend clusters they name
#    must exist. No sampler cluster: Envoy decides.
"""
