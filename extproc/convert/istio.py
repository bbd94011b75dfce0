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
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import re2
from betterproto2 import Casing

from ..config.manifests import parse_manifests
from ..config.settings import HOSTNAME, METHODS, NAME
from ..core.matching import Entry, compile_regex
from ..core.policy import SAMPLER_CLUSTER, Route
from ..core.sampling import Fraction
from ..core.slots import SlotHeaders
from ..core.variants import rule_layout
from ..envoy import render
from . import Conversion, ConvertError
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

ISTIO_APIS = ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3")
COMMAND = "convert istio"
MESH = "mesh"
ROUTER = "envoy.filters.http.router"
HCM = "envoy.filters.network.http_connection_manager"
# Route fields the sampler cannot see or express: a route using them is left as it was.
_UNTRANSLATABLE_MATCH = ("authority", "scheme", "port", "sourceLabels", "sourceNamespace", "gateways", "withoutHeaders", "statPrefix")
_REGEX_SPECIAL = set("\\.+*?()|[]{}^$")


class Untranslatable(Exception):
    """This route has no exact HTTPRoute equivalent; the message says why."""


@dataclass
class Mirror:
    destination: dict[str, Any]
    fraction: Fraction
    token: str
    entry: dict[str, Any] | None = None  # the mirrors[] entry, when the route used mirrors[]


@dataclass
class HttpRoute:
    """One VirtualService http[] route and what the conversion made of it."""

    index: int
    raw: dict[str, Any]
    mirrors: list[Mirror]
    rule: dict[str, Any] | None = None  # the translated HTTPRoute rule; None: untranslatable
    reason: str = ""
    converted: bool = False


@dataclass
class VirtualService:
    source: str
    doc: Document
    namespace: str | None
    name: str
    hostnames: list[str] | None  # None: the hosts cannot be translated
    routes: list[HttpRoute] = field(default_factory=list)
    host_reason: str = ""

    @property
    def id(self) -> str:
        return f"{self.namespace or 'default'}/{self.name}"

    @property
    def gateways(self) -> list[str]:
        return list((self.doc.get("spec") or {}).get("gateways") or [])


def percent_fraction(value: object, where: str) -> Fraction:
    """An Istio percentage (a double) as an exact fraction: 12.5 -> 125/1000."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConvertError([f"{where}: must be a number 0..100, got {value!r}"])
    try:
        # repr: the shortest text that reads back as this double, i.e. what the user wrote.
        d = (Decimal(repr(value)) if isinstance(value, float) else Decimal(value)).normalize()
    except InvalidOperation:
        raise ConvertError([f"{where}: must be a number 0..100, got {value!r}"]) from None
    if not d.is_finite() or not 0 <= d <= 100:
        raise ConvertError([f"{where}: must be a number 0..100, got {value!r}"])
    exponent = d.as_tuple().exponent
    places = max(0, -exponent) if isinstance(exponent, int) else 0
    return Fraction(int(d.scaleb(places)), 100 * 10**places)


def token(destination: dict[str, Any]) -> str:
    """The slot header value for a destination: host (+ "--" subset), lower-case."""
    host = str(destination.get("host", "")).lower()
    subset = destination.get("subset")
    return f"{host}--{str(subset).lower()}" if subset else host


def _destination(raw: object, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict) or not isinstance(raw.get("host"), str) or not raw["host"]:
        raise ConvertError([f"{where}: must be a destination with a host, got {raw!r}"])
    return raw


def route_mirrors(raw: dict[str, Any], where: str) -> list[Mirror]:
    mirrors: list[Mirror] = []
    if raw.get("mirror") is not None:
        if raw.get("mirrors"):
            raise ConvertError([f"{where}: set mirror or mirrors, not both"])
        dest = _destination(raw["mirror"], f"{where}.mirror")
        if raw.get("mirrorPercentage") is not None:
            pct = raw["mirrorPercentage"]
            value = pct.get("value", 0) if isinstance(pct, dict) else pct
            fraction = percent_fraction(value, f"{where}.mirrorPercentage.value")
        elif raw.get("mirrorPercent") is not None:  # deprecated integer form
            fraction = percent_fraction(raw["mirrorPercent"], f"{where}.mirrorPercent")
        else:
            fraction = Fraction(100, 100)  # Istio: no percentage mirrors everything
        mirrors.append(Mirror(dest, fraction, token(dest)))
    for j, entry in enumerate(raw.get("mirrors") or []):
        if not isinstance(entry, dict):
            raise ConvertError([f"{where}.mirrors[{j}]: must be a mapping with a destination, got {entry!r}"])
        dest = _destination(entry.get("destination"), f"{where}.mirrors[{j}].destination")
        pct = entry.get("percentage")
        if pct is None:
            fraction = Fraction(100, 100)
        else:
            fraction = percent_fraction(pct.get("value", 0) if isinstance(pct, dict) else pct, f"{where}.mirrors[{j}].percentage.value")
        mirrors.append(Mirror(dest, fraction, token(dest), entry))
    return mirrors


def re2_literal(text: str) -> str:
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in text)


def _value_match(name: str, sm: object, what: str) -> dict[str, str]:
    """An Istio StringMatch as a Gateway API header / query match."""
    if sm is None or sm == {}:
        return {"type": "RegularExpression", "name": name, "value": ".*"}  # present, any value
    if not isinstance(sm, dict) or len(sm) != 1:
        raise Untranslatable(f"{what}: expected one of exact, prefix, regex, got {sm!r}")
    kind, value = next(iter(sm.items()))
    if not isinstance(value, str):
        raise Untranslatable(f"{what}.{kind}: must be a string, got {value!r}")
    if kind == "exact":
        return {"type": "Exact", "name": name, "value": value}
    if kind == "prefix":
        return {"type": "RegularExpression", "name": name, "value": re2_literal(value) + ".*"}
    if kind == "regex":
        # Istio reads regex "*" as "present" (istio/istio#20629).
        return {"type": "RegularExpression", "name": name, "value": ".*" if value == "*" else value}
    raise Untranslatable(f"{what}: unknown match type {kind!r}")


def translate_match(m: object, what: str) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise Untranslatable(f"{what}: must be a mapping, got {m!r}")
    for key in m:
        if key in _UNTRANSLATABLE_MATCH:
            raise Untranslatable(f"{what}.{key}: the sampler cannot see or express it")
        if key not in ("uri", "headers", "queryParams", "method", "name", "ignoreUriCase"):
            raise Untranslatable(f"{what}.{key}: not translatable")
    if m.get("ignoreUriCase"):
        raise Untranslatable(f"{what}.ignoreUriCase: Gateway API paths are case-sensitive")
    out: dict[str, Any] = {}
    uri = m.get("uri")
    if uri:
        if not isinstance(uri, dict) or len(uri) != 1:
            raise Untranslatable(f"{what}.uri: expected one of exact, prefix, regex, got {uri!r}")
        kind, value = next(iter(uri.items()))
        if not isinstance(value, str):
            raise Untranslatable(f"{what}.uri.{kind}: must be a string")
        if kind == "exact":
            out["path"] = {"type": "Exact", "value": value}
        elif kind == "prefix" and value == "/":
            out["path"] = {"type": "PathPrefix", "value": "/"}
        elif kind == "prefix":
            # Istio's prefix is a plain string prefix (/api matches /apis), not
            # Gateway API's segment prefix: a regular expression says exactly that.
            out["path"] = {"type": "RegularExpression", "value": re2_literal(value) + ".*"}
        elif kind == "regex":
            out["path"] = {"type": "RegularExpression", "value": value}
        else:
            raise Untranslatable(f"{what}.uri: unknown match type {kind!r}")
    headers = m.get("headers") or {}
    if not isinstance(headers, dict):
        raise Untranslatable(f"{what}.headers: must be a mapping")
    for name, sm in headers.items():
        if not isinstance(name, str) or name.startswith("@") or name.startswith(":"):
            raise Untranslatable(f"{what}.headers.{name}: JWT claim and pseudo-header matches are not HTTP headers the sampler sees")
        out.setdefault("headers", []).append(_value_match(name.lower(), sm, f"{what}.headers.{name}"))
    params = m.get("queryParams") or {}
    if not isinstance(params, dict):
        raise Untranslatable(f"{what}.queryParams: must be a mapping")
    for name, sm in params.items():
        out.setdefault("queryParams", []).append(_value_match(str(name), sm, f"{what}.queryParams.{name}"))
    method = m.get("method")
    if method is not None:
        if not isinstance(method, dict) or set(method) != {"exact"} or method["exact"] not in METHODS:
            raise Untranslatable(f"{what}.method: only an exact method ({', '.join(METHODS)}) translates, got {method!r}")
        out["method"] = method["exact"]
    return out


def translate_rule(raw: dict[str, Any], mirrors: Sequence[Mirror], where: str) -> dict[str, Any]:
    """The HTTPRoute rule the sampler decides with for this http[] route."""
    if raw.get("delegate") is not None:
        raise Untranslatable(f"{where}.delegate: delegated routes are decided in another VirtualService")
    rule: dict[str, Any] = {}
    matches = raw.get("match") or []
    if not isinstance(matches, list):
        raise Untranslatable(f"{where}.match: must be a list")
    if matches:
        rule["matches"] = [translate_match(m, f"{where}.match[{i}]") for i, m in enumerate(matches)]
    backends = []
    destinations = raw.get("route") or []
    for i, d in enumerate(destinations):
        dest = (d or {}).get("destination") if isinstance(d, dict) else None
        if not isinstance(dest, dict) or not isinstance(dest.get("host"), str):
            raise Untranslatable(f"{where}.route[{i}].destination: must have a host")
        ref: dict[str, Any] = {"name": token(dest)}
        if len(destinations) > 1:
            ref["weight"] = d.get("weight", 0)
        backends.append(ref)
    if backends:
        rule["backendRefs"] = backends
    if mirrors:
        rule["filters"] = [
            {
                "type": "RequestMirror",
                "requestMirror": {
                    "backendRef": {"name": m.token},
                    "fraction": {"numerator": m.fraction.numerator, "denominator": m.fraction.denominator},
                },
            }
            for m in mirrors
        ]
    return rule


def _expand_host(host: str, namespace: str | None, cluster_domain: str) -> list[str]:
    """The names a request may carry for a VirtualService host: a short name
    is relative to the VirtualService's namespace, and a sidecar answers to
    every form of a Service's name."""
    ns = namespace or "default"
    suffix = f".svc.{cluster_domain}"
    if "." not in host:
        return [host, f"{host}.{ns}", f"{host}.{ns}.svc", f"{host}.{ns}{suffix}"]
    if host.endswith(suffix) and host.count(".") == 2 + cluster_domain.count(".") + 1:
        name, svc_ns = host.split(".")[:2]
        return ([name] if svc_ns == ns else []) + [f"{name}.{svc_ns}", f"{name}.{svc_ns}.svc", host]
    return [host]


def translate_hosts(hosts: object, namespace: str | None, cluster_domain: str) -> list[str]:
    """Gateway API hostnames for VirtualService hosts ([] = every host)."""
    if not isinstance(hosts, list) or not hosts:
        raise Untranslatable("spec.hosts: must be a non-empty list")
    out: list[str] = []
    for h in hosts:
        if not isinstance(h, str):
            raise Untranslatable(f"spec.hosts: {h!r} is not a host name")
        if h == "*":
            return []
        host = h.lower()
        if "/" in host or not HOSTNAME.match(host):
            raise Untranslatable(f"spec.hosts: {h!r} has no Gateway API hostname equivalent")
        out.extend(_expand_host(host, namespace, cluster_domain))
    return list(dict.fromkeys(out))


def _string_overlap(a: object, b: object) -> bool:
    """False only when no value can satisfy both StringMatches."""
    if not isinstance(a, dict) or not isinstance(b, dict) or len(a) != 1 or len(b) != 1:
        return True
    (ka, va), (kb, vb) = next(iter(a.items())), next(iter(b.items()))
    if not isinstance(va, str) or not isinstance(vb, str):
        return True
    if ka == "prefix" and kb == "exact" or ka == "regex" and kb == "exact":
        (ka, va), (kb, vb) = (kb, vb), (ka, va)
    if ka == "exact" and kb == "exact":
        return va == vb
    if ka == "exact" and kb == "prefix":
        return va.startswith(vb)
    if ka == "prefix" and kb == "prefix":
        return va.startswith(vb) or vb.startswith(va)
    if ka == "exact" and kb == "regex" and vb != "*":
        try:
            return compile_regex(vb).fullmatch(va.encode()) is not None
        except re2.error:
            return True
    return True


def may_overlap(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether one request could satisfy both Istio match entries (True when unsure)."""
    if not _string_overlap(a.get("uri"), b.get("uri")) or not _string_overlap(a.get("method"), b.get("method")):
        return False
    for key in ("headers", "queryParams"):
        ma, mb = a.get(key) or {}, b.get(key) or {}
        if isinstance(ma, dict) and isinstance(mb, dict):
            for name in set(ma) & set(mb):
                if not _string_overlap(ma[name], mb[name]):
                    return False
    return True


def _check_alone(rule: dict[str, Any], where: str, slots: int) -> None:
    """The sampler's own loader on this one rule: what it refuses (a regex RE2
    rejects, a mirror to the primary itself...) is not translated."""
    doc = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "check"}, "spec": {"rules": [rule]}}
    _, _, problems = parse_manifests(dump_documents([doc], ""), where, slots)
    if problems:
        raise Untranslatable(problems[0].split(": ", 1)[-1])


def _sampler_route(vs: VirtualService) -> Document:
    translated = [r for r in vs.routes if r.rule is not None]
    spec: dict[str, Any] = {}
    if vs.hostnames:
        spec["hostnames"] = vs.hostnames
    spec["rules"] = [r.rule for r in translated]
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {
            **metadata(vs.name, vs.namespace),
            "annotations": {
                # Rule i of this HTTPRoute is http[<n>] of the VirtualService (the sampler's rule id is namespace/name/i).
                "convert.mirror-sampler.dev/translated-from": f"VirtualService {vs.id} "
                + ", ".join(f"http[{r.index}]" for r in translated),
            },
        },
        "spec": spec,
    }


def _order_problems(vs: VirtualService, route: Route) -> dict[int, str]:
    """http index -> why the sampler could pick another rule than Istio for
    this mirrored route: a later route (Istio never reaches it first) that may
    take the same request and outranks it in Gateway API precedence."""
    translated = [r for r in vs.routes if r.rule is not None]
    raw_matches = [list(r.raw.get("match") or [{}]) for r in translated]
    entries = [[Entry(match, rule, "", route.id, ri, mi) for mi, match in enumerate(rule.matches)] for ri, rule in enumerate(route.rules)]
    problems: dict[int, str] = {}
    for k, r in enumerate(translated):
        if not r.mirrors:
            continue
        for later in range(k + 1, len(translated)):
            clash = [
                (mk, ml)
                for mk, ek in enumerate(entries[k])
                for ml, el in enumerate(entries[later])
                if el.sort_key() < ek.sort_key() and may_overlap(raw_matches[k][mk], raw_matches[later][ml])
            ]
            if clash:
                problems[r.index] = (
                    f"http[{translated[later].index}] comes later but may take the same requests and ranks first in Gateway API precedence "
                    "(the sampler's), so the sampler could decide for the wrong route"
                )
                break
    return problems


def _token(mirror: Mirror) -> str:
    return mirror.token


def _routes(h: HttpRoute, slot_headers: SlotHeaders) -> list[dict[str, Any]]:
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
    made: neither the backend nor the mirror sees a slot header."""
    if route.get("route") is None:
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
            http += [_remove_slots(r, slot_headers.names) for r in _routes(h, slot_headers)]
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
    patches = []
    for context in contexts:
        match = {"context": context, "listener": {"filterChain": {"filter": {"name": HCM, "subFilter": {"name": ROUTER}}}}}
        # Patches apply in order: the strip filter lands before the router,
        # then ext_proc between it and the router.
        patches.append(
            {
                "applyTo": "HTTP_FILTER",
                "match": copy.deepcopy(match),
                "patch": {"operation": "INSERT_BEFORE", "value": copy.deepcopy(strip)},
            }
        )
        patches.append(
            {
                "applyTo": "HTTP_FILTER",
                "match": copy.deepcopy(match),
                "patch": {"operation": "INSERT_BEFORE", "value": copy.deepcopy(ext_proc)},
            }
        )
    return {
        "apiVersion": "networking.istio.io/v1alpha3",
        "kind": "EnvoyFilter",
        "metadata": metadata(name, namespace),
        "spec": {"configPatches": patches},
    }


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


def convert_istio(
    paths: Sequence[Path], options: SamplerDeployment = DEFAULT_DEPLOYMENT, *, cluster_domain: str = "cluster.local"
) -> Conversion:
    """Read the VirtualService files and convert them (``convert_istio_sources``)."""
    return convert_istio_sources(read_sources(paths), options, cluster_domain=cluster_domain)


def _load(sources: Sequence[tuple[str, str]], cluster_domain: str) -> list[VirtualService]:
    services: list[VirtualService] = []
    problems: list[str] = []
    for source, text in sources:
        for i, doc in enumerate(load_documents(text, source)):
            if doc.get("kind") != "VirtualService":
                continue
            where = f"{source} (document {i + 1})"
            if doc.get("apiVersion") not in ISTIO_APIS:
                problems.append(f"{where}: apiVersion: must be one of {', '.join(ISTIO_APIS)}, got {doc.get('apiVersion')!r}")
                continue
            meta = doc.get("metadata") or {}
            name, ns = meta.get("name"), meta.get("namespace")
            if not isinstance(name, str) or not NAME.match(name):
                problems.append(f"{where}: metadata.name: must be a DNS-1123 name, got {name!r}")
                continue
            spec = doc.get("spec")
            if not isinstance(spec, dict):
                problems.append(f"{where}: spec: is required")
                continue
            vs = VirtualService(where, doc, ns, name, None)
            try:
                vs.hostnames = translate_hosts(spec.get("hosts"), ns, cluster_domain)
            except Untranslatable as e:
                vs.host_reason = str(e)
            for j, raw in enumerate(spec.get("http") or []):
                if not isinstance(raw, dict):
                    problems.append(f"{where}: spec.http[{j}]: must be a mapping")
                    continue
                try:
                    vs.routes.append(HttpRoute(j, raw, route_mirrors(raw, f"spec.http[{j}]")))
                except ConvertError as e:
                    problems += [f"{where}: {p}" for p in e.problems]
            services.append(vs)
    if problems:
        raise ConvertError(problems)
    if not services:
        raise ConvertError([f"{', '.join(s for s, _ in sources)}: no VirtualService ({', '.join(ISTIO_APIS)}) found"])
    ids = [vs.id for vs in services]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConvertError([f"VirtualService {d} is defined more than once" for d in duplicates])
    return services


def convert_istio_sources(
    sources: Sequence[tuple[str, str]], options: SamplerDeployment = DEFAULT_DEPLOYMENT, *, cluster_domain: str = "cluster.local"
) -> Conversion:
    """``sources``: (file name, text) pairs holding VirtualServices."""
    slot_headers = options.slot_headers
    services = _load(sources, cluster_domain)
    notes: list[str] = []

    def leave(vs: VirtualService, h: HttpRoute, reason: str) -> None:
        notes.append(f"{vs.source}: VirtualService {vs.id} http[{h.index}] left as it was (Istio keeps mirroring it at random): {reason}")

    # Translate each route; mirrored ones that cannot be translated stay as they were.
    for vs in services:
        if vs.hostnames is None:
            for h in vs.routes:
                if h.mirrors:
                    leave(vs, h, vs.host_reason)
            continue
        for h in vs.routes:
            where = f"spec.http[{h.index}]"
            try:
                if len(h.mirrors) > slot_headers.count:
                    count = slot_headers.count
                    raise Untranslatable(f"{len(h.mirrors)} mirrors but only {count} slot headers (raise --slots / MIRROR_SLOTS)")
                if len({m.token for m in h.mirrors}) < len(h.mirrors):
                    raise Untranslatable("two mirrors of the route have the same host and subset")
                for m in h.mirrors:
                    if not NAME.match(m.token) or len(m.token) > 253 or m.token == SAMPLER_CLUSTER:
                        raise Untranslatable(f"mirror host {m.destination.get('host')!r} has no DNS-1123 form the sampler accepts")
                rule = translate_rule(h.raw, h.mirrors, where)
                _check_alone(rule, f"{vs.source}: VirtualService {vs.id} {where}", slot_headers.count)
                h.rule = rule
            except Untranslatable as e:
                if h.mirrors:
                    leave(vs, h, str(e))

    # One host in two VirtualServices: Istio merges or picks between them in
    # an order the sampler cannot reproduce.
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
                    leave(vs, h, f"a host is shared with VirtualService {', '.join(others)}")
                h.rule = None

    config_routes: list[Document] = []
    rewritten: list[Document] = []
    contexts: dict[str | None, list[str]] = {}
    for vs in services:
        candidates = [h for h in vs.routes if h.rule is not None and h.mirrors]
        if not candidates:
            if not any(h.mirrors for h in vs.routes):
                notes.append(f"VirtualService {vs.id} mirrors nothing; not in virtualservices.yaml")
            continue
        doc = _sampler_route(vs)
        routes, _, problems = parse_manifests(dump_documents([doc], ""), vs.source, slot_headers.count)
        if problems:  # each rule loaded alone; together they must too
            raise ConvertError(problems)
        for h in candidates:
            h.converted = True
        for index, reason in _order_problems(vs, routes[0]).items():
            h = next(r for r in vs.routes if r.index == index)
            h.converted = False
            leave(vs, h, reason)
        for h in vs.routes:
            if h.rule is not None and h.mirrors and not h.converted:
                # Still known to the sampler (so it picks this route, not a later
                # one), but it never mirrors for it: Istio keeps doing that.
                h.rule.pop("filters", None)
        if not any(h.converted for h in vs.routes):
            notes.append(f"VirtualService {vs.id}: nothing converted; not in virtualservices.yaml (keep the one you have)")
            continue
        config_routes.append(_sampler_route(vs))
        rewritten.append(rewrite_virtual_service(vs, slot_headers))
        for ns, ctx in filter_contexts(vs).items():
            for c in ctx:
                if c not in contexts.setdefault(ns, []):
                    contexts[ns].append(c)
        for h in vs.routes:
            for m in h.mirrors if h.converted else ():
                if m.fraction.denominator > 1_000_000:
                    notes.append(
                        f"VirtualService {vs.id} http[{h.index}]: percentage {m.fraction} has more than 4 decimals; Istio itself "
                        "rounded it down to a millionth, the sampler uses it exactly"
                    )
    if not rewritten:
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
    service, message_timeout_ms = options.sampler_service, options.message_timeout_ms
    filters = [
        envoy_filter(
            ns, ctx, slot_headers=slot_headers, cluster=cluster, authority=authority, message_timeout_ms=message_timeout_ms, name=service
        )
        for ns, ctx in contexts.items()
    ]
    config_text = dump_documents(
        config_routes,
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
    files = {
        "virtualservices.yaml": dump_documents(
            rewritten,
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
        "sampler.yaml": sampler_manifest(config_text, replace(options, namespace=sampler_ns), COMMAND),
    }
    notes.insert(
        0,
        "Istio would also mirror at random if the original VirtualServices were applied: "
        "apply virtualservices.yaml instead of them (same names)",
    )
    if any("SIDECAR_OUTBOUND" in c for c in contexts.values()):
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
    return Conversion(files=files, notes=notes)
