"""What Istio gets from ``convert istio``: each converted http[] route as
``core.variants`` lays it out (its variant routes, then its plain route),
and the EnvoyFilter that puts the strip filter and ext_proc, as
``envoy-config`` renders them, before the router (pure)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from betterproto2 import Casing

from ..core.slots import SlotHeaders
from ..core.variants import rule_layout
from ..envoy import render
from .istio_translate import HttpRoute, Mirror, VirtualService
from .kubernetes import Document, metadata

MESH = "mesh"
ROUTER = "envoy.filters.http.router"
HCM = "envoy.filters.network.http_connection_manager"
ENVOY_FILTER_API = "networking.istio.io/v1alpha3"


def _token(mirror: Mirror) -> str:
    return mirror.token


def converted_routes(h: HttpRoute, slot_headers: SlotHeaders) -> list[dict[str, Any]]:
    """The route as ``core.variants`` lays it out: its variants, then its plain route."""
    raw = h.raw
    out = []
    for layout in rule_layout(h.mirrors, _token, slot_headers):
        v = _without_mirrors(raw)
        if layout.is_plain:
            out.append(v)
            continue
        slot_matches = {name: {"exact": token} for name, token in layout.matches}
        v["match"] = [
            {**copy.deepcopy(m), "headers": {**copy.deepcopy(m.get("headers") or {}), **copy.deepcopy(slot_matches)}}
            for m in (raw.get("match") or [{}])
        ]
        if raw.get("mirror") is not None:
            v["mirror"] = copy.deepcopy(h.mirrors[0].destination)
        else:
            # No percentage: the sampler already decided; Istio then mirrors all of them.
            entries: list[dict[str, Any]] = [m.entry or {} for m in layout.targets]
            v["mirrors"] = [{k: copy.deepcopy(val) for k, val in e.items() if k != "percentage"} for e in entries]
        if raw.get("name"):
            v["name"] = f"{raw['name']}-mirror-{'-'.join(map(str, layout.slots))}"
        # Name and match first, as people write them.
        first: dict[str, Any] = {k: v[k] for k in ("name", "match") if k in v}
        out.append({**first, **v})
    return out


def _without_mirrors(raw: dict[str, Any]) -> dict[str, Any]:
    v = copy.deepcopy(raw)
    for key in ("mirror", "mirrors", "mirrorPercentage", "mirrorPercent"):
        v.pop(key, None)
    return v


def _remove_slots(route: dict[str, Any], slot_names: Sequence[str]) -> dict[str, Any]:
    """Route-level request header removal, applied before the shadow copy is
    made: neither the backend nor the mirror sees a slot header. On a route that
    delegates, Istio gives it to each of the delegate's routes that sets no
    ``headers`` of its own."""
    if route.get("route") is None and route.get("delegate") is None:
        return route  # a redirect or direct response: nothing is forwarded
    request = route.setdefault("headers", {}).setdefault("request", {})
    existing = list(request.get("remove") or [])
    known = {n.lower() for n in existing}
    request["remove"] = existing + [n for n in slot_names if n not in known]
    return route


def rewrite_virtual_service(vs: VirtualService, slot_headers: SlotHeaders) -> Document:
    new = copy.deepcopy(vs.doc)
    new.pop("status", None)
    for key in ("resourceVersion", "uid", "generation", "managedFields", "creationTimestamp", "selfLink"):
        (new.get("metadata") or {}).pop(key, None)
    http: list[dict[str, Any]] = []
    for h in vs.routes:
        if h.converted:
            http += [_remove_slots(r, slot_headers.names) for r in converted_routes(h, slot_headers)]
        else:
            # Also unconverted routes drop slot headers: the sampler may have set
            # them for a request that Istio routes here first.
            http.append(_remove_slots(copy.deepcopy(h.raw), slot_headers.names))
    new["spec"]["http"] = http
    return new


def envoy_filter(
    namespace: str | None,
    contexts: Sequence[str],
    *,
    slot_headers: SlotHeaders,
    cluster: str,
    authority: str,
    message_timeout_ms: int,
    name: str,
) -> Document:
    # The filters envoy-config renders, with Istio's name for the sampler's cluster.
    strip = render.as_data(render.anti_spoof_filter(slot_headers), Casing.SNAKE)
    ext_proc = render.as_data(render.ext_proc_filter(message_timeout_ms, cluster=cluster, authority=authority), Casing.SNAKE)
    # Patches apply in order: the strip filter lands before the router,
    # then ext_proc between it and the router.
    patches = [before_router(context, value) for context in contexts for value in (strip, ext_proc)]
    return {
        "apiVersion": ENVOY_FILTER_API,
        "kind": "EnvoyFilter",
        "metadata": metadata(name, namespace),
        "spec": {"configPatches": patches},
    }


def before_router(context: str, http_filter: dict[str, Any]) -> dict[str, Any]:
    """The patch inserting an HTTP filter before the router of every HTTP connection manager in ``context``."""
    match = {"context": context, "listener": {"filterChain": {"filter": {"name": HCM, "subFilter": {"name": ROUTER}}}}}
    return {"applyTo": "HTTP_FILTER", "match": match, "patch": {"operation": "INSERT_BEFORE", "value": copy.deepcopy(http_filter)}}


def envoy_route_names(route: dict[str, Any]) -> list[str]:
    """The names of the Envoy routes Istio makes of one http[] route: one route per match
    entry, named after the http[] route, "<route>.<entry>" when the entry has a name
    (pilot/pkg/networking/core/route/route.go, TranslateRoute)."""
    name = str(route.get("name") or "")
    entries = route.get("match") or [{}]
    return list(dict.fromkeys(f"{name}.{m['name']}" if isinstance(m, dict) and m.get("name") else name for m in entries))


def filter_contexts(vs: VirtualService) -> dict[str | None, list[str]]:
    """Namespace -> EnvoyFilter contexts: GATEWAY in each named gateway's
    namespace, SIDECAR_OUTBOUND in the VirtualService's for `mesh` (or no gateways)."""
    out: dict[str | None, list[str]] = {}
    gateways = vs.gateways
    if not gateways or MESH in gateways:
        out.setdefault(vs.namespace, []).append("SIDECAR_OUTBOUND")
    for g in gateways:
        if g == MESH:
            continue
        ns = g.split("/", 1)[0] if "/" in g else vs.namespace
        if "GATEWAY" not in out.setdefault(ns, []):
            out[ns].append("GATEWAY")
    return out
