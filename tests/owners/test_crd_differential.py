"""The strict HTTPRoute parser against the real CRD: hypothesis writes
HTTPRoutes, valid and near-valid (the typos, exclusive fields, bounds, list
sizes and path rules extproc/config/manifests.py and schema.py claim to
enforce), and the parser's verdict (accepted or refused) must equal
kubectl-validate's with the Gateway API CRD (schema and CEL rules) on each.

Many routes go to one kubectl-validate process (one file per route). Where
the two disagree the CRD is right: a disagreement is a parser defect unless
it is listed in ``KNOWN_DISAGREEMENTS`` with its reason (for the lead to
reconcile: fixed in the parser, or the README says why not).
"""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from extproc.config.manifests import parse_manifests
from tests.owners.kubectl_validate import validate

pytestmark = pytest.mark.e2e

API = "gateway.networking.k8s.io/v1"
Doc = dict[str, Any]


class Case:
    """A route and what was done to it (the labels of the changes made).
    Not a dataclass: hypothesis would print every route of a batch."""

    __slots__ = ("route", "changes")

    def __init__(self, route: Doc, changes: tuple[str, ...]) -> None:
        self.route = route
        self.changes = changes

    def __repr__(self) -> str:
        # The routes are shown in full by the assertion, where they disagree.
        return f"Case{self.changes}"


# Where the parser and the CRD part ways: change label -> (the parser's
# verdict: accepts?, why). A generated route whose disagreement is not
# explained by one of its changes fails the test; an explicit case below that
# stops disagreeing fails it too (the list is kept exact).
_DELIBERATE = "deliberately not enforced (extproc/config/schema.py's docstring): "
_SAMPLER = "stricter than the CRD on purpose: "
_DEFECT = "parser defect, the CRD is right: "
KNOWN_DISAGREEMENTS: dict[str, tuple[bool, str]] = {
    "path characters": (True, _DELIBERATE + "the CRD's character pattern for Exact/PathPrefix values (a raw '/a b' is matched as such)"),
    "non-ASCII header value": (True, _DELIBERATE + "the ASCII-only part of the CRD's header value pattern (UTF-8 values are matched)"),
    "port-less Service reference": (True, _DELIBERATE + "the CRD's 'Must have port for Service reference' (the sampler needs no port)"),
    "ignored field values": (True, _DELIBERATE + "value patterns and CEL rules inside fields the sampler ignores (timeouts here)"),
    "backend name not DNS-1123": (False, _SAMPLER + "a Service name must be a DNS-1123 name; the CRD allows any 1..253 characters"),
    "RE2 refuses the regex": (False, _SAMPLER + "Envoy compiles RegularExpression matches with RE2 and refuses the route"),
    "Host added or removed": (False, _SAMPLER + "Envoy refuses to add or remove Host (setting it is a host rewrite)"),
    "mirror to own backend": (False, _SAMPLER + "a rule mirroring to its own primary backend"),
    "more mirrors than slots": (False, _SAMPLER + "a rule with more mirrors than MIRROR_SLOTS slot headers"),
    "same mirror twice": (False, _SAMPLER + "a rule mirroring one backend twice"),
    "unknown sampler annotation": (False, _SAMPLER + "an unknown mirror-sampler.io/ annotation is a typo"),
}

# -- valid routes: the space where both must accept --------------------------

# Plain strings for PyYAML and for go-yaml alike: a letter first, never y or n
# alone (the "YAML 1.1 scalar" change makes those on purpose: kubectl's go-yaml
# reads them as a boolean and a number, and so does the parser's loader).


def _word(first: str, rest: str, min_rest: int, max_rest: int) -> st.SearchStrategy[str]:
    return st.builds(str.__add__, st.sampled_from(first), st.text(rest, min_size=min_rest, max_size=max_rest))


LABEL = _word(string.ascii_lowercase, string.ascii_lowercase + string.digits, 1, 7)
SEGMENT = _word(string.ascii_lowercase + string.digits, string.ascii_lowercase + "-._~", 0, 7)
HEADER_NAMES = st.sampled_from(["x-tenant", "x-user", "accept", "x-canary", "X-Debug", "user-agent"])
WORDS = _word(string.ascii_letters, string.ascii_letters + string.digits + "-_.", 1, 11)
METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
BACKENDS = ("web", "web-2", "api")
MIRRORS = ("shadow-a", "shadow-b")


@st.composite
def paths(draw: st.DrawFn) -> Doc:
    kind = draw(st.sampled_from(["Exact", "PathPrefix", "RegularExpression"]))
    if kind == "RegularExpression":
        return {"type": kind, "value": "/" + draw(LABEL) + draw(st.sampled_from(["/.*", "[0-9]+", "(/v1|/v2)?"]))}
    value = "/" + "/".join(draw(st.lists(SEGMENT, max_size=3)))
    return {"type": kind, "value": value}


@st.composite
def value_matches(draw: st.DrawFn, names: st.SearchStrategy[str]) -> list[Doc]:
    chosen = draw(st.lists(names, max_size=3, unique_by=str.lower))
    out: list[Doc] = []
    for name in chosen:
        item: Doc = {"name": name, "value": draw(WORDS)}
        if draw(st.booleans()):
            item["type"] = "Exact"
        out.append(item)
    return out


@st.composite
def matches(draw: st.DrawFn) -> Doc:
    m: Doc = {}
    if draw(st.booleans()):
        m["path"] = draw(paths())
    if draw(st.booleans()):
        m["headers"] = draw(value_matches(HEADER_NAMES))
    if draw(st.booleans()):
        m["queryParams"] = draw(value_matches(st.sampled_from(["q", "page", "Lang", "debug"])))
    if draw(st.booleans()):
        m["method"] = draw(METHODS)
    return m


@st.composite
def mirror_filter(draw: st.DrawFn, backend: str) -> Doc:
    spec: Doc = {"backendRef": {"name": backend, "port": 8080}}
    share = draw(st.sampled_from(["none", "percent", "fraction", "fraction-default-denominator"]))
    if share == "percent":
        spec["percent"] = draw(st.integers(0, 100))
    elif share == "fraction":
        denominator = draw(st.integers(1, 10_000))
        spec["fraction"] = {"numerator": draw(st.integers(0, denominator)), "denominator": denominator}
    elif share == "fraction-default-denominator":
        spec["fraction"] = {"numerator": draw(st.integers(0, 100))}
    return {"type": "RequestMirror", "requestMirror": spec}


@st.composite
def header_modifier(draw: st.DrawFn) -> Doc:
    spec: Doc = {}
    for op in ("set", "add"):
        if draw(st.booleans()):
            spec[op] = [{"name": n, "value": draw(WORDS)} for n in draw(st.lists(HEADER_NAMES, min_size=1, max_size=2, unique=True))]
    if draw(st.booleans()):
        spec["remove"] = draw(st.lists(HEADER_NAMES, min_size=1, max_size=2, unique=True))
    return {"type": "RequestHeaderModifier", "requestHeaderModifier": spec}


@st.composite
def rules(draw: st.DrawFn) -> Doc:
    rule: Doc = {}
    if draw(st.booleans()):
        rule["matches"] = draw(st.lists(matches(), max_size=3))
    filters = [draw(mirror_filter(b)) for b in draw(st.lists(st.sampled_from(MIRRORS), max_size=2, unique=True))]
    if draw(st.booleans()):
        filters.insert(draw(st.integers(0, len(filters))), draw(header_modifier()))
    if filters:
        rule["filters"] = filters
    refs = []
    for name in draw(st.lists(st.sampled_from(BACKENDS), min_size=1, max_size=2, unique=True)):
        ref: Doc = {"name": name, "port": draw(st.integers(1, 65535))}
        if draw(st.booleans()):
            ref["weight"] = draw(st.integers(0, 1_000_000))
        refs.append(ref)
    rule["backendRefs"] = refs
    return rule


@st.composite
def valid_routes(draw: st.DrawFn) -> Doc:
    spec: Doc = {"parentRefs": [{"name": "gateway"}]}
    hosts = draw(st.lists(st.builds(lambda w, a, b: f"{w}{a}.{b}", st.sampled_from(["", "*."]), LABEL, LABEL), max_size=3, unique=True))
    if hosts:
        spec["hostnames"] = hosts
    spec["rules"] = draw(st.lists(rules(), min_size=1, max_size=3))
    names = draw(st.lists(LABEL, min_size=len(spec["rules"]), max_size=len(spec["rules"]), unique=True))
    for rule, name in zip(spec["rules"], names, strict=True):
        if draw(st.booleans()):
            rule["name"] = name
    return {"apiVersion": API, "kind": "HTTPRoute", "metadata": {"name": "route", "namespace": "default"}, "spec": spec}


# -- changes: near misses of what the parser claims to enforce ---------------


def _objects(node: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths (key/index tuples) of every mapping under node, node included."""
    found: list[tuple[Any, ...]] = []
    if isinstance(node, dict):
        found.append(at)
        for k, v in node.items():
            found += _objects(v, (*at, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _objects(v, (*at, i))
    return found


def _get(doc: Any, at: tuple[Any, ...]) -> Any:
    for step in at:
        doc = doc[step]
    return doc


def _typo(draw: st.DrawFn, word: str) -> str:
    how = draw(st.sampled_from(["drop", "double", "swap", "case", "plural"]))
    i = draw(st.integers(0, len(word) - 1))
    if how == "drop" and len(word) > 1:
        return word[:i] + word[i + 1 :]
    if how == "double":
        return word[:i] + word[i] + word[i:]
    if how == "swap" and i + 1 < len(word) and word[i] != word[i + 1]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if how == "case" and word[i].lower() != word[i].upper():
        return word[:i] + word[i].swapcase() + word[i + 1 :]
    return word + "s"


def change_typo(draw: st.DrawFn, route: Doc) -> None:
    at = draw(st.sampled_from([p for p in _objects(route["spec"]) if _get(route["spec"], p)]))
    node = _get(route["spec"], at)
    key = draw(st.sampled_from(sorted(node)))
    node[_typo(draw, key)] = node.pop(key)


def _mirrors(route: Doc) -> list[Doc]:
    filters = [f for r in route["spec"]["rules"] for f in r.get("filters", [])]
    return [f["requestMirror"] for f in filters if isinstance(f.get("requestMirror"), dict)]


def _a_mirror(draw: st.DrawFn, route: Doc) -> Doc:
    found = _mirrors(route)
    if found:
        mirror: Doc = draw(st.sampled_from(found))
        return mirror
    rule = draw(st.sampled_from(route["spec"]["rules"]))
    mirror = {"backendRef": {"name": "shadow-a", "port": 8080}}
    rule.setdefault("filters", []).append({"type": "RequestMirror", "requestMirror": mirror})
    return mirror


def change_percent_and_fraction(draw: st.DrawFn, route: Doc) -> None:
    mirror = _a_mirror(draw, route)
    mirror["percent"] = draw(st.integers(0, 100))
    mirror["fraction"] = {"numerator": draw(st.integers(0, 10)), "denominator": 10}


def change_percent_bounds(draw: st.DrawFn, route: Doc) -> None:
    mirror = _a_mirror(draw, route)
    mirror.pop("fraction", None)
    mirror["percent"] = draw(st.sampled_from([-1, 0, 100, 101, 1000]))


def change_fraction_bounds(draw: st.DrawFn, route: Doc) -> None:
    mirror = _a_mirror(draw, route)
    mirror.pop("percent", None)
    fraction: Doc = {"numerator": draw(st.sampled_from([-1, 0, 1, 99, 100, 101, 1_000_000]))}
    if draw(st.booleans()):
        fraction["denominator"] = draw(st.sampled_from([-1, 0, 1, 100, 1_000_000]))
    if draw(st.booleans()):
        del fraction["numerator"]
    mirror["fraction"] = fraction


def _sized(draw: st.DrawFn, limit: int) -> int:
    return draw(st.sampled_from([limit - 1, limit, limit + 1]))


def change_list_size(draw: st.DrawFn, route: Doc) -> None:
    spec = route["spec"]
    rule = draw(st.sampled_from(spec["rules"]))
    which = draw(st.sampled_from(["hostnames", "rules", "matches", "headers", "queryParams", "filters", "backendRefs", "set", "remove"]))
    if which == "hostnames":
        spec["hostnames"] = [f"h{i}.example.com" for i in range(_sized(draw, 16))]
    elif which == "rules":
        spec["rules"] = [{"backendRefs": [{"name": "web", "port": 80}]} for _ in range(_sized(draw, 16))]
    elif which == "matches":
        rule["matches"] = [{"path": {"type": "Exact", "value": f"/m{i}"}} for i in range(_sized(draw, 64))]
    elif which in ("headers", "queryParams"):
        rule["matches"] = [{which: [{"name": f"x-h{i}", "value": "v"} for i in range(_sized(draw, 16))]}]
    elif which == "filters":
        # ExtensionRef may repeat (RequestMirror would run out of slot headers first).
        ref = {"group": "example.com", "kind": "Filter", "name": "f"}
        rule["filters"] = [{"type": "ExtensionRef", "extensionRef": ref} for _ in range(_sized(draw, 16))]
    elif which == "backendRefs":
        rule["backendRefs"] = [{"name": f"web-{i}", "port": 80} for i in range(_sized(draw, 16))]
    else:
        names = [f"x-h{i}" for i in range(_sized(draw, 16))]
        items: Any = names if which == "remove" else [{"name": n, "value": "v"} for n in names]
        rule["filters"] = [{"type": "RequestHeaderModifier", "requestHeaderModifier": {which: items}}]


def change_total_matches(draw: st.DrawFn, route: Doc) -> None:
    """The CRD caps the matches of all rules together (its CEL rule)."""
    total = draw(st.sampled_from([126, 127, 128, 129]))
    sizes = [64, total - 64] if total - 64 <= 64 else [64, 64, total - 128]
    route["spec"]["rules"] = [
        {"matches": [{"path": {"type": "Exact", "value": f"/r{r}m{i}"}} for i in range(n)], "backendRefs": [{"name": "web", "port": 80}]}
        for r, n in enumerate(sizes)
    ]
    return None


BAD_PATHS = ["/a//b", "/a/./b", "/a/../b", "/a%2fb", "/a%2Fb", "/a#b", "/a?b", "/a/..", "/a/.", "a/b", "", "/" + "a" * 1024]
GOOD_PATHS = ["/a%20b", "/a;b=1", "/~user", "/a:b@c", "/" + "a" * 1023]
PATHS_OUTSIDE_THE_PATTERN = ["/a b", "/a%zz", "/\u00e4", "/a\\b", "/a|b"]


def change_path(draw: st.DrawFn, route: Doc) -> str:
    rule = draw(st.sampled_from(route["spec"]["rules"]))
    kind = draw(st.sampled_from(["Exact", "PathPrefix"]))
    value = draw(st.sampled_from(BAD_PATHS + GOOD_PATHS + PATHS_OUTSIDE_THE_PATTERN))
    rule["matches"] = [{"path": {"type": kind, "value": value}}]
    return "path characters" if value in PATHS_OUTSIDE_THE_PATTERN else "path"


NON_ASCII_VALUES = ["caf\u00e9", "a\u00a0b"]
YAML_11_SCALARS = ["y", "N", "1e3"]


def change_header_match(draw: st.DrawFn, route: Doc) -> str:
    rule = draw(st.sampled_from(route["spec"]["rules"]))
    name, value = "x-h", "v"
    what = draw(st.sampled_from(["name", "value", "duplicate", "type"]))
    if what == "name":
        name = draw(st.sampled_from(["x h", "x:h", "", "x-\u00e9", "x" * 256, "x" * 257]))
    elif what == "value":
        odd = [" v", "v ", "a  b", "a\tb", "a\x01b", "", "v" * 4096, "v" * 4097]
        value = draw(st.sampled_from([*odd, *NON_ASCII_VALUES, *YAML_11_SCALARS]))
    headers: list[Doc] = [{"name": name, "value": value}]
    if what == "duplicate":
        headers.append({"name": draw(st.sampled_from(["x-h", "X-H"])), "value": "w"})
    if what == "type":
        headers[0]["type"] = draw(st.sampled_from(["Exact", "RegularExpression", "Prefix", "exact"]))
    rule["matches"] = [{"headers": headers}]
    if value in NON_ASCII_VALUES:
        return "non-ASCII header value"
    return "YAML 1.1 scalar" if value in YAML_11_SCALARS else "header match"


def change_method(draw: st.DrawFn, route: Doc) -> None:
    rule = draw(st.sampled_from(route["spec"]["rules"]))
    rule["matches"] = [{"method": draw(st.sampled_from(["get", "FETCH", "CONNECT", "TRACE"]))}]


def change_numbers(draw: st.DrawFn, route: Doc) -> None:
    ref = draw(st.sampled_from([r for rule in route["spec"]["rules"] for r in rule["backendRefs"]]))
    field = draw(st.sampled_from(["port", "weight"]))
    ref[field] = draw(st.sampled_from([-1, 0, 1, 65535, 65536, 1_000_000, 1_000_001]))


def change_filter(draw: st.DrawFn, route: Doc) -> None:
    rule = draw(st.sampled_from(route["spec"]["rules"]))
    what = draw(st.sampled_from(["unknown type", "wrong config", "missing config", "repeated", "redirect and rewrite"]))
    modifier: Doc = {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-a", "value": "1"}]}}
    if what == "unknown type":
        rule["filters"] = [{"type": draw(st.sampled_from(["RequestMirrors", "requestMirror", "Mirror"])), "requestMirror": {}}]
    elif what == "wrong config":
        rule["filters"] = [{"type": "RequestMirror", "requestHeaderModifier": modifier["requestHeaderModifier"]}]
    elif what == "missing config":
        rule["filters"] = [{"type": draw(st.sampled_from(["RequestMirror", "RequestHeaderModifier"]))}]
    elif what == "repeated":
        rule["filters"] = [modifier, modifier]
    else:
        rule["filters"] = [
            {"type": "RequestRedirect", "requestRedirect": {"statusCode": 301}},
            {"type": "URLRewrite", "urlRewrite": {"hostname": "example.com"}},
        ]


def change_hostname(draw: st.DrawFn, route: Doc) -> None:
    route["spec"]["hostnames"] = [draw(st.sampled_from(["Shop.example.com", "*.", "example.com.", "10.0.0.1", "a_b.example", "*"]))]


def change_rule_names(draw: st.DrawFn, route: Doc) -> str:
    spec = route["spec"]
    if len(spec["rules"]) < 2:
        spec["rules"].append({"backendRefs": [{"name": "web", "port": 80}]})
    names = [draw(st.sampled_from(["same", "same.a", "Same", "same_name"])) for _ in range(2)]
    for rule, name in zip(spec["rules"], names, strict=False):
        rule["name"] = name
    return "rule name pattern" if {"Same", "same_name"} & set(names) else "rule names"


def change_header_modifier(draw: st.DrawFn, route: Doc) -> str:
    rule = draw(st.sampled_from(route["spec"]["rules"]))
    remove = draw(st.sampled_from([["x-a", "x-b"], ["x-a", "x-a"], ["x-a", "X-A"]]))
    rule["filters"] = [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"remove": remove}}]
    return "duplicate remove" if remove[0] == remove[1] else "header modifier"


# Each changes the route in place; a returned label names the change more
# precisely (the one KNOWN_DISAGREEMENTS is keyed by).
CHANGES: dict[str, Callable[[st.DrawFn, Doc], str | None]] = {
    "typo": change_typo,
    "percent and fraction": change_percent_and_fraction,
    "percent bounds": change_percent_bounds,
    "fraction bounds": change_fraction_bounds,
    "list size": change_list_size,
    "total matches": change_total_matches,
    "path": change_path,
    "header match": change_header_match,
    "method": change_method,
    "port or weight": change_numbers,
    "filter": change_filter,
    "hostname": change_hostname,
    "rule names": change_rule_names,
    "header modifier": change_header_modifier,
}


@st.composite
def cases(draw: st.DrawFn) -> Case:
    route = draw(valid_routes())
    labels = draw(st.lists(st.sampled_from(sorted(CHANGES)), max_size=2, unique=True))
    # A typo last: the other changes look fields up by their right names.
    labels.sort(key=lambda label: label == "typo")
    done = [CHANGES[label](draw, route) or label for label in labels]
    return Case(route, tuple(done))


def _total_matches(route: Doc) -> int | None:
    """Matches across the rules, as the parser counts them (no field: one)."""
    rules = route["spec"].get("rules")
    if not isinstance(rules, list):
        return None
    return sum(len(r["matches"]) if isinstance(r.get("matches"), list) else 1 for r in rules if isinstance(r, dict))


# -- the comparison ----------------------------------------------------------


class _PlainDumper(yaml.SafeDumper):
    """Writes an object used twice in full, as a user would: PyYAML's
    anchors and aliases are refused by the parser on purpose (recursive or
    exponentially large documents), which is not what these routes test."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def write(route: Doc, path: Path) -> None:
    path.write_text(yaml.dump(route, Dumper=_PlainDumper, sort_keys=False, allow_unicode=True), encoding="utf-8")


def parser_accepts(text: str) -> tuple[bool, list[str]]:
    result = parse_manifests(text, "route.yaml")
    return not result.problems, result.problems


def disagreements(batch: list[Case], folder: Path) -> list[str]:
    """Each case whose parser verdict differs from kubectl-validate's and is
    not explained by a known disagreement of one of its changes."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, case in enumerate(batch):
        path = folder / f"route-{i}.yaml"
        write(case.route, path)
        files.append(path)
    verdicts = validate(files)
    found = []
    for path, case in zip(files, batch, strict=True):
        text = path.read_text(encoding="utf-8")
        accepted, problems = parser_accepts(text)
        crd = verdicts[path]
        if accepted == crd.valid:
            continue
        if any(KNOWN_DISAGREEMENTS.get(label, (None,))[0] == accepted for label in case.changes):
            continue
        found.append(
            f"changes {list(case.changes)}: parser {'accepts' if accepted else 'refuses'}, CRD {'accepts' if crd.valid else 'refuses'}\n"
            f"  parser: {problems[:3]}\n  CRD: {list(crd.errors[:3])}\n{text}"
        )
    return found


@settings(
    max_examples=6,
    deadline=None,
    # A counterexample is reported whole (each disagreeing route with both
    # verdicts); shrinking would start kubectl-validate hundreds of times.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(batch=st.lists(cases(), min_size=15, max_size=15))
def test_parser_and_crd_agree_on_generated_routes(batch: list[Case], tmp_path_factory: pytest.TempPathFactory) -> None:
    found = disagreements(batch, tmp_path_factory.mktemp("routes"))
    assert not found, f"{len(found)} of {len(batch)} routes:\n" + "\n".join(found[:8])


# -- explicit cases: each known disagreement shown, and the edges next to it --


def _route(rule: Doc | None = None, **spec: Any) -> Doc:
    spec = {"parentRefs": [{"name": "gateway"}], "rules": [rule or {"backendRefs": [{"name": "web", "port": 80}]}], **spec}
    return {"apiVersion": API, "kind": "HTTPRoute", "metadata": {"name": "route", "namespace": "default"}, "spec": spec}


def _rule(**fields: Any) -> Doc:
    return {"backendRefs": [{"name": "web", "port": 80}], **fields}


def _headers(value: str) -> Doc:
    return _rule(matches=[{"headers": [{"name": "x-h", "value": value}]}])


def _modifier(**spec: Any) -> Doc:
    return _rule(filters=[{"type": "RequestHeaderModifier", "requestHeaderModifier": spec}])


def _mirroring(*backends: str) -> Doc:
    return _rule(filters=[{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": b, "port": 80}}} for b in backends])


def _matches(*counts: int | None) -> Doc:
    """Rules with these numbers of matches (None: a rule without the field, one match for the parser)."""
    rules = [
        _rule() if n is None else _rule(matches=[{"path": {"type": "Exact", "value": f"/r{r}/{i}"}} for i in range(n)])
        for r, n in enumerate(counts)
    ]
    return {**_route(), "spec": {"parentRefs": [{"name": "gateway"}], "rules": rules}}


# label -> routes with that label; a label of KNOWN_DISAGREEMENTS must disagree
# (in its direction) on every route, any other label must agree.
EXPLICIT: dict[str, list[Doc]] = {
    "path characters": [_route(_rule(matches=[{"path": {"type": "PathPrefix", "value": v}}])) for v in PATHS_OUTSIDE_THE_PATTERN],
    "path": [_route(_rule(matches=[{"path": {"type": "Exact", "value": v}}])) for v in BAD_PATHS + GOOD_PATHS],
    "non-ASCII header value": [_route(_headers(v)) for v in NON_ASCII_VALUES],
    "YAML 1.1 scalar": [_route(_headers(v)) for v in YAML_11_SCALARS],
    "header match": [_route(_headers(v)) for v in ("yes", "0x10", "012", "null", "~", "a  b")],
    "port-less Service reference": [
        _route({"backendRefs": [{"name": "web"}]}),
        _route(_rule(filters=[{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow"}}}])),
    ],
    "ignored field values": [_route(_rule(timeouts={"request": "1x"})), _route(_rule(timeouts={"request": "1s", "backendRequest": "2s"}))],
    "total matches": [_matches(64, 63), _matches(64, 64), _matches(64, 63, None), _matches(64, 64, 1)],
    "rule name pattern": [_route(_rule(name="Same")), _route(_rule(name="same_name"))],
    "rule names": [_route(_rule(name="a.b-c"))],
    "duplicate remove": [_route(_modifier(remove=["x-a", "x-a"]))],
    "header modifier": [_route(_modifier(remove=["x-a", "X-A"])), _route(_modifier())],
    "backend name not DNS-1123": [_route({"backendRefs": [{"name": n, "port": 80}]}) for n in ("Web", "web_1")],
    "RE2 refuses the regex": [_route(_rule(matches=[{"path": {"type": "RegularExpression", "value": v}}])) for v in ("((", "a(?=b)")],
    "Host added or removed": [_route(_modifier(remove=["host"])), _route(_modifier(add=[{"name": "Host", "value": "a"}]))],
    "mirror to own backend": [_route(_mirroring("web"))],
    "more mirrors than slots": [_route(_mirroring("s0", "s1", "s2"))],
    "same mirror twice": [_route(_mirroring("s", "s"))],
    "unknown sampler annotation": [{**_route(), "metadata": {"name": "route", "annotations": {"mirror-sampler.io/methodz": "GET"}}}],
}


def test_known_disagreements_are_exactly_as_listed(tmp_path: Path) -> None:
    batch = [Case(route, (label,)) for label, routes in EXPLICIT.items() for route in routes]
    assert set(KNOWN_DISAGREEMENTS) <= set(EXPLICIT), "each known disagreement has an explicit case"
    folder = tmp_path / "routes"
    folder.mkdir()
    files = []
    for i, case in enumerate(batch):
        files.append(folder / f"route-{i}.yaml")
        write(case.route, files[-1])
    verdicts = validate(files)
    wrong = []
    for path, case in zip(files, batch, strict=True):
        (label,) = case.changes
        accepted, problems = parser_accepts(path.read_text(encoding="utf-8"))
        crd = verdicts[path].valid
        known = KNOWN_DISAGREEMENTS.get(label)
        expected = (known[0], not known[0]) if known else (crd, crd)
        if (accepted, crd) != expected:
            wrong.append(f"{label}: parser {accepted}, CRD {crd}, listed {expected}: {problems[:1]} {list(verdicts[path].errors[:1])}")
    assert not wrong, "\n".join(wrong)
