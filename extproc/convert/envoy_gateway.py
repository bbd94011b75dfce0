"""`mirror-sampler convert envoy-gateway`: HTTPRoutes whose RequestMirror
filters carry ``percent`` / ``fraction`` (which Envoy Gateway turns into a
fresh random roll per request) -> consistent, key-based sampling (pure apart
from reading the input files).

Envoy Gateway names its mirror clusters itself, so the sampler cannot name a
cluster in a header. The slot headers carry tokens instead, shared by the
sampler and the rewritten routes: slot i = the backendRef name of the rule's
i-th RequestMirror (what the sampler sets today). Each mirrored rule becomes
*variant* rules, one per non-empty combination of sampled targets, that match
its own matches plus ``x-mirror-cluster-<i>: <backend>`` exactly and mirror
those targets at 100%, followed by the plain rule without mirrors. Envoy
Gateway sorts rules with more header matches first, and the sampler's
``clear_route_cache`` makes Envoy re-match after it set the headers.

Field names follow Envoy Gateway's API types as of v1.9.0
(api/v1alpha1/envoyextensionypolicy_types.go, ext_proc_types.go,
clienttrafficpolicy_types.go, shared_types.go).
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config.build import build_policy
from ..config.errors import ConfigError
from ..config.manifest_yaml import read_documents
from ..config.manifests import SWITCH_KIND, parse_manifests
from ..config.schema import MAX_MATCHES_PER_ROUTE, MAX_RULES_PER_ROUTE, route_match_count
from ..core.policy import MirrorTarget, Route, Rule
from ..core.slots import SlotHeaders
from ..core.variants import rule_layout
from . import Conversion, ConvertError
from .envoy_gateway_module import ENVOY_PROXY_COMMENT, POLICY_COMMENT, envoy_proxy, rule_policy, rule_section_name
from .kubernetes import (
    DEFAULT_DEPLOYMENT,
    GRPC_PORT,
    Document,
    SamplerDeployment,
    dump_documents,
    generated_header,
    load_documents,
    metadata,
    read_sources,
    sampler_manifest,
)
from .module_delivery import ModuleEngine as ModuleEngine  # where the CLI finds it for this converter
from .module_delivery import source_config_map

GATEWAY_GROUP = "gateway.networking.k8s.io"
EG_API = "gateway.envoyproxy.io/v1alpha1"
EG_GROUP = "gateway.envoyproxy.io"
COMMAND = "convert envoy-gateway"
# Gateway API HTTPRoute limits (apis/v1/httproute_types.go): the rewritten
# routes must still pass the CRD's validation (the rules' own: config.schema).
MAX_HEADER_MATCHES = 16
MAX_FILTERS = 16
MAX_REMOVE = 16
# The longest name the converter gives: metadata.name of every kind it writes is a
# DNS-1123 subdomain (at most 253), and the HTTPRoute CRD's rules[].name (and a
# policy's targetRefs[].sectionName) has maxLength 253.
MAX_NAME = 253
_HASH_LENGTH = 10
# Fields the API server sets; applying them back would conflict.
_SERVER_FIELDS = ("resourceVersion", "uid", "generation", "managedFields", "creationTimestamp", "selfLink")


def object_name(*parts: str, limit: int = MAX_NAME) -> str:
    """``parts`` joined with '-', as the name of an object or of an HTTPRoute rule. Too
    long, it is cut and ends in a short hash of the whole: names that differ only past
    the cut stay distinct, and the same parts always give the same name. Each part is
    itself a valid name, so the result is a DNS-1123 subdomain."""
    whole = "-".join(parts)
    if len(whole) <= limit:
        return whole
    digest = hashlib.sha256(whole.encode()).hexdigest()[:_HASH_LENGTH]
    # A cut that ends in '-' or '.' would leave '-' or '.-' before the hash: not a subdomain.
    return f"{whole[: limit - _HASH_LENGTH - 1].rstrip('-.')}-{digest}"


def _backend(target: MirrorTarget) -> str:
    return target.backend


def _variant_names(base: str, slot_lists: Sequence[Sequence[int]], taken: set[str]) -> list[str]:
    """Names for a rule's variants (``slot_lists``: each variant's slots), unique within the
    route: ``<base>-mirror-<slots>``, or with ``mirror2``, ``mirror3``... when a name the
    route already has (``taken``) would clash. ``taken`` receives the names chosen."""
    n = 1
    while True:
        infix = "mirror" if n == 1 else f"mirror{n}"
        names = [object_name(base, infix, *map(str, slots)) for slots in slot_lists]
        if not taken.intersection(names):
            taken.update(names)
            return names
        n += 1


def _free_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3``... if the route already has it; added to ``taken``."""
    chosen, n = name, 1
    while chosen in taken:
        n += 1
        chosen = object_name(name, str(n))
    taken.add(chosen)
    return chosen


def variant_rules(raw: dict[str, Any], rule: Rule, slot_headers: SlotHeaders, taken: set[str] | None = None) -> list[dict[str, Any]]:
    """The rule as ``core.variants`` lays it out: its variant rules, then its plain rule.
    A named rule's variants get names not in ``taken`` (the route's rule names so far;
    updated), since rule names must be unique within a route."""
    filters: list[dict[str, Any]] = list(raw.get("filters") or [])
    mirror_filters = [i for i, f in enumerate(filters) if f.get("type") == "RequestMirror"]
    assert len(mirror_filters) == len(rule.mirrors), "the parsed rule and its manifest disagree"
    used_slots = slot_headers.names[: len(rule.mirrors)]
    layouts = rule_layout(rule.mirrors, _backend, slot_headers)
    variant_names: list[str] = []
    if raw.get("name"):
        slot_lists = [layout.slots for layout in layouts if not layout.is_plain]
        variant_names = _variant_names(raw["name"], slot_lists, set() if taken is None else taken)
    names = iter(variant_names)
    out = []
    for layout in layouts:
        if layout.is_plain:
            plain = copy.deepcopy(raw)
            kept = [copy.deepcopy(f) for f in filters if f.get("type") != "RequestMirror"]
            if kept:
                plain["filters"] = kept
            else:
                plain.pop("filters", None)
            out.append(plain)
            continue
        variant = copy.deepcopy(raw)
        slot_matches = [{"type": "Exact", "name": name, "value": token} for name, token in layout.matches]
        variant["matches"] = [
            {**copy.deepcopy(m), "headers": [*copy.deepcopy(m.get("headers") or []), *copy.deepcopy(slot_matches)]}
            for m in (raw.get("matches") or [{}])
        ]
        chosen_filters = {mirror_filters[slot] for slot in layout.slots}
        new_filters = []
        merged = False
        for i, f in enumerate(filters):
            if i in mirror_filters:
                if i in chosen_filters:
                    f = copy.deepcopy(f)
                    # No percentage: the sampler already decided; Envoy mirrors all it routes here.
                    f["requestMirror"].pop("percent", None)
                    f["requestMirror"].pop("fraction", None)
                    new_filters.append(f)
            elif f.get("type") == "RequestHeaderModifier":
                # The CRD allows one RequestHeaderModifier per rule: merge into it.
                f = copy.deepcopy(f)
                modifier = f.setdefault("requestHeaderModifier", {})
                existing = list(modifier.get("remove") or [])
                known = {n.lower() for n in existing}
                modifier["remove"] = existing + [n for n in used_slots if n not in known]
                new_filters.append(f)
                merged = True
            else:
                new_filters.append(copy.deepcopy(f))
        if not merged:
            # Route-level request_headers_to_remove in Envoy Gateway: applied
            # before the shadow copy is made, so neither backend sees a slot.
            new_filters.insert(0, {"type": "RequestHeaderModifier", "requestHeaderModifier": {"remove": list(used_slots)}})
        variant["filters"] = new_filters
        if raw.get("name"):
            variant["name"] = next(names)
        out.append(variant)
    return out


def _limit_problems(where: str, rules: list[dict[str, Any]]) -> list[str]:
    problems = []
    if len(rules) > MAX_RULES_PER_ROUTE:
        problems.append(
            f"{where}: spec.rules: {len(rules)} rules after adding mirror variants, over Gateway API's limit of {MAX_RULES_PER_ROUTE}; "
            "split the route, or give rules fewer mirrors"
        )
    total = route_match_count(rules)
    if total > MAX_MATCHES_PER_ROUTE:
        problems.append(
            f"{where}: spec.rules: {total} matches after adding mirror variants, over Gateway API's limit of {MAX_MATCHES_PER_ROUTE}"
        )
    for i, r in enumerate(rules):
        for j, m in enumerate(r.get("matches") or []):
            if len(m.get("headers") or []) > MAX_HEADER_MATCHES:
                problems.append(
                    f"{where}: spec.rules[{i}].matches[{j}].headers: over Gateway API's limit of {MAX_HEADER_MATCHES} with the slot headers"
                )
        if len(r.get("filters") or []) > MAX_FILTERS:
            problems.append(f"{where}: spec.rules[{i}].filters: over Gateway API's limit of {MAX_FILTERS}")
        for f in r.get("filters") or []:
            if f.get("type") == "RequestHeaderModifier" and len(f.get("requestHeaderModifier", {}).get("remove") or []) > MAX_REMOVE:
                problems.append(
                    f"{where}: spec.rules[{i}] RequestHeaderModifier.remove: over Gateway API's limit of {MAX_REMOVE} with the slot headers"
                )
    return problems


def rewrite_route(
    doc: Document, route: Route, slot_headers: SlotHeaders, sections: dict[str, list[str]] | None = None, *, name_rules: bool = False
) -> tuple[Document, bool]:
    """The route with each mirrored rule expanded; whether anything changed. With
    ``name_rules`` (the module engine), every mirrored rule gets a name. ``sections``
    receives, per named mirrored rule's id, the names of the rules it became, its plain
    rule last (the module's policy's sectionNames). Every name given is unique within
    the route and within the CRD's length limit."""
    new = copy.deepcopy(doc)
    new.pop("status", None)
    meta = new.setdefault("metadata", {})
    for key in _SERVER_FIELDS:
        meta.pop(key, None)
    raw_rules = list((doc.get("spec") or {}).get("rules") or [])
    if not any(r.mirrors for r in route.rules) or not raw_rules:
        return new, False
    rules: list[dict[str, Any]] = []
    # The names the route has: no name the converter gives may repeat one (the CRD's rule).
    taken = {r["name"] for r in raw_rules if isinstance(r.get("name"), str)}
    for index, (raw, rule) in enumerate(zip(raw_rules, route.rules, strict=True)):
        if not rule.mirrors:
            rules.append(copy.deepcopy(raw))
            continue
        if name_rules and not raw.get("name"):
            raw = {"name": _free_name(rule_section_name(index), taken), **raw}
        expanded = variant_rules(raw, rule, slot_headers, taken)
        if sections is not None and raw.get("name"):
            sections[rule.id] = [r["name"] for r in expanded]
        rules.extend(expanded)
    problems = _limit_problems(f"{route.source}: HTTPRoute {route.id}", rules)
    if problems:
        raise ConvertError(problems)
    new["spec"]["rules"] = rules
    return new, True


def _gateways(doc: Document, route_ns: str | None) -> tuple[list[tuple[str | None, str]], list[str]]:
    """(namespace, name) of the Gateways a route attaches to; other parents."""
    gateways: list[tuple[str | None, str]] = []
    others = []
    for ref in (doc.get("spec") or {}).get("parentRefs") or []:
        group, kind = ref.get("group", GATEWAY_GROUP), ref.get("kind", "Gateway")
        if group == GATEWAY_GROUP and kind == "Gateway" and isinstance(ref.get("name"), str):
            gateways.append((ref.get("namespace") or route_ns, ref["name"]))
        else:
            others.append(f"{group or 'core'}/{kind} {ref.get('name')}")
    return gateways, others


def extension_policies(
    mirrored: dict[str | None, list[str]], *, service: str, sampler_ns: str | None, message_timeout_ms: int
) -> list[Document]:
    """One EnvoyExtensionPolicy per namespace (policies attach to routes of
    their own namespace), targeting whole HTTPRoutes: Envoy builds the filter
    chain from the first route matched (the plain rule) and does not rebuild it
    after clear_route_cache, so ext_proc must be on every rule, not only the
    variants."""
    out = []
    for ns, names in mirrored.items():
        backend: dict[str, Any] = {"group": "", "kind": "Service", "name": service, "port": GRPC_PORT}
        if sampler_ns and sampler_ns != ns:
            backend["namespace"] = sampler_ns
        out.append(
            {
                "apiVersion": EG_API,
                "kind": "EnvoyExtensionPolicy",
                "metadata": metadata(service, ns),
                "spec": {
                    "targetRefs": [{"group": GATEWAY_GROUP, "kind": "HTTPRoute", "name": n} for n in names],
                    "extProc": [
                        {
                            "backendRefs": [backend],
                            # Request headers only: `request: {}` is what makes Envoy Gateway send them.
                            "processingMode": {"request": {}},
                            # failOpen defaults to false: a sampler outage would fail requests.
                            "failOpen": True,
                            "messageTimeout": f"{message_timeout_ms}ms",
                        }
                    ],
                },
            }
        )
    return out


def reference_grants(namespaces: Sequence[str], *, service: str, sampler_ns: str) -> list[Document]:
    return [
        {
            "apiVersion": f"{GATEWAY_GROUP}/v1beta1",
            "kind": "ReferenceGrant",
            "metadata": metadata(object_name(service, "from", ns), sampler_ns),
            "spec": {
                "from": [{"group": EG_GROUP, "kind": "EnvoyExtensionPolicy", "namespace": ns}],
                "to": [{"group": "", "kind": "Service", "name": service}],
            },
        }
        for ns in namespaces
    ]


CTP_COMMENT = """\
Removes client-supplied slot and marker headers before Envoy routes the
request, so no client can select a mirror variant, also while the sampler is
down (failOpen). `remove` (exact names; Envoy Gateway 1.2 and later) is used
rather than `removeOnMatch` (1.7 and later): the slot headers are a fixed,
known list, and `remove` works on every Envoy Gateway version this converter
supports. Envoy Gateway applies one ClientTrafficPolicy per Gateway (the
oldest): if you already have one, merge headers.earlyRequestHeaders into it."""


def client_traffic_policies(gateways: Sequence[tuple[str | None, str]], header_names: Sequence[str], service: str) -> list[Document]:
    return [
        {
            "apiVersion": EG_API,
            "kind": "ClientTrafficPolicy",
            "metadata": metadata(object_name(service, name), ns),
            "spec": {
                "targetRefs": [{"group": GATEWAY_GROUP, "kind": "Gateway", "name": name}],
                "headers": {"earlyRequestHeaders": {"remove": list(header_names)}},
            },
        }
        for ns, name in gateways
    ]


def _variant_pattern(name: str, variants: Sequence[str]) -> str:
    """How the note names a rule's variants: the pattern when they follow it, else each name."""
    default = re.compile(re.escape(name) + r"-mirror(-[0-9]+)+")
    return f"{name}-mirror-<slots>" if all(default.fullmatch(v) for v in variants) else ", ".join(variants)


def _mirror_backend(mirror: dict[str, Any]) -> str:
    """The name a RequestMirror's backendRef gives, as written (a GRPCRoute is not checked: it is only named)."""
    ref = mirror.get("backendRef")
    return str(ref.get("name")) if isinstance(ref, dict) else repr(ref)


def _mirrors(doc: Document) -> list[dict[str, Any]]:
    """The requestMirror of each RequestMirror filter in a route's rules (GRPCRoute, HTTPRoute)."""
    spec = doc.get("spec")
    rules = spec.get("rules") if isinstance(spec, dict) else None
    found = []
    for rule in rules if isinstance(rules, list) else []:
        filters = rule.get("filters") if isinstance(rule, dict) else None
        for f in filters if isinstance(filters, list) else []:
            if isinstance(f, dict) and f.get("type") == "RequestMirror":
                mirror = f.get("requestMirror")
                found.append(mirror if isinstance(mirror, dict) else {})
    return found


def _ignored_note(where: str, doc: Document) -> tuple[str, bool]:
    """What the user must know of a document the converter leaves out (every kind but
    HTTPRoute and MirrorSampler), and whether it mirrors at random (a GRPCRoute with
    percent / fraction, which Envoy Gateway keeps sampling at random)."""
    kind = doc.get("kind")
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    name = meta.get("name")
    what = f"{kind} {meta.get('namespace') or 'default'}/{name}" if isinstance(name, str) else str(kind)
    if kind != "GRPCRoute":
        return f"{where}: {what} ignored: not an HTTPRoute (convert envoy-gateway converts HTTPRoutes); nothing written for it", False
    mirrors = _mirrors(doc)
    random = [m for m in mirrors if "percent" in m or "fraction" in m]
    backends = ", ".join(dict.fromkeys(_mirror_backend(m) for m in (random or mirrors)))
    if random:
        return (
            f"{where}: {what} mirrors to {backends} with percent / fraction and is NOT converted (convert envoy-gateway converts "
            "HTTPRoutes only): Envoy Gateway keeps mirroring it at random, and the sampler does not decide for it",
            True,
        )
    if mirrors:
        return (
            f"{where}: {what} mirrors every request to {backends} (no percent / fraction) and is not converted "
            "(convert envoy-gateway converts HTTPRoutes only): left as it is, outside the sampler",
            False,
        )
    return f"{where}: {what} has no RequestMirror filter; ignored (convert envoy-gateway converts HTTPRoutes only)", False


def convert_envoy_gateway(
    paths: Sequence[Path], options: SamplerDeployment = DEFAULT_DEPLOYMENT, module: ModuleEngine | None = None
) -> Conversion:
    """Read the HTTPRoute files and convert them (``convert_envoy_gateway_sources``)."""
    return convert_envoy_gateway_sources(read_sources(paths), options, module)


def convert_envoy_gateway_sources(
    sources: Sequence[tuple[str, str]], options: SamplerDeployment = DEFAULT_DEPLOYMENT, module: ModuleEngine | None = None
) -> Conversion:
    """``sources``: (file name, text) pairs of HTTPRoute manifests. ``module``: decide in
    Envoy with the dynamic module (``--inline module``) instead of the ext_proc sampler."""
    settings = options.settings()
    slot_headers = options.slot_headers
    problems: list[str] = []
    kept: list[Document] = []  # the sampler's configuration: the original routes (and kill switch)
    pairs: list[tuple[Document, Route]] = []
    ignored: list[tuple[str, bool]] = []  # a note per document of another kind; whether it mirrors at random
    for source, text in sources:
        parsed = parse_manifests(text, source, slot_headers.count)
        routes, errors = parsed.routes, parsed.problems
        problems += errors
        if errors:
            continue
        # Numbered as parse_manifests numbers documents (empty ones count), as the routes' notes are.
        for i, (raw_doc, _) in enumerate(read_documents(text, source)):
            if isinstance(raw_doc, dict) and raw_doc.get("kind") not in (SWITCH_KIND, "HTTPRoute"):
                ignored.append(_ignored_note(f"{source} (document {i + 1})", raw_doc))
        by_id = {r.id: r for r in routes}
        for doc in load_documents(text, source):
            if doc.get("kind") == SWITCH_KIND:
                kept.append(doc)
            elif doc.get("kind") == "HTTPRoute":
                meta = doc.get("metadata") or {}
                kept.append(doc)
                pairs.append((doc, by_id[f"{meta.get('namespace', 'default')}/{meta.get('name')}"]))
    if problems:
        raise ConvertError(problems)
    config_text = dump_documents(
        kept,
        generated_header(
            COMMAND,
            "The sampler's configuration: the original HTTPRoutes, unchanged (with their\n"
            "percent / fraction). The sampler decides from these; Envoy Gateway gets the\n"
            "rewritten ones (httproutes.yaml).",
        ),
    )
    try:
        policy = build_policy(settings, config_text)  # what no single file shows: duplicate routes across files, ports
    except ConfigError as e:
        raise ConvertError(e.problems) from None

    notes: list[str] = [note for note, _ in ignored]
    rewritten: list[Document] = []
    mirrored: dict[str | None, list[str]] = {}
    gateways: dict[tuple[str | None, str], None] = {}
    route_namespaces: dict[str | None, None] = {}
    rule_policies: list[Document] = []
    for doc, route in pairs:
        route_ns = (doc.get("metadata") or {}).get("namespace")
        route_namespaces[route_ns] = None
        sections: dict[str, list[str]] = {}
        new, changed = rewrite_route(doc, route, slot_headers, sections, name_rules=module is not None)
        for rule_id, names in sections.items() if module else ():
            index = rule_id.rpartition("/")[2]
            name = object_name(options.sampler_service, route.name, index)
            rule_policies.append(rule_policy(name, route_ns, route.name, names, policy, policy.rules_by_id[rule_id]))
        rewritten.append(new)
        if not changed:
            notes.append(f"{route.source}: HTTPRoute {route.id} has no mirrors to convert; included unchanged")
            continue
        mirrored.setdefault(route_ns, []).append(route.name)
        found, others = _gateways(doc, route_ns)
        gateways.update(dict.fromkeys(found))
        if others:
            notes.append(
                f"HTTPRoute {route.id}: parents other than Gateways ({', '.join(others)}) get no ClientTrafficPolicy; "
                "strip the slot headers there yourself"
            )
        if not found and not others:
            notes.append(f"HTTPRoute {route.id} has no parentRefs: attach it to a Gateway")
        for rule, raw in zip(route.rules, (doc.get("spec") or {}).get("rules") or [], strict=False):
            if rule.id in sections and not module:
                variants = sections[rule.id][:-1]
                notes.append(
                    f"HTTPRoute {route.id}: rule {raw['name']!r} keeps its name; its mirror variants are named "
                    f"{_variant_pattern(raw['name'], variants)} "
                    "(policies that target the rule by sectionName do not reach the variants)"
                )
    if not mirrored:
        raise ConvertError(
            [
                f"{', '.join(s for s, _ in sources)}: no HTTPRoute rule with a RequestMirror filter (and a backend) to convert",
                *(note for note, random in ignored if random),
            ]
        )

    if module:
        return _module_conversion(rewritten, rule_policies, list(gateways), options, module, notes)
    known = [ns for ns in route_namespaces if ns]
    sampler_ns = options.namespace or (known[0] if known else None)
    if options.namespace is None and len(set(known)) > 1:
        notes.append(
            f"routes span namespaces {', '.join(sorted(set(known)))}: the sampler goes to {sampler_ns} (--namespace chooses), "
            "with a ReferenceGrant for each other namespace"
        )
    grants = [ns for ns in mirrored if ns and sampler_ns and ns != sampler_ns]
    if sampler_ns and None in mirrored:
        notes.append(
            f"some routes have no metadata.namespace: their EnvoyExtensionPolicy names the sampler in namespace {sampler_ns}; "
            "apply both to that namespace, or add a ReferenceGrant"
        )

    service = options.sampler_service
    policies = extension_policies(mirrored, service=service, sampler_ns=sampler_ns, message_timeout_ms=options.message_timeout_ms)
    policies += reference_grants(grants, service=service, sampler_ns=sampler_ns) if sampler_ns else []
    files = {
        "httproutes.yaml": dump_documents(
            rewritten,
            generated_header(
                COMMAND,
                "Apply these INSTEAD of the original HTTPRoutes (same names): the originals'\n"
                "percent / fraction would make Envoy Gateway mirror at random as well.\n"
                "Each mirrored rule is now variant rules (matching the slot headers the sampler\n"
                "sets: header value = the mirror backend's name) followed by the plain rule.",
            ),
        ),
        "envoy-extension-policy.yaml": dump_documents(
            policies,
            generated_header(
                COMMAND,
                "The sampler as Envoy Gateway's external processor for the rewritten routes\n"
                "(Envoy Gateway v1.9 API: gateway.envoyproxy.io/v1alpha1 EnvoyExtensionPolicy).",
            ),
        ),
        "client-traffic-policy.yaml": dump_documents(
            client_traffic_policies(list(gateways), slot_headers.reserved, service), generated_header(COMMAND, CTP_COMMENT)
        ),
        "sampler.yaml": sampler_manifest(config_text, replace(options, namespace=sampler_ns), COMMAND),
    }
    notes.insert(
        0,
        "Envoy Gateway would also mirror at random if the original HTTPRoutes with percent/fraction were applied: "
        "apply httproutes.yaml instead of them (same names)",
    )
    notes.append(
        "the sampler decides with Gateway API precedence over the HTTPRoutes it was given: give it every HTTPRoute attached to these "
        "Gateways, or a route it does not know may win in Envoy while the sampler decides for another"
    )
    return _closing(files, notes, gateways)


def _module_conversion(
    rewritten: list[Document],
    rule_policies: list[Document],
    gateways: list[tuple[str | None, str]],
    options: SamplerDeployment,
    module: ModuleEngine,
    notes: list[str],
) -> Conversion:
    service = options.sampler_service
    proxy_name, sources_name = service, object_name(service, "module-src")
    namespaces = list(dict.fromkeys(ns for ns, _ in gateways)) or [options.namespace]
    proxies: list[Document] = []
    for ns in namespaces:
        proxies += [source_config_map(sources_name, ns), envoy_proxy(proxy_name, ns, sources_name, module.builder_image)]
    files = {
        "httproutes.yaml": dump_documents(
            rewritten,
            generated_header(
                COMMAND,
                "Apply these INSTEAD of the original HTTPRoutes (same names): the originals'\n"
                "percent / fraction would make Envoy Gateway mirror at random as well.\n"
                "Each mirrored rule is now named variant rules (matching the slot headers the\n"
                "module sets: header value = the mirror backend's name) followed by the plain rule.",
            ),
        ),
        "envoy-extension-policy.yaml": dump_documents(rule_policies, generated_header(f"{COMMAND} --inline module", POLICY_COMMENT)),
        "envoy-proxy.yaml": dump_documents(proxies, generated_header(f"{COMMAND} --inline module", ENVOY_PROXY_COMMENT)),
        "client-traffic-policy.yaml": dump_documents(
            client_traffic_policies(gateways, options.slot_headers.reserved, service), generated_header(COMMAND, CTP_COMMENT)
        ),
    }
    gateway_names = ", ".join(f"{ns + '/' if ns else ''}{name}" for ns, name in gateways)
    notes.insert(
        0,
        "Envoy Gateway would also mirror at random if the original HTTPRoutes with percent/fraction were applied: "
        "apply httproutes.yaml instead of them (same names)",
    )
    notes.append(
        f"the module decides in Envoy Gateway's Envoy (1.39 or 1.40; Envoy Gateway 1.9 ships 1.39): make "
        f"{'the Gateways ' + gateway_names if gateways else 'each Gateway'} use EnvoyProxy {proxy_name} "
        "(spec.infrastructure.parametersRef), or merge envoy-proxy.yaml into the EnvoyProxy they use"
    )
    return _closing(files, notes, gateways)


def _closing(files: dict[str, str], notes: list[str], gateways: object) -> Conversion:
    """What both engines say last: the key, and the ClientTrafficPolicy only where a Gateway was found."""
    notes.append(
        "the default key is x-request-id, which Envoy Gateway generates per request (ClientTrafficPolicy headers.requestID: Generate); "
        "with PreserveOrGenerate clients could choose their own sample"
    )
    if not gateways:
        notes.append("no Gateway found in parentRefs: no ClientTrafficPolicy written; strip the slot headers before routing yourself")
        del files["client-traffic-policy.yaml"]
    return Conversion(files=files, notes=notes)
