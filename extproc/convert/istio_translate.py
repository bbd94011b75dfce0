"""VirtualServices as ``convert istio`` reads them, and their routes
translated into the HTTPRoute rules the sampler decides with (pure).

The sampler reads Gateway API HTTPRoutes; anything in a route that has no
exact HTTPRoute equivalent raises ``Untranslatable``, and the route is left
as it was.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from ..config.manifests import parse_manifests
from ..config.schema import MAX_HOSTNAMES_PER_ROUTE, MAX_MATCHES_PER_ROUTE, MAX_RULES_PER_ROUTE, route_match_count
from ..config.settings import HOSTNAME, METHODS, NAME
from ..core.policy import SAMPLER_CLUSTER
from ..core.sampling import Fraction
from ..core.slots import SlotHeaders
from . import ConvertError
from .kubernetes import Document, dump_documents, metadata

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

    @property
    def delegates(self) -> bool:
        """Whether Istio routes this route's requests by another VirtualService's routes."""
        return self.raw.get("delegate") is not None


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


def _typed(problems: list[str], where: str, value: object, expected: type, what: str, *, required: bool = False) -> bool:
    """Whether ``value`` has the type Istio's schema gives the field (absent counts unless
    ``required``); else a problem "<where>: expected <what>, got <value>"."""
    if value is None and not required:
        return True
    if isinstance(value, expected) and not isinstance(value, bool):
        return True
    problems.append(f"{where}: expected {what}, got {value!r}")
    return False


def _string_list(problems: list[str], where: str, value: object, what: str) -> None:
    if _typed(problems, where, value, list, f"a list of {what}s") and isinstance(value, list):
        for i, item in enumerate(value):
            _typed(problems, f"{where}[{i}]", item, str, f"a {what}", required=True)


def spec_problems(spec: dict[str, Any]) -> list[str]:
    """The VirtualService-level fields the conversion reads, checked against the types
    Istio's schema gives them (the API server would refuse anything else)."""
    problems: list[str] = []
    _string_list(problems, "spec.hosts", spec.get("hosts"), "host name")
    _string_list(problems, "spec.gateways", spec.get("gateways"), "gateway name")
    _typed(problems, "spec.http", spec.get("http"), list, "a list of HTTP routes")
    return problems


_STRING_MATCHES = ("uri", "scheme", "method", "authority")
_MATCH_MAPS = ("headers", "queryParams", "withoutHeaders")


def route_problems(raw: dict[str, Any], where: str) -> list[str]:
    """One http[] route's fields that the conversion reads or rewrites, checked against
    the types Istio's schema gives them."""
    p: list[str] = []
    _typed(p, f"{where}.name", raw.get("name"), str, "a string")
    if _typed(p, f"{where}.match", raw.get("match"), list, "a list of match conditions"):
        for i, m in enumerate(raw.get("match") or []):
            at = f"{where}.match[{i}]"
            if not _typed(p, at, m, dict, "a mapping (a match condition)", required=True):
                continue
            _typed(p, f"{at}.name", m.get("name"), str, "a string")
            for key in _STRING_MATCHES:
                _typed(p, f"{at}.{key}", m.get(key), dict, "a mapping (exact, prefix or regex)")
            for key in _MATCH_MAPS:
                _typed(p, f"{at}.{key}", m.get(key), dict, "a mapping of names to string matches")
    if _typed(p, f"{where}.route", raw.get("route"), list, "a list of destinations"):
        for i, d in enumerate(raw.get("route") or []):
            at = f"{where}.route[{i}]"
            if not _typed(p, at, d, dict, "a mapping with a destination", required=True):
                continue
            dest = d.get("destination")
            if _typed(p, f"{at}.destination", dest, dict, "a mapping with a host", required=True):
                host = dest.get("host")
                if not isinstance(host, str) or not host:
                    p.append(f"{at}.destination.host: expected a host name, got {host!r}")
            _typed(p, f"{at}.weight", d.get("weight"), int, "an integer")
            _typed(p, f"{at}.headers", d.get("headers"), dict, "a mapping (request, response)")
    for key in ("redirect", "directResponse", "delegate", "rewrite"):
        _typed(p, f"{where}.{key}", raw.get(key), dict, "a mapping")
    if raw.get("delegate") is not None:
        for key in ("route", "redirect", "directResponse"):
            if raw.get(key) is not None:
                p.append(f"{where}.{key}: not allowed with delegate (Istio: a delegating route leaves routing to its delegate)")
    _typed(p, f"{where}.mirrors", raw.get("mirrors"), list, "a list of mirrors")
    headers = raw.get("headers")
    if _typed(p, f"{where}.headers", headers, dict, "a mapping (request, response)") and headers:
        for side in ("request", "response"):
            ops = headers.get(side)
            at = f"{where}.headers.{side}"
            if _typed(p, at, ops, dict, "a mapping (set, add, remove)") and ops:
                _typed(p, f"{at}.set", ops.get("set"), dict, "a mapping of header names to values")
                _typed(p, f"{at}.add", ops.get("add"), dict, "a mapping of header names to values")
                _string_list(p, f"{at}.remove", ops.get("remove"), "header name")
    return p


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


def check_mirrors(mirrors: Sequence[Mirror], slot_headers: SlotHeaders) -> None:
    """What every engine needs of a route's mirrors: a slot header each, and a token
    (the slot header's value) naming each target alone, in a form the Policy accepts."""
    if len(mirrors) > slot_headers.count:
        raise Untranslatable(f"{len(mirrors)} mirrors but only {slot_headers.count} slot headers (raise --slots / MIRROR_SLOTS)")
    if len({m.token for m in mirrors}) < len(mirrors):
        raise Untranslatable("two mirrors of the route have the same host and subset")
    for m in mirrors:
        if not NAME.match(m.token) or len(m.token) > 253 or m.token == SAMPLER_CLUSTER:
            raise Untranslatable(f"mirror host {m.destination.get('host')!r} has no DNS-1123 form the sampler accepts")


def left_note(vs: VirtualService, h: HttpRoute, reason: str) -> str:
    return f"{vs.source}: VirtualService {vs.id} http[{h.index}] left as it was (Istio keeps mirroring it at random): {reason}"


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
    """The HTTPRoute rule the sampler decides with for this http[] route. A route that
    delegates forwards too (to its delegate's routes): a rule that mirrors nothing, so
    that the sampler sets no slot header for what Istio sends there, and later routes
    keep their place."""
    if raw.get("delegate") is not None and mirrors:
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


def check_alone(rule: dict[str, Any], slots: int) -> None:
    """The sampler's own loader on this one rule: what it refuses (a regex RE2
    rejects, a mirror to the primary itself...) is not translated."""
    doc = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "check"}, "spec": {"rules": [rule]}}
    problems = parse_manifests(dump_documents([doc], ""), "", slots).problems
    if problems:
        raise Untranslatable(f"as the sampler's HTTPRoute rule: {_without_route_label(problems[0]).removeprefix('spec.rules[0].')}")


def checked_rule(vs: VirtualService, h: HttpRoute, raw: dict[str, Any], slot_headers: SlotHeaders) -> dict[str, Any]:
    """``raw`` (the route, or the part of it an engine translates) as the HTTPRoute rule
    the sampler would load, mirrors and all; Untranslatable when any step refuses it."""
    where = f"spec.http[{h.index}]"
    check_mirrors(h.mirrors, slot_headers)
    rule = translate_rule(raw, h.mirrors, where)
    check_alone(rule, slot_headers.count)
    return rule


def _runs(translated: Sequence[HttpRoute]) -> list[list[HttpRoute]]:
    """The translated routes in order, cut into runs whose rules one HTTPRoute can hold."""
    runs: list[list[HttpRoute]] = [[]]
    for h in translated:
        run = runs[-1]
        if run and (len(run) == MAX_RULES_PER_ROUTE or route_match_count([r.rule for r in [*run, h]]) > MAX_MATCHES_PER_ROUTE):
            runs.append(run := [])
        run.append(h)
    return runs


def sampler_routes(vs: VirtualService) -> list[Document]:
    """The HTTPRoutes the sampler decides with for ``vs``: its translated routes as rules,
    in Istio's order. One HTTPRoute when Gateway API's limits allow (named as the
    VirtualService); otherwise the rules in runs of at most 16 (128 matches), once per
    group of at most 16 hostnames, named "<name>-<nn>" after the first: within a host
    the routes' names sort in the runs' order, so that precedence ties are still
    broken in Istio's order (Gateway API: by namespace/name, then rule index)."""
    translated = [r for r in vs.routes if r.rule is not None]
    runs = _runs(translated)
    hostname_groups = (
        [vs.hostnames[i : i + MAX_HOSTNAMES_PER_ROUTE] for i in range(0, len(vs.hostnames), MAX_HOSTNAMES_PER_ROUTE)]
        if vs.hostnames
        else [[]]
    )
    count = len(runs) * len(hostname_groups)
    docs = []
    for n, (hostnames, run) in enumerate((h, r) for h in hostname_groups for r in runs):
        # Two digits at least: the names of a growing VirtualService's HTTPRoutes (rule ids, metric labels) keep until the 100th.
        name = vs.name if n == 0 else f"{vs.name}-{n + 1:0{max(2, len(str(count)))}d}"
        if len(name) > 253:
            raise ConvertError(
                [
                    f"{vs.source}: metadata.name: {len(vs.name)} characters leave no room for the names of the "
                    f"{count} HTTPRoutes the sampler needs for this VirtualService ({len(translated)} routes, "
                    f"{len(vs.hostnames or [])} host names; at most {MAX_RULES_PER_ROUTE} of each per HTTPRoute)"
                ]
            )
        spec: dict[str, Any] = {}
        if hostnames:
            spec["hostnames"] = hostnames
        spec["rules"] = [r.rule for r in run]
        docs.append(
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute",
                "metadata": {
                    **metadata(name, vs.namespace),
                    "annotations": {
                        # Rule i of this HTTPRoute is the i-th http[] route listed (the sampler's rule id is namespace/name/i).
                        TRANSLATED_FROM: f"VirtualService {vs.id} " + ", ".join(f"http[{r.index}]" for r in run),
                    },
                },
                "spec": spec,
            }
        )
    return docs


TRANSLATED_FROM = "convert.mirror-sampler.dev/translated-from"


def translation_problems(vs: VirtualService, problems: Sequence[str]) -> list[str]:
    """What the sampler's loader says of ``vs``'s HTTPRoutes (loaded with no file name),
    said of the VirtualService: the user wrote no HTTPRoute."""
    return [f"{vs.source}: VirtualService {vs.id}, as the sampler's HTTPRoutes: {_without_route_label(p)}" for p in problems]


def _without_route_label(problem: str) -> str:
    """A loader problem without the "<file> (document N): HTTPRoute <id>: " it starts with."""
    return re.sub(r"^.*?\(document \d+\): (HTTPRoute [^:]+: )?", "", problem, count=1)
