"""A model of what Istio makes of a VirtualService and an EnvoyFilter for a proxy, enough
for the tests' VirtualServices: Envoy routes named and laid out as istiod does
(pilot/pkg/networking/core/route/route.go: BuildHTTPRoutesForVirtualService,
TranslateRoute) and the EnvoyFilter patches `convert istio --inline module` writes applied
as istiod applies them (pilot/pkg/networking/core/envoyfilter: HTTP_FILTER INSERT_BEFORE
the matched filter, HTTP_ROUTE MERGE into every route of the matched name). Not Istio:
what it checks is that the converter's names and values fit this layout."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

CLUSTER_DOMAIN = "cluster.local"


def envoy_route_names(route: dict[str, Any]) -> list[str]:
    """One Envoy route per match entry, "<route name>.<entry name>" for a named entry."""
    name = route.get("name", "")
    return [f"{name}.{m['name']}" if m.get("name") else name for m in route.get("match") or [{}]]


def fqdn(host: str, namespace: str) -> str:
    return host if "." in host else f"{host}.{namespace}.svc.{CLUSTER_DOMAIN}"


def cluster_name(destination: dict[str, Any], namespace: str, default_port: int = 80) -> str:
    """Istio's outbound cluster name: outbound|port|subset|fqdn."""
    port = (destination.get("port") or {}).get("number", default_port)
    return f"outbound|{port}|{destination.get('subset', '')}|{fqdn(destination['host'], namespace)}"


def _string_match(sm: dict[str, Any]) -> dict[str, Any]:
    ((kind, value),) = sm.items()
    return {"safe_regex": {"regex": value}} if kind == "regex" else {kind: value}


def _match(entry: dict[str, Any]) -> dict[str, Any]:
    match: dict[str, Any] = {}
    uri = entry.get("uri") or {"prefix": "/"}
    ((kind, value),) = uri.items()
    match["safe_regex" if kind == "regex" else "path" if kind == "exact" else "prefix"] = {"regex": value} if kind == "regex" else value
    if entry.get("ignoreUriCase"):
        match["case_sensitive"] = False
    headers = [{"name": n, "string_match": _string_match(sm)} for n, sm in (entry.get("headers") or {}).items()]
    if entry.get("method"):
        headers.append({"name": ":method", "string_match": _string_match(entry["method"])})
    if headers:
        match["headers"] = headers
    return match


def envoy_routes(vs: dict[str, Any], cluster: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """The Envoy routes of a VirtualService, in order; ``cluster`` names a destination's cluster."""
    out = []
    for http in vs["spec"]["http"]:
        for entry, name in zip(http.get("match") or [{}], envoy_route_names(http), strict=True):
            destinations = http["route"]
            action: dict[str, Any] = (
                {"cluster": cluster(destinations[0]["destination"])}
                if len(destinations) == 1
                else {"weighted_clusters": {"clusters": [{"name": cluster(d["destination"]), "weight": d["weight"]} for d in destinations]}}
            )
            mirrors = [http["mirror"]] if http.get("mirror") else [m["destination"] for m in http.get("mirrors") or []]
            if mirrors:
                # No percentage left on a converted route: Istio mirrors every request it routes there.
                assert http.get("mirrorPercentage") is None and all(m.get("percentage") is None for m in http.get("mirrors") or [])
                action["request_mirror_policies"] = [{"cluster": cluster(m)} for m in mirrors]
            if http.get("timeout"):
                action["timeout"] = http["timeout"]
            route: dict[str, Any] = {"name": name, "match": _match(entry), "route": action}
            removed = ((http.get("headers") or {}).get("request") or {}).get("remove")
            if removed:
                route["request_headers_to_remove"] = list(removed)
            out.append(route)
    return out


def apply_envoy_filter(envoy_filter: dict[str, Any], context: str, manager: dict[str, Any]) -> int:
    """Applies an EnvoyFilter's patches for ``context`` to one HTTP connection manager (its
    http_filters and inline route_config) as istiod does; the number of patches applied."""
    applied = 0
    for patch in envoy_filter["spec"]["configPatches"]:
        if patch["match"]["context"] != context:
            continue
        operation, value = patch["patch"]["operation"], patch["patch"]["value"]
        if patch["applyTo"] == "HTTP_FILTER":
            assert operation == "INSERT_BEFORE"
            target = patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"]
            names = [f["name"] for f in manager["http_filters"]]
            manager["http_filters"].insert(names.index(target), copy.deepcopy(value))
            applied += 1
        elif patch["applyTo"] == "HTTP_ROUTE":
            assert operation == "MERGE" and set(value) == {"typed_per_filter_config"}
            wanted = patch["match"]["routeConfiguration"]["vhost"]["route"]["name"]
            for host in manager["route_config"]["virtual_hosts"]:
                for route in host["routes"]:
                    if route["name"] == wanted:
                        route.setdefault("typed_per_filter_config", {}).update(copy.deepcopy(value["typed_per_filter_config"]))
                        applied += 1
        else:
            raise AssertionError(f"unexpected patch {patch['applyTo']}")
    return applied
