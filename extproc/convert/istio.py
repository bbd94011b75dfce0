"""`mirror-sampler convert istio`: VirtualServices with ``mirror`` +
``mirrorPercentage`` or ``mirrors[]`` (each a fresh random roll per request
in Envoy) -> consistent, key-based sampling (pure apart from reading the
input files).

Istio has no ext_proc API, so an EnvoyFilter inserts two filters before the
router: a Lua filter that strips client-supplied slot headers and clears the
route cache (Envoy picks the route before the filters run, so a forged slot
header would otherwise keep its variant, also with the sampler down), then
ext_proc. Each converted HTTP route becomes variant routes (its matches plus
exact slot-header matches, the mirrors of that combination at 100%) placed
right before the plain route: Istio matches HTTP routes in order, so a variant
can only take requests its own plain route would have taken.

The sampler reads Gateway API HTTPRoutes, so the VirtualServices' rules are
translated into HTTPRoutes for its configuration. The sampler picks a rule by
Gateway API precedence while Istio takes the first match; a route is converted
only when no later route that might take the same request outranks it there.
Anything that cannot be translated exactly is left as it was, with a note.

This module reads the VirtualServices and runs the phases; ``istio_translate``
translates routes into HTTPRoute rules, ``istio_order`` compares Istio's
order with the sampler's precedence, ``istio_rewrite`` writes what Istio gets;
``istio_module`` is the other engine (``--inline module``: the dynamic module
in Istio's proxies, no sampler).
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config.errors import ConfigError
from ..config.manifest_yaml import DuplicateKey, read_documents, unencodable_paths
from ..config.manifests import parse_manifests
from ..config.schema import MAX_RULES_PER_ROUTE
from ..config.settings import NAME
from ..core.slots import SlotHeaders
from . import Conversion, ConvertError
from .istio_module import convert_with_module
from .istio_order import order_problems, outranking_delegates
from .istio_rewrite import envoy_filter, filter_contexts, rewrite_virtual_service
from .istio_translate import (
    TRANSLATED_FROM,
    HttpRoute,
    Untranslatable,
    VirtualService,
    checked_rule,
    left_note,
    route_mirrors,
    route_problems,
    sampler_routes,
    spec_problems,
    translate_hosts,
    translation_problems,
)
from .kubernetes import (
    DEFAULT_DEPLOYMENT,
    GRPC_PORT,
    Document,
    SamplerDeployment,
    dump_documents,
    generated_header,
    read_sources,
    sampler_manifest,
)
from .module_delivery import ModuleEngine

ISTIO_APIS = ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3")
COMMAND = "convert istio"


def convert_istio(
    paths: Sequence[Path],
    options: SamplerDeployment = DEFAULT_DEPLOYMENT,
    *,
    cluster_domain: str = "cluster.local",
    module: ModuleEngine | None = None,
) -> Conversion:
    """Read the VirtualService files and convert them (``convert_istio_sources``)."""
    return convert_istio_sources(read_sources(paths), options, cluster_domain=cluster_domain, module=module)


def _documents(source: str, text: str) -> list[tuple[str, Document, list[DuplicateKey]]]:
    """(``FILE (document N)``, document, its duplicate keys) for each mapping document,
    numbered as the file counts them (empty documents included)."""
    try:
        documents = read_documents(text, source)
    except ConfigError as e:
        raise ConvertError(e.problems) from None
    out = []
    for i, (doc, duplicates) in enumerate(documents):
        where = f"{source} (document {i + 1})"
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ConvertError([f"{where}: must be a mapping with apiVersion and kind, got {type(doc).__name__}"])
        out.append((where, doc, duplicates))
    return out


# Other kinds that mirror requests in Istio: Gateway API routes with RequestMirror filters.
_GATEWAY_ROUTES = ("HTTPRoute", "GRPCRoute")


def _ignored_note(where: str, doc: Document) -> str:
    """Why a document that is not a VirtualService changes nothing, said for what it is."""
    kind = doc.get("kind")
    meta = doc.get("metadata")
    name, ns = (meta.get("name"), meta.get("namespace")) if isinstance(meta, dict) else (None, None)
    label = f"{kind} {f'{ns}/' if isinstance(ns, str) else ''}{name}" if isinstance(name, str) else str(kind)
    if kind in _GATEWAY_ROUTES:
        if "RequestMirror" in repr(doc.get("spec")):
            return f"{where}: {label} ignored: {COMMAND} converts only VirtualServices; its RequestMirror filters keep mirroring at random"
        return f"{where}: {label} ignored: not a VirtualService (and it has no RequestMirror filter)"
    if kind == "EnvoyFilter" and "mirror" in repr(doc.get("spec")).lower():
        return f"{where}: {label} ignored: {COMMAND} converts only VirtualServices; mirrors this EnvoyFilter adds keep mirroring at random"
    items = doc.get("items")
    if isinstance(items, list) and any(isinstance(i, dict) and i.get("kind") == "VirtualService" for i in items):
        return f"{where}: {label} ignored: the VirtualServices in its items are not read; give each as a document of its own (---)"
    return f"{where}: {label} ignored: not a VirtualService"


def _kind_problem(kind: object, api_version: object) -> str | None:
    if not isinstance(kind, str) or not kind:
        return f"kind: is required (a Kubernetes manifest names its kind), got {kind!r}"
    # A near miss is a typo only in Istio's group (or where no group is given):
    # NGINX's VirtualServer, a VirtualServiceList, are real kinds of their own.
    # ("v1" is the core group: no Istio kind there.)
    group = api_version.partition("/")[0] if isinstance(api_version, str) and api_version else None
    near = difflib.SequenceMatcher(None, kind.lower(), "virtualservice").ratio() >= 0.8
    if kind != "VirtualService" and near and group in (None, "networking.istio.io"):
        return f"kind: unknown kind {kind!r}; did you mean VirtualService?"
    return None


def _load(sources: Sequence[tuple[str, str]], cluster_domain: str, notes: list[str]) -> list[VirtualService]:
    """The VirtualServices of ``sources``, every field the conversion relies on checked;
    a note in ``notes`` for each other document."""
    services: list[VirtualService] = []
    problems: list[str] = []
    for source, text in sources:
        for where, doc, duplicates in _documents(source, text):
            kind = doc.get("kind")
            problem = _kind_problem(kind, doc.get("apiVersion"))
            if problem is not None:
                problems.append(f"{where}: {problem}")
                continue
            if kind != "VirtualService":
                notes.append(_ignored_note(where, doc))
                continue
            vs, found = _virtual_service(where, doc, duplicates, cluster_domain)
            problems += found
            if vs is not None:
                services.append(vs)
    if problems:
        raise ConvertError(problems)
    if not services:
        raise ConvertError([f"{', '.join(s for s, _ in sources)}: no VirtualService ({', '.join(ISTIO_APIS)}) found", *notes])
    ids = [vs.id for vs in services]
    defined_twice = sorted({i for i in ids if ids.count(i) > 1})
    if defined_twice:
        raise ConvertError([f"VirtualService {d} is defined more than once" for d in defined_twice])
    return services


def _virtual_service(
    where: str, doc: Document, duplicates: Sequence[DuplicateKey], cluster_domain: str
) -> tuple[VirtualService | None, list[str]]:
    """One VirtualService document, or None and every problem found."""
    if doc.get("apiVersion") not in ISTIO_APIS:
        return None, [f"{where}: apiVersion: must be one of {', '.join(ISTIO_APIS)}, got {doc.get('apiVersion')!r}"]
    problems = [f"{where}: {dup.path}: {dup.message}" for dup in duplicates]
    problems += [f"{where}: {path}: must be valid Unicode text (lone surrogate escape)" for path in unencodable_paths(doc)]
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return None, [*problems, f"{where}: metadata: expected a mapping with name and namespace, got {meta!r}"]
    name, ns = meta.get("name"), meta.get("namespace")
    if not isinstance(name, str) or not NAME.match(name) or len(name) > 253:
        problems.append(f"{where}: metadata.name: must be a DNS-1123 name, got {name!r}")
    if ns is not None and (not isinstance(ns, str) or not NAME.match(ns) or len(ns) > 63):
        problems.append(f"{where}: metadata.namespace: must be a DNS-1123 name, got {ns!r}")
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        wrong = "is required" if spec is None else f"expected a mapping (the VirtualService's routing), got {spec!r}"
        return None, [*problems, f"{where}: spec: {wrong}"]
    problems += [f"{where}: {p}" for p in spec_problems(spec)]
    if problems:
        return None, problems
    assert isinstance(name, str)
    vs = VirtualService(where, doc, ns, name, None)
    try:
        vs.hostnames = translate_hosts(spec.get("hosts"), ns, cluster_domain)
    except Untranslatable as e:
        vs.host_reason = str(e)
    for j, raw in enumerate(spec.get("http") or []):
        at = f"spec.http[{j}]"
        if not isinstance(raw, dict):
            problems.append(f"{where}: {at}: expected a mapping (an HTTP route), got {raw!r}")
            continue
        found = route_problems(raw, at)
        if found:
            problems += [f"{where}: {p}" for p in found]
            continue
        try:
            vs.routes.append(HttpRoute(j, raw, route_mirrors(raw, at)))
        except ConvertError as e:
            problems += [f"{where}: {p}" for p in e.problems]
    return (None, problems) if problems else (vs, [])


def _translate(services: Sequence[VirtualService], slot_headers: SlotHeaders, notes: list[str]) -> None:
    """Each route's HTTPRoute rule (``HttpRoute.rule``); mirrored ones that
    cannot be translated stay as they were."""
    for vs in services:
        if vs.hostnames is None:
            for h in vs.routes:
                if h.mirrors:
                    notes.append(left_note(vs, h, vs.host_reason))
            continue
        for h in vs.routes:
            try:
                h.rule = checked_rule(vs, h, h.raw, slot_headers)
            except Untranslatable as e:
                if h.mirrors:
                    notes.append(left_note(vs, h, str(e)))
                if h.delegates and h.mirrors:
                    # Still known to the sampler, mirroring nothing: it decides nothing for
                    # what Istio sends to the delegate (and later routes keep their place).
                    with contextlib.suppress(Untranslatable):
                        h.rule = checked_rule(vs, replace(h, mirrors=[]), h.raw, slot_headers)


def _drop_shared_hosts(services: Sequence[VirtualService], notes: list[str]) -> None:
    """One host in two VirtualServices: Istio merges or picks between them in
    an order the sampler cannot reproduce, so neither is translated."""
    owners: dict[str, list[VirtualService]] = {}
    for vs in services:
        for host in vs.hostnames or ([""] if vs.hostnames == [] else []):
            owners.setdefault(host, []).append(vs)
    shared = {id(vs) for group in owners.values() if len(group) > 1 for vs in group}
    for vs in services:
        if id(vs) in shared:
            others = sorted({o.id for group in owners.values() if vs in group for o in group if o is not vs})
            for h in vs.routes:
                if h.mirrors and h.rule is not None:
                    notes.append(left_note(vs, h, f"a host is shared with VirtualService {', '.join(others)}"))
                h.rule = None


@dataclass
class _Converted:
    config_routes: list[Document] = field(default_factory=list)  # the sampler's HTTPRoutes
    rewritten: list[Document] = field(default_factory=list)  # the VirtualServices for Istio
    contexts: dict[str | None, list[str]] = field(default_factory=dict)  # namespace -> EnvoyFilter contexts


def _convert(services: Sequence[VirtualService], slot_headers: SlotHeaders, notes: list[str]) -> _Converted:
    """Each VirtualService with a translated mirrored route: its sampler
    HTTPRoute, checked for precedence against Istio's order, and its rewrite."""
    out = _Converted()
    for vs in services:
        candidates = [h for h in vs.routes if h.rule is not None and h.mirrors and not h.delegates]
        if not candidates:
            if not any(h.mirrors for h in vs.routes):
                notes.append(f"VirtualService {vs.id} mirrors nothing; not in virtualservices.yaml")
            continue
        parsed = parse_manifests(dump_documents(sampler_routes(vs), ""), "", slot_headers.count)
        if parsed.problems:  # each rule loaded alone; together they must too
            raise ConvertError(translation_problems(vs, parsed.problems))
        while outranking := outranking_delegates(vs, parsed.routes):
            # A delegating route that would take an earlier mirrored route's
            # requests in the sampler's precedence is left out of its copy.
            for h in vs.routes:
                if h.index in outranking:
                    h.rule = None
            parsed = parse_manifests(dump_documents(sampler_routes(vs), ""), "", slot_headers.count)
        for h in candidates:
            h.converted = True
        for index, reason in order_problems(vs, parsed.routes).items():
            h = next(r for r in vs.routes if r.index == index)
            h.converted = False
            notes.append(left_note(vs, h, reason))
        for h in vs.routes:
            if h.rule is not None and h.mirrors and not h.converted:
                # Still known to the sampler (so it picks this route, not a later
                # one), but it never mirrors for it: Istio keeps doing that.
                h.rule.pop("filters", None)
        if not any(h.converted for h in vs.routes):
            notes.append(f"VirtualService {vs.id}: nothing converted; not in virtualservices.yaml (keep the one you have)")
            continue
        out.config_routes += sampler_routes(vs)
        out.rewritten.append(rewrite_virtual_service(vs, slot_headers))
        notes += [_delegate_note(vs, h, slot_headers) for h in vs.routes if h.raw.get("delegate") is not None]
        for ns, ctx in filter_contexts(vs).items():
            for c in ctx:
                if c not in out.contexts.setdefault(ns, []):
                    out.contexts[ns].append(c)
        for h in vs.routes:
            for m in h.mirrors if h.converted else ():
                if m.fraction.denominator > 1_000_000:
                    notes.append(
                        f"VirtualService {vs.id} http[{h.index}]: percentage {m.fraction} has more than 4 decimals; Istio itself "
                        "rounded it down to a millionth, the sampler uses it exactly"
                    )
    _check_unique(out.config_routes)
    return out


def _check_unique(config_routes: Sequence[Document]) -> None:
    """Two VirtualServices whose sampler HTTPRoutes would have the same name: a
    VirtualService needing several takes "<name>-<nn>", which another may be called."""
    owners: dict[str, str] = {}
    for doc in config_routes:
        meta = doc["metadata"]
        route_id = f"{meta.get('namespace') or 'default'}/{meta['name']}"
        owner = meta["annotations"][TRANSLATED_FROM].split(" ")[1]
        if owners.setdefault(route_id, owner) != owner:
            raise ConvertError(
                [
                    f"VirtualServices {owners[route_id]} and {owner} both need the sampler's HTTPRoute {route_id} "
                    f"(a VirtualService with more than {MAX_RULES_PER_ROUTE} routes or host names takes <name>-02, <name>-03... "
                    "after its own); "
                    "rename one"
                ]
            )


def _delegate_note(vs: VirtualService, h: HttpRoute, slot_headers: SlotHeaders) -> str:
    target = h.raw["delegate"]
    name = f"{target.get('namespace') or vs.namespace or 'default'}/{target.get('name')}"
    decided = (
        "the sampler mirrors nothing for the requests it matches, also for any its delegate does not route (Istio passes those "
        "on to the routes after it)"
        if h.rule is not None
        else "it would outrank an earlier mirrored route in the sampler's precedence, so the sampler decides for the requests "
        "it alone matches as for the routes after it (it may mirror them: Istio sends them to the delegate, without the slot "
        "headers)"
    )
    return (
        f"{vs.source}: VirtualService {vs.id} http[{h.index}] delegates to VirtualService {name}: {decided}; "
        "and Istio gives its headers.request.remove (the slot headers) only to the delegate's routes that set no headers "
        f"of their own: add {', '.join(slot_headers.names)} to the headers.request.remove of those that do"
    )


def convert_istio_sources(
    sources: Sequence[tuple[str, str]],
    options: SamplerDeployment = DEFAULT_DEPLOYMENT,
    *,
    cluster_domain: str = "cluster.local",
    module: ModuleEngine | None = None,
) -> Conversion:
    """``sources``: (file name, text) pairs holding VirtualServices. ``module``: decide in
    Istio's proxies with the dynamic module (``--inline module``, ``istio_module``)
    instead of the ext_proc sampler."""
    slot_headers = options.slot_headers
    notes: list[str] = []
    services = _load(sources, cluster_domain, notes)
    if module is not None:
        return convert_with_module(services, options, module, notes)
    _translate(services, slot_headers, notes)
    _drop_shared_hosts(services, notes)
    converted = _convert(services, slot_headers, notes)
    if not converted.rewritten:
        raise ConvertError(
            ["no VirtualService route could be converted:", *notes]
            if notes
            else [f"{', '.join(s for s, _ in sources)}: no VirtualService route with mirror or mirrors to convert"]
        )

    known = [vs.namespace for vs in services if vs.namespace]
    sampler_ns = options.namespace or (known[0] if known else None)
    authority = f"{options.sampler_service}.{sampler_ns or 'default'}.svc.{cluster_domain}"
    # Istio's name for the Service's outbound cluster.
    cluster = f"outbound|{GRPC_PORT}||{authority}"
    files = _files(converted, replace(options, namespace=sampler_ns), cluster, authority)
    return Conversion(files=files, notes=_closing_notes(notes, converted, sampler_ns, authority))


def _files(converted: _Converted, options: SamplerDeployment, cluster: str, authority: str) -> dict[str, str]:
    """``options``: the sampler's, in the namespace it goes to."""
    filters = [
        envoy_filter(
            ns,
            ctx,
            slot_headers=options.slot_headers,
            cluster=cluster,
            authority=authority,
            message_timeout_ms=options.message_timeout_ms,
            name=options.sampler_service,
        )
        for ns, ctx in converted.contexts.items()
    ]
    config_text = dump_documents(
        converted.config_routes,
        generated_header(
            COMMAND,
            "The sampler's configuration: the VirtualServices' mirrored routes translated\n"
            "into Gateway API HTTPRoutes (the form the sampler reads). Istio's uri prefix is\n"
            "a plain string prefix, written here as a regular expression; presence matches\n"
            "are regular expressions matching any value; mirrorPercentage is an exact\n"
            "fraction (12.5 -> 125/1000); backend names are the slot header tokens\n"
            '(host, plus "--subset"). Routes left as they were have no RequestMirror here.',
        ),
    )
    return {
        "virtualservices.yaml": dump_documents(
            converted.rewritten,
            generated_header(
                COMMAND,
                "Apply these INSTEAD of the original VirtualServices (same names): the originals'\n"
                "mirrorPercentage would make Istio mirror at random as well. Each converted route\n"
                "is preceded by its variants, which match the slot headers the sampler sets.",
            ),
        ),
        "envoy-filter.yaml": dump_documents(
            filters,
            generated_header(
                COMMAND,
                "Before the router: a Lua filter removing client-supplied slot and marker headers\n"
                "(and re-matching the route they may have selected), then ext_proc calling the\n"
                f"sampler ({cluster}), failing open. GATEWAY patches\n"
                "belong in the namespace of the gateway's pods (this file uses the Gateway\n"
                "resource's namespace); SIDECAR_OUTBOUND ones apply to the sidecars of their namespace.",
            ),
        ),
        "sampler.yaml": sampler_manifest(config_text, options, COMMAND),
    }


def _closing_notes(notes: list[str], converted: _Converted, sampler_ns: str | None, authority: str) -> list[str]:
    """``notes`` with what every conversion's reader must know around them."""
    notes.insert(
        0,
        "Istio would also mirror at random if the original VirtualServices were applied: "
        "apply virtualservices.yaml instead of them (same names)",
    )
    if any("SIDECAR_OUTBOUND" in c for c in converted.contexts.values()):
        notes.append(
            "SIDECAR_OUTBOUND: every outbound HTTP request of the sidecars in the EnvoyFilter's namespace consults the sampler; "
            "clients in other namespaces need a copy there (or in Istio's root namespace)"
        )
    notes.append(
        "the Lua filter and ext_proc clear the route cache after Istio's own filters (authorization included) have run; "
        "a variant routes to the same destinations as its plain route, so only the mirrors change (istioctl analyze may warn IST0178)"
    )
    notes.append(
        "the default key is x-request-id: an Istio ingress gateway generates it for external clients, but sidecars keep the caller's, "
        "so a caller inside the mesh that sets it chooses its sample"
    )
    if sampler_ns is None:
        notes.append(f"no namespace given or found: the EnvoyFilter calls the sampler at {authority}; apply sampler.yaml there")
    return notes
