"""The parts of the rendered `on` configuration (``render_with_capture``),
each taken out on its own: what `bench/compare_instructions.py --parts`
counts under callgrind and `bench/compare_cost.py --parts` times. Each takes
and returns the configuration as data (camelCase, as rendered)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from bench.access_log import upstream_lua_filters
from bench.testbed import MIRROR
from bench.variants import listener_manager
from extproc.compare.envoy import CAPTURE_FILTER, CAPTURE_LISTENER, LIMIT_FIELD, TARGET_HEADER
from extproc.compare.records import CAPTURE_NAMESPACE, TAG_FIELD

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


# The shadow captured without the internal listener's pass (docs/compare.md "Not
# done yet"): a measurement of that way forward, not what the observers read.
UPSTREAM_CAPTURE_HEADER = "x-mirror-sampler-capture"
UPSTREAM_CAPTURE_CLUSTER = f"{MIRROR}-compare"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
# The same work as CAPTURE_LUA's (every header, the body up to the bound, base64),
# the shadow's body buffered (Envoy's buffer limit, the cluster's, bounds it) and
# the result put into a response header the router's upstream_log logs: an upstream
# filter's dynamic metadata is the async stream's, which no log sees.
UPSTREAM_CAPTURE_LUA = """
function envoy_on_response(handle)
  local lines = {}
  for name, value in pairs(handle:headers()) do
    lines[#lines + 1] = name .. ": " .. value
  end
  local body, kept, truncated = handle:body(), "", false
  if body ~= nil then
    local length = body:length()
    kept = body:getBytes(0, math.min(length, BODY_LIMIT))
    truncated = length > BODY_LIMIT
  end
  local fields = handle:base64Escape(table.concat(lines, "\\n")) .. " " .. handle:base64Escape(kept)
  handle:headers():add("HEADER", truncated and fields .. " t" or fields)
end
"""


def upstream_capture(config: Config) -> Config:
    """`on` with the shadow's side captured by a Lua upstream filter of a cluster of its
    own (a copy of the target's, so the target's cluster stays as it was) and logged by
    the ingress router's ``upstream_log`` (compared copies only: they carry the target
    header), instead of the internal listener's pass and its capture filter; the
    primary's side as in `on`. The internal listener stays, unused."""
    manager = listener_manager(config, "ingress")
    (hcm_log,) = (entry for entry in manager["accessLog"] if entry["name"] == "envoy.access_loggers.http_grpc")
    shadow_manager = listener_manager(config, CAPTURE_LISTENER)
    shadow_route = shadow_manager["routeConfig"]["virtualHosts"][0]["routes"][0]
    marker = shadow_route["match"]["headers"][0]["name"]
    body_limit = int(shadow_route["metadata"]["filterMetadata"][CAPTURE_FILTER][LIMIT_FIELD])
    for policy in _variant_route(config)["route"]["requestMirrorPolicies"]:
        policy["cluster"] = UPSTREAM_CAPTURE_CLUSTER
    clusters = config["staticResources"]["clusters"]
    (target,) = (c for c in clusters if c["name"] == MIRROR)
    own = copy.deepcopy(target)
    own["name"] = own["loadAssignment"]["clusterName"] = UPSTREAM_CAPTURE_CLUSTER
    script = UPSTREAM_CAPTURE_LUA.replace("BODY_LIMIT", str(body_limit)).replace("HEADER", UPSTREAM_CAPTURE_HEADER)
    http1 = {"@type": f"type.googleapis.com/{HTTP_OPTIONS}", "explicitHttpConfig": {"httpProtocolOptions": {}}}
    options = own.setdefault("typedExtensionProtocolOptions", {}).setdefault(HTTP_OPTIONS, http1)
    options["httpFilters"] = upstream_lua_filters(script)
    clusters.append(own)
    shadow_log = copy.deepcopy(hcm_log)
    shadow_log["filter"] = {"headerFilter": {"header": {"name": TARGET_HEADER, "presentMatch": True}}}
    logged = shadow_log["typedConfig"]
    logged["additionalRequestHeadersToLog"] = [*logged.get("additionalRequestHeadersToLog", []), marker, TARGET_HEADER]
    logged["additionalResponseHeadersToLog"] = [UPSTREAM_CAPTURE_HEADER]
    router = next(f for f in manager["httpFilters"] if f["name"] == "envoy.filters.http.router")
    router["typedConfig"].setdefault("upstreamLog", []).append(shadow_log)
    return config


# The Lua filter's own cost on the primary's path, without the script's work:
# the tag alone (the access log still logs the entry, with no headers or body).
TAG_ONLY_SCRIPT = "tag-only"
TAG_ONLY_LUA = f"""
function envoy_on_response(handle)
  local tag = handle:metadata():get("{TAG_FIELD}")
  if tag ~= nil then
    handle:streamInfo():dynamicMetadata():set("{CAPTURE_NAMESPACE}", "{TAG_FIELD}", tag)
  end
end
"""


def primary_tag_only(config: Config) -> Config:
    """`on` with the primary's capture script reduced to setting the tag (the shadow's
    as in `on`): the Lua filter's machinery on the primary's path without its work."""
    manager = listener_manager(config, "ingress")
    capture = _capture_filter(manager)["typedConfig"]
    capture["sourceCodes"][TAG_ONLY_SCRIPT] = {"inlineString": TAG_ONLY_LUA}
    _variant_route(config)["typedPerFilterConfig"][CAPTURE_FILTER]["name"] = TAG_ONLY_SCRIPT
    return config


# `on` with one part done another way.
ALTERNATIVES: dict[str, Callable[[Config], Config]] = {
    "upstream-capture": upstream_capture,
    "primary-tag-only": primary_tag_only,
}
# Every edit of `on` by name, the parts' and the alternatives'.
EDITS: dict[str, Callable[[Config], Config]] = {**PARTS, **ALTERNATIVES}
