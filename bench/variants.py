"""The rows bench/run.py measures (``variants()``), each an Envoy
configuration for the same policy and topology: native mirroring, the
sampler, the free processor, inline Lua."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import yaml

from bench.testbed import DEFAULT_TRANSPORT, Variant
from extproc.core.policy import SAMPLER_CLUSTER, Policy
from extproc.envoy.render import Topology, render


class Keys:
    """Field names of one Envoy configuration document in its own casing.

    render() writes camelCase today; Envoy accepts snake_case too, and render
    may switch. Detected once per document from the top-level key."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.snake = "static_resources" in config

    def __call__(self, snake_name: str) -> str:
        if self.snake:
            return snake_name
        head, *rest = snake_name.split("_")
        return head + "".join(part.title() for part in rest)


_DENOMINATORS = {100: "HUNDRED", 10_000: "TEN_THOUSAND", 1_000_000: "MILLION"}


def runtime_fraction(numerator: int, denominator: int, k: Keys) -> dict[str, Any]:
    if denominator not in _DENOMINATORS:  # Envoy has three denominators: the nearest per-million
        numerator, denominator = round(numerator * 1_000_000 / denominator), 1_000_000
    return {k("default_value"): {"numerator": numerator, "denominator": _DENOMINATORS[denominator]}}


def hcm_configs(config: dict[str, Any], k: Keys) -> list[dict[str, Any]]:
    """Every http_connection_manager's typed_config in the document."""
    out = []
    for lst in config[k("static_resources")].get("listeners", []):
        for chain in lst.get(k("filter_chains"), []):
            for f in chain.get("filters", []):
                if f.get("name") == "envoy.filters.network.http_connection_manager":
                    out.append(f[k("typed_config")])
    return out


def listener_manager(config: dict[str, Any], listener: str) -> dict[str, Any]:
    """The http_connection_manager typed_config of the named listener (its one filter chain)."""
    k = Keys(config)
    (entry,) = (e for e in config[k("static_resources")]["listeners"] if e["name"] == listener)
    manager: dict[str, Any] = entry[k("filter_chains")][0]["filters"][0][k("typed_config")]
    return manager


def native_yaml(policy: Policy, topology: Topology) -> str:
    """The sampler's configuration with the sampler taken out.

    Relies only on documented facts: the plain route of each rule is named by
    the rule id (routes with other names, the sampler's variants, go); each rule
    with mirrors gets ``request_mirror_policies`` built from its own
    MirrorTargets (cluster = backend, ``runtime_fraction`` = fraction), with the
    same Host handling and marker header the sampler's mirrored copies carry.
    """
    config: dict[str, Any] = yaml.safe_load(render(policy, topology))
    k = Keys(config)
    resources = config[k("static_resources")]
    resources["clusters"] = [c for c in resources.get("clusters", []) if c.get("name") != SAMPLER_CLUSTER]
    rules = {r.id: r for r in policy.rules}
    for manager in hcm_configs(config, k):
        manager[k("http_filters")] = [h for h in manager[k("http_filters")] if h.get("name") == "envoy.filters.http.router"]
        for vhost in manager[k("route_config")].get(k("virtual_hosts"), []):
            kept = []
            for r in vhost.get("routes", []):
                rule = rules.get(r.get("name", ""))
                if rule is None:
                    continue
                r.pop(k("typed_per_filter_config"), None)
                action = r.get("route")
                if rule.mirrors and action is not None:
                    action[k("request_mirror_policies")] = [
                        {
                            "cluster": target.backend,
                            k("runtime_fraction"): runtime_fraction(target.fraction.numerator, target.fraction.denominator, k),
                            k("disable_shadow_host_suffix_append"): True,
                            k("request_headers_mutations"): [
                                {
                                    "append": {
                                        "header": {"key": policy.slot_headers.marker, "value": rule.id},
                                        k("append_action"): "OVERWRITE_IF_EXISTS_OR_ADD",
                                    }
                                }
                            ],
                        }
                        for target in rule.mirrors
                    ]
                kept.append(r)
            vhost["routes"] = kept
    return yaml.safe_dump(config, sort_keys=False)


def without_sampler_health_check(rendered: str) -> str:
    """render()'s configuration with the sampler cluster's health check removed
    (the free processor has no health service; without a check Envoy takes
    the host as healthy)."""
    config: dict[str, Any] = yaml.safe_load(rendered)
    k = Keys(config)
    for c in config[k("static_resources")].get("clusters", []):
        if c.get("name") == SAMPLER_CLUSTER:
            c.pop(k("health_checks"), None)
    return yaml.safe_dump(config, sort_keys=False)


def free_processor_yaml(policy: Policy, topology: Topology) -> str:
    return without_sampler_health_check(render(policy, topology))


def inline_yaml(policy: Policy, topology: Topology) -> str:
    return render(policy, replace(topology, inline=True))


def module_yaml(policy: Policy, topology: Topology) -> str:
    """The dynamic module deciding in Envoy (`--inline module`), built here
    for the installed Envoy (the version guard first)."""
    from extproc.envoy.module import render_module
    from extproc.module.support import module_for_installed_envoy

    return render_module(policy, topology, module_for_installed_envoy())


def variants(transports: list[str], workers: list[int], free: bool) -> list[Variant]:
    out = [Variant("native", native_yaml)]
    out += [Variant(f"sampler-{t}", render, "sampler", 1, t) for t in transports]
    out += [Variant(f"sampler-w{w}", render, "sampler", w, DEFAULT_TRANSPORT) for w in workers if w != 1]
    if free:
        out.append(Variant("free-processor", free_processor_yaml, "free"))
    out.append(Variant("inline", inline_yaml))
    out.append(Variant("module", module_yaml))
    return out
