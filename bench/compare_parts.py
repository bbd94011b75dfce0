"""The parts of the rendered `on` configuration (``render_with_capture``),
each taken out on its own: what `bench/compare_instructions.py --parts`
counts under callgrind and `bench/compare_cost.py --parts` times. Each takes
and returns the configuration as data (camelCase, as rendered)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.testbed import MIRROR
from bench.variants import listener_manager
from extproc.compare.envoy import CAPTURE_FILTER, CAPTURE_LISTENER, TARGET_HEADER

Config = dict[str, Any]


def _capture_filter(manager: Config) -> Config:
    found: Config = next(f for f in manager["httpFilters"] if f["name"] == CAPTURE_FILTER)
    return found


def _variant_route(config: Config) -> Config:
    routes = listener_manager(config, "ingress")["routeConfig"]["virtualHosts"][0]["routes"]
    found: Config = next(r for r in routes if " mirror " in r["name"])
    return found


def no_primary_capture(config: Config) -> Config:
    del _variant_route(config)["typedPerFilterConfig"][CAPTURE_FILTER]
    return config


def no_shadow_capture(config: Config) -> Config:
    manager = listener_manager(config, CAPTURE_LISTENER)
    manager["httpFilters"].remove(_capture_filter(manager))
    return config


def no_hop(config: Config) -> Config:
    for policy in _variant_route(config)["route"]["requestMirrorPolicies"]:
        policy["cluster"] = MIRROR
        policy["requestHeadersMutations"] = [m for m in policy["requestHeadersMutations"] if m["append"]["header"]["key"] != TARGET_HEADER]
    return config


PARTS: dict[str, Callable[[Config], Config]] = {
    "no-primary-capture": no_primary_capture,
    "no-shadow-capture": no_shadow_capture,
    "no-hop": no_hop,
}
