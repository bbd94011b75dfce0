"""One HTTPRoute document to a Route, with every problem named by field path
(pure): the values the CRD's OpenAPI schema cannot check (fractions, regexes,
header values, paths), the CRD's rules across fields, and the sampler's own
annotations (methods, cap, per-target salts). manifests.py finds the
documents; schema.py holds the field list.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from typing import Any

import re2

from ..core.keys import is_header_name
from ..core.matching import Match, PathMatch, PathType, ValueMatch, ValueType, compile_regex
from ..core.policy import SAMPLER_CLUSTER, BackendRef, HeaderModifier, MirrorTarget, Route, Rule
from ..core.sampling import Fraction
from . import schema
from .errors import Problems
from .manifest_yaml import DuplicateKey
from .settings import HOSTNAME, METHODS, NAME, parse_methods, parse_rate

# Characters no header value may carry (and no path Envoy accepts).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# The CRD's header value pattern ^[!-~]+([\t ]?[!-~]+)*$ without its ASCII-only
# part (matching on UTF-8 header bytes is supported and tested): no control
# characters, no leading, trailing or doubled blanks. The blank is required
# between words here (the same language): the CRD's optional one makes Python's
# backtracking regex engine exponential on a long value that fails.
_HEADER_VALUE = re.compile(r"^[^\x00-\x20\x7f]+(?:[\t ][^\x00-\x20\x7f]+)*$")
_PATH_FORBIDDEN = ("//", "/./", "/../", "%2f", "%2F", "#")
_KNOWN_FILTERS = tuple(schema.FILTER_FIELDS)


def _is_token(name: str) -> bool:
    """A header name (RFC 9110 token). is_header_name's ``$`` also matches
    before a final newline, which YAML can put there ("x-a\\n", a ``|`` block)."""
    return is_header_name(name) and not name.endswith("\n")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def mapping_field(p: Problems, path: str, value: object, required: bool = False) -> dict[str, Any]:
    if value is None:
        if required:
            p.add(path, "is required")
        return {}
    if not isinstance(value, dict):
        p.add(path, f"must be a mapping, got {type(value).__name__}")
        return {}
    return value


def _list(p: Problems, path: str, value: object) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        p.add(path, f"must be a list, got {type(value).__name__}")
        return []
    return value


def _string(p: Problems, path: str, value: object, required: bool = True) -> str | None:
    if value is None:
        if required:
            p.add(path, "is required")
        return None
    if not isinstance(value, str) or (required and not value):
        p.add(path, f"must be a non-empty string, got {value!r}")
        return None
    return value


def _parse_fraction_field(p: Problems, path: str, mirror: dict[str, Any]) -> Fraction | None:
    """GEP-3171 as the CRD has it: percent or fraction, never both; neither
    means 100%. A null field is absent, as for the API server."""
    percent = mirror.get("percent")
    fraction = mirror.get("fraction")
    ok = True
    if percent is not None and fraction is not None:
        p.add(path, "Only one of percent or fraction may be specified in HTTPRequestMirrorFilter")
        ok = False
    if percent is not None and not (_is_int(percent) and 0 <= percent <= 100):
        p.add(f"{path}.percent", f"must be an integer 0..100, got {percent!r}")
        ok = False
    if fraction is None:
        return Fraction(100 if percent is None else percent, 100) if ok else None
    f = mapping_field(p, f"{path}.fraction", fraction)
    if not f and fraction != {}:
        return None
    # The CRD: numerator is required, denominator defaults to 100.
    if f.get("numerator") is None:
        p.add(f"{path}.fraction.numerator", "is required (the CRD has no default for it)")
        return None
    parts = {"numerator": f["numerator"], "denominator": 100 if f.get("denominator") is None else f["denominator"]}
    typed = True
    for part, value in parts.items():
        if not _is_int(value):
            p.add(f"{path}.fraction.{part}", f"must be an integer {Fraction.BOUNDS[part]}, got {value!r}")
            typed = False
    if not typed:
        return None
    # Checked even when percent is also given: each bad field is its own problem.
    problems = Fraction.problems(parts["numerator"], parts["denominator"])
    for e in problems:
        if e.field:
            p.add(f"{path}.fraction.{e.field}", f"must be an integer {Fraction.BOUNDS[e.field]}, got {parts[e.field]!r}")
        else:
            p.add(f"{path}.fraction", e.message)
    return None if problems or not ok else Fraction(parts["numerator"], parts["denominator"])


def _regex_problem(pattern: str) -> str | None:
    """Compiled with RE2 under Envoy's program-size limit: what Envoy refuses,
    check-config refuses."""
    try:
        compile_regex(pattern)
    except re2.error as e:
        message = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        return f"not a regular expression Envoy (RE2) accepts: {pattern!r}: {message}"
    return None


def _header_value_problem(value: object, max_length: int = 4096) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= max_length and _HEADER_VALUE.fullmatch(value):
        return None
    return (
        f"must be a string of 1..{max_length} characters without control characters or leading, trailing or doubled blanks, got {value!r}"
    )


def _parse_value_matches(p: Problems, path: str, items: object, header: bool) -> tuple[ValueMatch, ...]:
    out: list[ValueMatch] = []
    seen: set[str] = set()
    names: set[str] = set()
    for i, raw in enumerate(_list(p, path, items)):
        where = f"{path}[{i}]"
        item = mapping_field(p, where, raw, required=True)
        if not item:
            continue
        name = _string(p, f"{where}.name", item.get("name"))
        value = item.get("value")
        kind = item.get("type", "Exact")
        if kind not in ("Exact", "RegularExpression"):
            p.add(f"{where}.type", f"must be Exact or RegularExpression, got {kind!r}")
            continue
        if header:
            problem = _header_value_problem(value)
        elif not isinstance(value, str) or not 0 < len(value) <= 1024 or _CONTROL.search(value):
            problem = f"must be a string of 1..1024 characters without control characters, got {value!r}"
        else:
            problem = None
        if problem:
            p.add(f"{where}.value", problem)
            continue
        assert isinstance(value, str)
        if name is None:
            continue
        if not _is_token(name) or len(name) > 256:
            what = "header name" if header else "query parameter name (the CRD allows a header name's characters)"
            p.add(f"{where}.name", f"{name!r} is not a valid {what}")
            continue
        # The CRD keys these lists by name: the same name twice is refused.
        if name in names:
            p.add(f"{where}.name", f"{name!r} is already matched in this list (the list is keyed by name)")
            continue
        names.add(name)
        if header:
            name = name.lower()
        # Gateway API: later entries with an equivalent name are ignored.
        if name in seen:
            continue
        seen.add(name)
        problem = _regex_problem(value) if kind == "RegularExpression" else None
        if problem:
            p.add(f"{where}.value", problem)
        else:
            out.append(ValueMatch(name, value, ValueType(kind)))
    return tuple(out)


def _path_problem(ptype: str, pvalue: str) -> str | None:
    """The CRD's rules for an Exact or PathPrefix path value, past the first
    character (checked with a message of its own)."""
    if len(pvalue) > 1024:
        return f"must be at most 1024 characters, got {len(pvalue)}"
    if ptype == "RegularExpression":
        return None
    for bad in _PATH_FORBIDDEN:
        if bad in pvalue:
            return f"must not contain {bad!r} when type is one of Exact, PathPrefix, got {pvalue!r}"
    for end in ("/..", "/."):
        if pvalue.endswith(end):
            return f"must not end with {end!r} when type is one of Exact, PathPrefix, got {pvalue!r}"
    # The CRD's character pattern (^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|%XX)+$) is
    # not enforced: matching a raw, undecoded path such as "/a b" is supported.
    return None


def _parse_match(p: Problems, path: str, raw: object) -> Match | None:
    m = mapping_field(p, path, raw)
    n_before = len(p.items)
    path_spec = mapping_field(p, f"{path}.path", m.get("path"))
    ptype = path_spec.get("type", "PathPrefix")
    pvalue = path_spec.get("value", "/")
    path_match = PathMatch()
    if ptype not in ("Exact", "PathPrefix", "RegularExpression"):
        p.add(f"{path}.path.type", f"must be Exact, PathPrefix or RegularExpression, got {ptype!r}")
    elif not isinstance(pvalue, str) or (ptype != "RegularExpression" and not pvalue.startswith("/")):
        p.add(f"{path}.path.value", f"must be a string starting with '/', got {pvalue!r}")
    elif (ptype != "RegularExpression" and any(c in pvalue for c in "?#")) or _CONTROL.search(pvalue):
        p.add(f"{path}.path.value", f"must not contain '?', '#' or control characters (the query is not part of the path), got {pvalue!r}")
    elif problem := _path_problem(ptype, pvalue):
        p.add(f"{path}.path.value", problem)
    else:
        problem = _regex_problem(pvalue) if ptype == "RegularExpression" else None
        if problem:
            p.add(f"{path}.path.value", problem)
        else:
            path_match = PathMatch(PathType(ptype), pvalue)
    headers = _parse_value_matches(p, f"{path}.headers", m.get("headers"), header=True)
    query = _parse_value_matches(p, f"{path}.queryParams", m.get("queryParams"), header=False)
    method = m.get("method")
    if method is not None and method not in METHODS:
        p.add(f"{path}.method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    if len(p.items) > n_before:
        return None
    return Match(path_match, headers, query, method)


def _parse_header_modifier(p: Problems, path: str, raw: object) -> HeaderModifier:
    spec = mapping_field(p, path, raw, required=True)
    pairs: dict[str, tuple[tuple[str, str], ...]] = {}
    for op in ("set", "add"):
        items = []
        names: set[str] = set()
        for i, item in enumerate(_list(p, f"{path}.{op}", spec.get(op))):
            item = mapping_field(p, f"{path}.{op}[{i}]", item, required=True)
            name = _string(p, f"{path}.{op}[{i}].name", item.get("name"))
            value = item.get("value")
            problem = _header_value_problem(value)
            if problem:
                p.add(f"{path}.{op}[{i}].value", problem)
            elif name is not None and name in names:
                p.add(f"{path}.{op}[{i}].name", f"{name!r} is already in this list (the list is keyed by name)")
            elif isinstance(value, str) and name is not None and _modifiable(p, f"{path}.{op}[{i}].name", name, allow_host=op == "set"):
                names.add(name)
                items.append((name, value))
        pairs[op] = tuple(items)
    remove = []
    for i, name in enumerate(_list(p, f"{path}.remove", spec.get("remove"))):
        if not isinstance(name, str):
            p.add(f"{path}.remove[{i}]", f"must be a header name, got {name!r}")
        elif _modifiable(p, f"{path}.remove[{i}]", name, allow_host=False):
            remove.append(name)
    return HeaderModifier(pairs["set"], pairs["add"], tuple(remove))


def _modifiable(p: Problems, path: str, name: str, allow_host: bool) -> bool:
    """Envoy may not add or remove Host or pseudo-headers; setting Host is a host rewrite."""
    if not _is_token(name):
        p.add(path, f"{name!r} is not a valid header name")
        return False
    if name.lower() == "host" and not allow_host:
        p.add(path, "Host can only be set (a host rewrite), not added or removed")
        return False
    return True


def _filter_rules(p: Problems, path: str, filters: list[Any]) -> None:
    """The CRD's rules on a list of filters (a rule's or a backendRef's): a
    known type, its own configuration field and no other's, no repeats of the
    unrepeatable types, not RequestRedirect with URLRewrite."""
    seen: dict[str, int] = {}
    for i, flt in enumerate(filters):
        if not isinstance(flt, dict):
            continue
        fpath = f"{path}[{i}]"
        ftype = flt.get("type")
        if ftype is None:
            p.add(f"{fpath}.type", "is required")
            continue
        if ftype not in schema.FILTER_FIELDS:
            guess = schema.did_you_mean(str(ftype), _KNOWN_FILTERS)
            hint = f"did you mean {guess}?" if guess else f"allowed: {', '.join(_KNOWN_FILTERS)}"
            p.add(f"{fpath}.type", f"unknown filter type {ftype!r}; {hint}")
            continue
        own = schema.FILTER_FIELDS[ftype]
        if flt.get(own) is None:
            p.add(f"{fpath}.{own}", f"is required (filter.{own} must be specified for {ftype} filter.type)")
        for other, config in schema.FILTER_FIELDS.items():
            if config != own and flt.get(config) is not None:
                p.add(
                    f"{fpath}.{config}",
                    f"must not be set on a {ftype} filter (filter.{config} must be nil if the filter.type is not {other})",
                )
        seen[ftype] = seen.get(ftype, 0) + 1
        if ftype in schema.UNREPEATABLE_FILTERS and seen[ftype] == 2:
            p.add(f"{fpath}.type", f"{ftype} filter cannot be repeated")
    if "RequestRedirect" in seen and "URLRewrite" in seen:
        p.add(path, "May specify either httpRouteFilterRequestRedirect or httpRouteFilterRequestRewrite, but not both")


def _parse_rule(p: Problems, path: str, raw: object, rule_id: str, slots: int, mirror_names: set[str]) -> Rule | None:
    """``mirror_names`` collects the backends of the rule's RequestMirror filters."""
    r = mapping_field(p, path, raw)
    n_before = len(p.items)
    raw_matches = _list(p, f"{path}.matches", r.get("matches"))
    # A rule with no matches matches PathPrefix "/".
    matches = tuple(_parse_match(p, f"{path}.matches[{i}]", m) for i, m in enumerate(raw_matches)) or (Match(),)
    mirrors: list[MirrorTarget] = []
    modifier: HeaderModifier | None = None
    raw_filters = _list(p, f"{path}.filters", r.get("filters"))
    _filter_rules(p, f"{path}.filters", raw_filters)
    for i, raw_filter in enumerate(raw_filters):
        fpath = f"{path}.filters[{i}]"
        flt = mapping_field(p, fpath, raw_filter, required=True)
        ftype = flt.get("type")
        if ftype == "RequestMirror" and flt.get("requestMirror") is not None:
            mirror = mapping_field(p, f"{fpath}.requestMirror", flt.get("requestMirror"), required=True)
            ref = mapping_field(p, f"{fpath}.requestMirror.backendRef", mirror.get("backendRef"), required=True)
            name = _backend_name(p, f"{fpath}.requestMirror.backendRef.name", ref.get("name")) if ref else None
            fraction = _parse_fraction_field(p, f"{fpath}.requestMirror", mirror)
            port = ref.get("port") if ref else None
            if port is not None and (not _is_int(port) or not 1 <= port <= 65535):
                p.add(f"{fpath}.requestMirror.backendRef.port", f"must be an integer 1..65535, got {port!r}")
                continue
            if name is not None:
                mirror_names.add(name)
            if name is None or fraction is None:
                continue
            if any(m.backend == name for m in mirrors):
                p.add(fpath, f"rule {rule_id} mirrors backend {name!r} twice; each RequestMirror in a rule must name a different backend")
                continue
            mirrors.append(MirrorTarget(name, fraction, len(mirrors), port))
        elif ftype == "RequestHeaderModifier" and flt.get("requestHeaderModifier") is not None:
            modifier = _parse_header_modifier(p, f"{fpath}.requestHeaderModifier", flt.get("requestHeaderModifier"))
    if len(mirrors) > slots:
        p.add(f"{path}.filters", f"rule {rule_id} has {len(mirrors)} mirrors but only {slots} slot headers (raise MIRROR_SLOTS)")
    backends: list[BackendRef] = []
    for i, raw_ref in enumerate(_list(p, f"{path}.backendRefs", r.get("backendRefs"))):
        bpath = f"{path}.backendRefs[{i}]"
        ref = mapping_field(p, bpath, raw_ref, required=True)
        if isinstance(ref.get("filters"), list):
            _filter_rules(p, f"{bpath}.filters", ref["filters"])
        name = _backend_name(p, f"{bpath}.name", ref.get("name"))
        # A null field is absent (the API server prunes it): weight defaults to 1.
        weight = 1 if ref.get("weight") is None else ref["weight"]
        port = ref.get("port")
        if not _is_int(weight) or not 0 <= weight <= 1_000_000:
            p.add(f"{bpath}.weight", f"must be an integer 0..1000000, got {weight!r}")
        elif port is not None and (not _is_int(port) or not 1 <= port <= 65535):
            p.add(f"{bpath}.port", f"must be an integer 1..65535, got {port!r}")
        elif name is not None:
            if any(m.backend == name for m in mirrors):
                p.add(bpath, f"rule {rule_id} mirrors to its own primary backend {name!r}")
            backends.append(BackendRef(name, port, weight))
    if len(p.items) > n_before or any(m is None for m in matches):
        return None
    if not any(b.weight > 0 for b in backends):
        # Gateway API answers such a rule with a 500, and Envoy cannot mirror
        # a direct response: its mirrors are never sent, so never decided.
        mirrors = []
    return Rule(rule_id, tuple(m for m in matches if m is not None), tuple(mirrors), tuple(backends), modifier)


def _backend_name(p: Problems, path: str, value: object) -> str | None:
    name = _string(p, path, value)
    if name is None:
        return None
    if not NAME.fullmatch(name) or len(name) > 253:
        p.add(path, f"must be a lower-case DNS-1123 name (a Service name), got {name!r}")
        return None
    if name == SAMPLER_CLUSTER:
        p.add(path, f"{name!r} is the sampler's own Envoy cluster; name the backend differently")
        return None
    return name


def parse_route(
    doc: dict[str, Any], where: str, slots: int, duplicates: list[DuplicateKey]
) -> tuple[Route | None, list[str], list[schema.Finding]]:
    """One HTTPRoute document: the route, or None and every problem found
    (each prefixed with ``where`` and the route's name); and the fields it
    carries that the sampler does not act on."""
    meta = doc.get("metadata")
    p = Problems(where)
    meta = mapping_field(p, "metadata", meta, required=True)
    name = _string(p, "metadata.name", meta.get("name"))
    if name is not None and (not NAME.fullmatch(name) or len(name) > 253):
        p.add("metadata.name", f"must be a lower-case DNS-1123 name, got {name!r}")
        name = None
    namespace = meta.get("namespace", "default")
    if not isinstance(namespace, str) or not NAME.fullmatch(namespace):
        p.add("metadata.namespace", f"must be a DNS-1123 name, got {namespace!r}")
        namespace = "default"
    if name is not None:
        p.where = f"{where}: HTTPRoute {namespace}/{name}"
    route_id = f"{namespace}/{name}"
    for dup in duplicates:
        p.add(dup.path, dup.message)
    found = schema.check(doc, schema.HTTPROUTE)
    for problem in found.problems:
        p.add(problem.path, problem.message)
    created = _timestamp(p, meta.get("creationTimestamp"))
    spec = mapping_field(p, "spec", doc.get("spec"), required=True)
    hostnames: list[str] = []
    for i, h in enumerate(_list(p, "spec.hostnames", spec.get("hostnames"))):
        if not isinstance(h, str) or not HOSTNAME.fullmatch(h) or len(h) > 253:
            p.add(f"spec.hostnames[{i}]", f"must be a lower-case DNS name, optionally starting with '*.', got {h!r}")
        else:
            hostnames.append(h)
    raw_rules = _list(p, "spec.rules", spec.get("rules")) or [{}]
    _rules_rules(p, raw_rules)
    mirror_names: set[str] = set()
    rules = [_parse_rule(p, f"spec.rules[{i}]", raw, f"{route_id}/{i}", slots, mirror_names) for i, raw in enumerate(raw_rules)]
    annotations = mapping_field(p, "metadata.annotations", meta.get("annotations"))
    check_annotations(p, annotations, ROUTE_ANNOTATIONS)
    methods = _route_methods(p, annotations)
    cap = _route_cap(p, annotations)
    salts = _target_salts(p, annotations, mirror_names)
    if p.items or name is None:
        return None, p.items, found.ignored
    kept = tuple(
        dataclasses.replace(
            r,
            methods=methods,
            max_mirrors_per_second=cap,
            mirrors=tuple(dataclasses.replace(m, salt=salts[m.backend]) if m.backend in salts else m for m in r.mirrors),
        )
        for r in rules
        if r is not None
    )
    return Route(namespace, name, tuple(dict.fromkeys(hostnames)), kept, created, where), [], found.ignored


def _rules_rules(p: Problems, raw_rules: list[Any]) -> None:
    """The CRD's rules across a route's rules: unique rule names, and at most
    128 matches in all."""
    names: set[str] = set()
    for i, rule in enumerate(raw_rules):
        if not isinstance(rule, dict):
            continue
        name = rule.get("name")
        if isinstance(name, str):
            if name in names:
                p.add(f"spec.rules[{i}].name", "Rule name must be unique within the route")
            names.add(name)
    total = schema.route_match_count(raw_rules)
    if total > schema.MAX_MATCHES_PER_ROUTE:
        p.add(
            "spec.rules",
            "While 16 rules and 64 matches per rule are allowed, the total number of matches across all rules "
            f"in a route must be less than 128, got {total}",
        )


ANNOTATION_PREFIX = "mirror-sampler.io/"
METHODS_ANNOTATION = "mirror-sampler.io/methods"
CAP_ANNOTATION = "mirror-sampler.io/max-mirrors-per-second"
SALTS_ANNOTATION = "mirror-sampler.io/target-salts"
ROUTE_ANNOTATIONS = (METHODS_ANNOTATION, CAP_ANNOTATION, SALTS_ANNOTATION)


def check_annotations(p: Problems, annotations: dict[str, Any], known: tuple[str, ...]) -> None:
    """The sampler's own annotations: a key it does not know under its prefix is
    a typo that would silently do nothing. Values are strings (the API server's rule)."""
    for key, value in annotations.items():
        path = f"metadata.annotations.{key}"
        if not isinstance(key, str):
            p.add(path, "annotation keys must be strings")
            continue
        if not isinstance(value, str):
            p.add(path, f"must be a string (annotation values are text: quote it), got {value!r}")
        if key.startswith(ANNOTATION_PREFIX) and key not in known:
            guess = schema.did_you_mean(key, known)
            hint = f"did you mean {guess}?" if guess else f"known: {', '.join(known) or 'none on this kind'}"
            p.add(path, f"unknown mirror-sampler.io annotation; {hint}")


def _route_cap(p: Problems, annotations: dict[str, Any]) -> float | None:
    value = annotations.get(CAP_ANNOTATION)
    if not isinstance(value, str):
        return None  # absent, or reported by _check_annotations
    try:
        return parse_rate(value)
    except ValueError as e:
        p.add(f"metadata.annotations.{CAP_ANNOTATION}", str(e))
        return None


def _route_methods(p: Problems, annotations: dict[str, Any]) -> frozenset[str]:
    """mirror-sampler.io/methods: mirror only these methods (mirrored writes
    have side effects); Gateway API itself mirrors every method."""
    value = annotations.get(METHODS_ANNOTATION)
    if not isinstance(value, str):
        return frozenset()  # absent, or reported by _check_annotations
    try:
        return parse_methods(value)
    except ValueError as e:
        p.add(f"metadata.annotations.{METHODS_ANNOTATION}", str(e))
        return frozenset()


def _target_salts(p: Problems, annotations: dict[str, Any], mirror_names: set[str]) -> dict[str, bytes]:
    """mirror-sampler.io/target-salts: ``BACKEND=SALT,...``, a salt of a
    target's own so that its sample is independent of the rule's other
    targets (without one, targets share the policy's salt and nest)."""
    value = annotations.get(SALTS_ANNOTATION)
    if not isinstance(value, str):
        return {}  # absent, or reported by _check_annotations
    path = f"metadata.annotations.{SALTS_ANNOTATION}"
    salts: dict[str, bytes] = {}
    for item in value.split(","):
        backend, sep, salt = (part.strip() for part in item.partition("="))
        if not sep or not backend or not salt:
            p.add(
                path,
                f"must be a comma-separated list of BACKEND=SALT (a RequestMirror backendRef name, a non-empty salt), got {item.strip()!r}",
            )
        elif backend in salts:
            p.add(path, f"names backend {backend!r} twice")
        elif backend not in mirror_names:
            guess = schema.did_you_mean(backend, sorted(mirror_names))
            hint = f"did you mean {guess}?" if guess else f"mirrored backends: {', '.join(sorted(mirror_names)) or 'none'}"
            p.add(path, f"{backend!r} is not the backendRef of a RequestMirror filter in this route; {hint}")
        else:
            salts[backend] = salt.encode()
    return salts


def _timestamp(p: Problems, value: object) -> str:
    """creationTimestamp as a sortable UTC string ("" when absent)."""
    if value is None:
        return ""
    try:
        when = value if isinstance(value, datetime.datetime) else datetime.datetime.fromisoformat(str(value))
    except ValueError:
        p.add("metadata.creationTimestamp", f"must be an RFC 3339 time like 2024-06-01T05:00:00Z, got {value!r}")
        return ""
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    try:
        utc = when.astimezone(datetime.UTC)
    except OverflowError:  # an offset that pushes year 1 or 9999 out of range
        p.add("metadata.creationTimestamp", f"is out of range, got {value!r}")
        return ""
    # Fixed width, so that text order is time order (fractions of a second included).
    return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
