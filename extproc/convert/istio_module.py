"""`convert istio --inline module`: the decision inside Istio's proxies, as the C dynamic
module, instead of the ext_proc sampler (pure: VirtualServices in, documents out).

Istio's proxy has Envoy's dynamic-module HTTP filter from Istio 1.31 on (istio/proxy
#6955; 1.30 and older lack it) and Istio has no API for it, so an EnvoyFilter carries
everything: an ``HTTP_FILTER`` patch inserting the module's filter before the router
(exactly what ``envoy-config --inline module`` renders; the module strips client-sent
slot and marker headers itself, so no Lua filter), and ``HTTP_ROUTE`` patches merging
each mirror rule's settings into its routes as the module's per-route config. Istio
names each Envoy route after its VirtualService http[] route ("<name>.<match name>" for
a named match entry), so every converted route and its variants get a name, and a
route patch finds them by it.

The decision is Envoy's route match plus the module: the rule travels with the route
Istio picks, so what only the sampler's own matching needed (an exact HTTPRoute
translation of the matches and hosts, the same winner in Gateway API precedence, hosts
not shared with another VirtualService) does not hold a route back here.

The ``.so`` reaches the proxies as ``module_delivery`` builds it (a ConfigMap of the C
sources, an init container compiling them in the pod): as strategic-merge patches for
the gateway's Deployment and for the client workloads' Deployments. The EnvoyFilter
selects only pods carrying MODULE_LABEL, which the patches add, so a proxy without the
file never gets a filter it cannot load.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from betterproto2 import Casing

from ..config.build import build_policy
from ..config.errors import ConfigError
from ..config.schema import MAX_RULES_PER_ROUTE
from ..core.policy import Policy, Rule
from ..core.slots import SlotHeaders
from ..envoy import module, render
from . import Conversion, ConvertError
from .istio_rewrite import (
    ENVOY_FILTER_API,
    before_router,
    converted_routes,
    envoy_route_names,
    filter_contexts,
    rewrite_virtual_service,
)
from .istio_translate import HttpRoute, Untranslatable, VirtualService, checked_rule, left_note, translation_problems
from .kubernetes import Document, SamplerDeployment, dump_documents, generated_header, metadata
from .module_delivery import (
    MODULE_PATH,
    MODULE_VOLUME,
    ModuleEngine,
    build_container,
    module_mount,
    module_volumes,
    source_config_map,
)

COMMAND = "convert istio --inline module"
# Pods whose proxies load the module: the EnvoyFilter's workloadSelector, set by the patches.
MODULE_LABEL = "mirror-sampler.io/module"
PROXY_CONTAINER = "istio-proxy"
USER_VOLUME_MOUNT = "sidecar.istio.io/userVolumeMount"
# Native sidecars start the proxy before the pod's other init containers, which would be
# before the module is built: the proxy would reject its listeners.
NATIVE_SIDECAR = "sidecar.istio.io/nativeSidecar"
GATEWAY_PATCH = "gateway-patch.yaml"
SIDECAR_PATCH = "sidecar-patch.yaml"


def rule_route_name(vs: VirtualService, h: HttpRoute) -> str:
    """The name given to a converted route that has none: its rule's id
    (namespace/VirtualService/http index), also the rule label of the module's stats."""
    return f"{vs.id}/{h.index}"


def _translate(services: Sequence[VirtualService], slot_headers: SlotHeaders, notes: list[str]) -> None:
    """Each mirrored route's rule (its backends and mirrors; Envoy does the matching),
    and a name for those that have none."""
    for vs in services:
        for h in vs.routes:
            if not h.mirrors:
                continue
            try:
                rule = checked_rule(vs, h, {k: v for k, v in h.raw.items() if k != "match"}, slot_headers)
            except Untranslatable as e:
                notes.append(left_note(vs, h, str(e)))
                continue
            h.rule, h.converted = rule, True
            if not h.raw.get("name"):
                name = rule_route_name(vs, h)
                h.raw = {"name": name, **h.raw}
                notes.append(f"VirtualService {vs.id} http[{h.index}] had no name: named {name!r}, its variants {name}-mirror-<slots>")


def _route_names(h: HttpRoute, slot_headers: SlotHeaders) -> list[str]:
    """The Envoy route names of a converted route: its variants' and its own."""
    return list(dict.fromkeys(n for r in converted_routes(h, slot_headers) for n in envoy_route_names(r)))


def _drop_shared_names(services: Sequence[VirtualService], slot_headers: SlotHeaders, notes: list[str]) -> None:
    """A route patch reaches every Envoy route of that name: a converted route whose name
    another route of these VirtualServices also has is left as it was."""
    route_names = {
        id(h): _route_names(h, slot_headers) if h.converted else [n for n in envoy_route_names(h.raw) if n]
        for vs in services
        for h in vs.routes
    }
    names = Counter(n for listed in route_names.values() for n in listed)
    for vs in services:
        for h in vs.routes:
            shared = [n for n in route_names[id(h)] if names[n] > 1] if h.converted else []
            if shared:
                h.converted, h.rule = False, None
                names_text = ", ".join(map(repr, shared))
                notes.append(
                    left_note(
                        vs, h, f"Envoy route name {names_text} is not unique among these VirtualServices; give the route a unique name"
                    )
                )


def _policy(converted: Sequence[VirtualService], options: SamplerDeployment) -> tuple[Policy, dict[tuple[int, int], Rule]]:
    """The rules as the sampler would compile them, and (id of the VirtualService, http
    index) -> the converted route's rule, whose id is namespace/VirtualService/http index
    (the name given to a route that has none). The policy's own HTTPRoutes hold at most
    16 rules each (Gateway API's limit), so their names and rule ids are not these."""
    docs: list[Document] = []
    owners: list[tuple[VirtualService, list[HttpRoute]]] = []
    for vs in converted:
        routes = [h for h in vs.routes if h.converted and h.rule is not None]
        for start in range(0, len(routes), MAX_RULES_PER_ROUTE):
            run = routes[start : start + MAX_RULES_PER_ROUTE]
            docs.append(
                {
                    "apiVersion": "gateway.networking.k8s.io/v1",
                    "kind": "HTTPRoute",
                    "metadata": metadata(f"rules-{len(docs)}", vs.namespace),
                    "spec": {"rules": [h.rule for h in run]},
                }
            )
            owners.append((vs, run))
    try:
        policy = build_policy(options.settings(), dump_documents(docs, ""))
    except ConfigError as e:
        raise ConvertError([_in_virtual_service_terms(p, owners) for p in e.problems]) from None
    by_name = {route.name: route for route in policy.routes}
    rules = {
        (id(vs), h.index): dataclasses.replace(rule, id=rule_route_name(vs, h))
        for n, (vs, run) in enumerate(owners)
        for h, rule in zip(run, by_name[f"rules-{n}"].rules, strict=True)
    }
    return policy, rules


def _in_virtual_service_terms(problem: str, owners: Sequence[tuple[VirtualService, list[HttpRoute]]]) -> str:
    """A problem of the policy's HTTPRoute "rules-<n>" (document n + 1), said of the VirtualService."""
    found = re.search(r"\(document (\d+)\)", problem)
    if found is None or not 0 < int(found.group(1)) <= len(owners):
        return f"the rules as the module decides them: {problem}"
    vs, _ = owners[int(found.group(1)) - 1]
    return translation_problems(vs, [problem])[0]


def route_patch(context: str, route_name: str, per_route: dict[str, Any]) -> dict[str, Any]:
    """Merges the module's per-route config into every Envoy route named ``route_name``."""
    return {
        "applyTo": "HTTP_ROUTE",
        "match": {"context": context, "routeConfiguration": {"vhost": {"route": {"name": route_name}}}},
        "patch": {"operation": "MERGE", "value": {"typed_per_filter_config": {module.MODULE_FILTER: copy.deepcopy(per_route)}}},
    }


def module_envoy_filter(
    name: str, namespace: str | None, contexts: Sequence[str], slot_headers: SlotHeaders, routes: Sequence[dict[str, Any]]
) -> Document:
    """The module's filter before the router in each context, then the route patches."""
    http_filter = render.as_data(module.slot_http_filter(slot_headers, MODULE_PATH), Casing.SNAKE)
    return {
        "apiVersion": ENVOY_FILTER_API,
        "kind": "EnvoyFilter",
        "metadata": metadata(name, namespace),
        "spec": {
            "workloadSelector": {"labels": {MODULE_LABEL: "true"}},
            "configPatches": [*(before_router(c, http_filter) for c in contexts), *routes],
        },
    }


def gateway_patch(sources_config_map: str, builder_image: str) -> Document:
    """For a gateway's Deployment (`kubectl patch --patch-file`): its proxy is the
    Deployment's own istio-proxy container, started after the init containers."""
    return {
        "spec": {
            "template": {
                "metadata": {"labels": {MODULE_LABEL: "true"}},
                "spec": {
                    "initContainers": [build_container(builder_image)],
                    "volumes": module_volumes(sources_config_map),
                    "containers": [{"name": PROXY_CONTAINER, "volumeMounts": [module_mount()]}],
                },
            }
        }
    }


def sidecar_patch(sources_config_map: str, builder_image: str) -> Document:
    """For a client workload's Deployment: the sidecar is injected, so its mount is an
    annotation Istio's injector reads, and it runs as a plain container (after the init
    containers) rather than a native sidecar."""
    mount = {k: v for k, v in module_mount().items() if k != "name"}
    return {
        "spec": {
            "template": {
                "metadata": {
                    "labels": {MODULE_LABEL: "true"},
                    "annotations": {USER_VOLUME_MOUNT: json.dumps({MODULE_VOLUME: mount}, separators=(",", ":")), NATIVE_SIDECAR: "false"},
                },
                "spec": {"initContainers": [build_container(builder_image)], "volumes": module_volumes(sources_config_map)},
            }
        }
    }


def convert_with_module(
    services: Sequence[VirtualService], options: SamplerDeployment, engine: ModuleEngine, notes: list[str] | None = None
) -> Conversion:
    """``notes``: what reading the input had to say (continued here)."""
    slot_headers = options.slot_headers
    notes = [] if notes is None else notes
    _translate(services, slot_headers, notes)
    _drop_shared_names(services, slot_headers, notes)
    converted = [vs for vs in services if any(h.converted for h in vs.routes)]
    for vs in services:
        if not any(h.mirrors for h in vs.routes):
            notes.append(f"VirtualService {vs.id} mirrors nothing; not in virtualservices.yaml")
    if not converted:
        raise ConvertError(["no VirtualService route could be converted:", *notes])
    policy, rules = _policy(converted, options)
    contexts: dict[str | None, list[str]] = {}
    routes: dict[str | None, list[dict[str, Any]]] = {}
    for vs in converted:
        for ns, vs_contexts in filter_contexts(vs).items():
            contexts.setdefault(ns, [])
            contexts[ns] += [c for c in vs_contexts if c not in contexts[ns]]
            for h in vs.routes:
                if not h.converted:
                    continue
                per_route = render.as_data(module.per_route(policy, rules[id(vs), h.index], MODULE_PATH), Casing.SNAKE)
                names = _route_names(h, slot_headers)
                routes.setdefault(ns, []).extend(route_patch(c, n, per_route) for c in vs_contexts for n in names)
    service = options.sampler_service
    sources_name = f"{service}-module-src"
    filters = [module_envoy_filter(service, ns, ctx, slot_headers, routes.get(ns, [])) for ns, ctx in contexts.items()]
    all_contexts = {c for ctx in contexts.values() for c in ctx}
    files = {
        "virtualservices.yaml": dump_documents(
            [rewrite_virtual_service(vs, slot_headers) for vs in converted], generated_header(COMMAND, VIRTUAL_SERVICES_COMMENT)
        ),
        "envoy-filter.yaml": dump_documents(filters, generated_header(COMMAND, ENVOY_FILTER_COMMENT)),
        "module.yaml": dump_documents([source_config_map(sources_name, ns) for ns in contexts], generated_header(COMMAND, SOURCES_COMMENT)),
    }
    image = engine.builder_image
    if "GATEWAY" in all_contexts:
        files[GATEWAY_PATCH] = dump_documents([gateway_patch(sources_name, image)], generated_header(COMMAND, GATEWAY_COMMENT))
    if "SIDECAR_OUTBOUND" in all_contexts:
        files[SIDECAR_PATCH] = dump_documents([sidecar_patch(sources_name, image)], generated_header(COMMAND, SIDECAR_COMMENT))
    return Conversion(files=files, notes=_notes(notes, contexts))


def _notes(notes: list[str], contexts: dict[str | None, list[str]]) -> list[str]:
    where = {c: [ns or "(no namespace)" for ns, ctx in contexts.items() if c in ctx] for c in ("GATEWAY", "SIDECAR_OUTBOUND")}
    out = [
        "Istio would also mirror at random if the original VirtualServices were applied: "
        "apply virtualservices.yaml instead of them (same names)",
        "Istio 1.31 or newer only (its proxy is the first with Envoy's dynamic-module filter, Envoy 1.39); the converter cannot see "
        "your cluster: check `istioctl version`. An older proxy rejects the listeners the EnvoyFilter changes",
        *notes,
    ]
    if where["GATEWAY"]:
        out.append(
            f"gateways (EnvoyFilter in {', '.join(where['GATEWAY'])}): apply module.yaml, then patch each gateway Deployment whose "
            f"pods the VirtualServices' Gateways select: kubectl -n NAMESPACE patch deployment NAME --patch-file {GATEWAY_PATCH}"
        )
    if where["SIDECAR_OUTBOUND"]:
        out.append(
            f"sidecars (EnvoyFilter in {', '.join(where['SIDECAR_OUTBOUND'])}): apply module.yaml, then patch each client "
            f"Deployment there: kubectl -n NAMESPACE patch deployment NAME --patch-file {SIDECAR_PATCH} (its sidecar then runs "
            "as a plain container, not a native sidecar); clients not patched, or in other namespaces, no longer mirror at all"
        )
    out.append(
        f"the EnvoyFilter applies only to pods labelled {MODULE_LABEL}=true (the patches add it), and its route patches match "
        "Envoy routes by name: a route of the same name in another VirtualService those proxies load would get the rule too"
    )
    out.append(
        "the module clears the route cache after Istio's own filters (authorization included) have run; a variant routes to the "
        "same destinations as its plain route, so only the mirrors change"
    )
    out.append(
        "the default key is x-request-id: an Istio ingress gateway generates it for external clients, but sidecars keep the caller's, "
        "so a caller inside the mesh that sets it chooses its sample"
    )
    return out


VIRTUAL_SERVICES_COMMENT = """\
Apply these INSTEAD of the original VirtualServices (same names): the originals'
mirrorPercentage would make Istio mirror at random as well. Each converted route is
named (the EnvoyFilter finds its Envoy routes by name) and preceded by its variants,
which match the slot headers the module sets (value: the mirror's host[--subset])."""

ENVOY_FILTER_COMMENT = """\
Istio 1.31+ only (the first proxy with Envoy's dynamic-module filter). The mirror-sampler
dynamic module before the router (it decides, strips client-sent slot and marker
headers, and counts in Envoy's stats: dynamicmodulescustom.mirror_sampler_decisions),
and each converted route's rule as the module's per-route config, found by route name.
Only pods labelled mirror-sampler.io/module=true, whose patch puts the module at the path
named here. GATEWAY patches belong in the namespace of the gateway's pods (this file
uses the Gateway resource's namespace); SIDECAR_OUTBOUND ones apply to the sidecars of
their namespace. To change a percentage, edit the original VirtualServices and convert again."""

SOURCES_COMMENT = """\
The module's C sources, in each namespace whose proxies load it: the patched pods'
init container compiles them there (the same command as `mirror-sampler envoy-config
--inline module` runs locally)."""

GATEWAY_COMMENT = """\
A strategic-merge patch for an Istio gateway's Deployment (its pods run the GATEWAY
patches): kubectl -n NAMESPACE patch deployment NAME --patch-file gateway-patch.yaml
An init container builds the module from module.yaml's ConfigMap into a volume the
istio-proxy container mounts read-only, and the label selects the EnvoyFilter.
With Helm or IstioOperator, carry the same fields in your values instead."""

SIDECAR_COMMENT = """\
A strategic-merge patch for each client workload's Deployment in an EnvoyFilter's
namespace (its sidecar runs the SIDECAR_OUTBOUND patches):
  kubectl -n NAMESPACE patch deployment NAME --patch-file sidecar-patch.yaml
An init container builds the module from module.yaml's ConfigMap into a volume that
Istio's injector mounts into istio-proxy (sidecar.istio.io/userVolumeMount); the sidecar
runs as a plain container so that it starts after the build (nativeSidecar: "false"),
and the label selects the EnvoyFilter."""
