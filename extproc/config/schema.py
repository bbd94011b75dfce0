"""The fields of the manifests the sampler reads, as data: every field an
HTTPRoute (and a MirrorSampler document) may carry, whether the sampler acts
on it, and the list sizes the CRD allows (pure).

Followed: Gateway API v1.6.1, experimental channel (the one that carries
``percent`` and ``fraction``): config/crd/experimental/
gateway.networking.k8s.io_httproutes.yaml (bundle-version v1.6.1, commit
8bb74df00e56ec8f944d48c25e6c1c9c2f6848e3) and apis/v1/httproute_types.go of
kubernetes-sigs/gateway-api. Versions v1 and v1beta1 share one schema there.

``check`` walks a document against this description the way the API server
does with strict field validation: an unknown field is an error (with a
"did you mean" when a known one is close), a list over the CRD's maxItems, an
item twice in a list the CRD declares a set and a rule name outside the CRD's
pattern are errors, and the shape of fields the sampler ignores is checked
here, since nothing else looks at them. Fields the sampler reads keep their shape and
value checks in manifests.py, next to the code that reads them, so that each
problem is reported once.

Deliberately not enforced (each would refuse manifests the project loads and
tests today): the CRD's "Must have port for Service reference" (the sampler
needs no port), its character pattern for Exact/PathPrefix paths (a raw
"/a b" is matched as such), the ASCII-only part of its header value pattern,
and the value patterns and enums inside fields the sampler ignores.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum


class Kind(StrEnum):
    OBJECT = "a mapping"
    LIST = "a list"
    STRING = "a string"
    INTEGER = "an integer"
    BOOLEAN = "true or false"
    STRING_MAP = "a mapping of strings to strings"
    ANY = "anything"


class Use(Enum):
    READ = "read"  # the sampler acts on it (manifests.py checks its values)
    IGNORED = "ignored"  # known, not acted on, and worth telling the user (check-config lists it)
    QUIET = "quiet"  # known bookkeeping (labels, uid, status...): ignored without a word


@dataclass(frozen=True, slots=True)
class Node:
    kind: Kind
    use: Use = Use.READ
    fields: Mapping[str, Node] = field(default_factory=dict)
    items: Node | None = None
    max_items: int | None = None
    min_items: int = 0
    required: tuple[str, ...] = ()
    # Why the sampler ignores the field (Use.IGNORED), as check-config shows it.
    note: str = ""
    # A list the CRD declares a set (x-kubernetes-list-type: set): no item twice.
    unique: bool = False
    # A string's pattern in the CRD, checked wherever the field is.
    pattern: str | None = None


STR = Node(Kind.STRING)
INT = Node(Kind.INTEGER)
BOOL = Node(Kind.BOOLEAN)
ANY = Node(Kind.ANY)


def obj(required: tuple[str, ...] = (), **fields: Node) -> Node:
    return Node(Kind.OBJECT, fields=fields, required=required)


def lst(items: Node, max_items: int | None = None, min_items: int = 0, *, unique: bool = False) -> Node:
    return Node(Kind.LIST, items=items, max_items=max_items, min_items=min_items, unique=unique)


def quiet(node: Node) -> Node:
    return dataclasses.replace(node, use=Use.QUIET)


def ignored(node: Node, note: str) -> Node:
    return dataclasses.replace(node, use=Use.IGNORED, note=note)


NOT_USED = "not used by the sampler"

# Kubernetes ObjectMeta: what an exported or kubectl-edited manifest carries.
OBJECT_META = obj(
    name=STR,
    namespace=STR,
    creationTimestamp=ANY,  # manifests.py reads and checks it (YAML may give a timestamp)
    annotations=Node(Kind.STRING_MAP),
    labels=quiet(Node(Kind.STRING_MAP)),
    generateName=quiet(STR),
    selfLink=quiet(STR),
    uid=quiet(STR),
    resourceVersion=quiet(STR),
    generation=quiet(INT),
    deletionTimestamp=quiet(ANY),
    deletionGracePeriodSeconds=quiet(INT),
    ownerReferences=quiet(lst(ANY)),
    finalizers=quiet(lst(STR)),
    managedFields=quiet(lst(ANY)),
)

# BackendObjectReference (a RequestMirror's backendRef, ExternalAuth's).
_BACKEND_OBJECT_REF = obj(group=STR, kind=STR, name=STR, namespace=STR, port=INT)
_PARENT_REF = obj(group=STR, kind=STR, namespace=STR, name=STR, sectionName=STR, port=INT, required=("name",))
_HEADER_PAIRS = lst(obj(name=STR, value=STR), max_items=16)
_HEADER_MODIFIER = obj(set=_HEADER_PAIRS, add=_HEADER_PAIRS, remove=lst(STR, max_items=16, unique=True))
_PATH_MODIFIER = obj(type=STR, replaceFullPath=STR, replacePrefixMatch=STR, required=("type",))
_DURATION = STR

_FILTER = obj(
    type=STR,
    requestHeaderModifier=_HEADER_MODIFIER,  # read: envoy-config renders it
    requestMirror=obj(backendRef=_BACKEND_OBJECT_REF, percent=INT, fraction=obj(numerator=INT, denominator=INT)),
    responseHeaderModifier=ignored(_HEADER_MODIFIER, f"ResponseHeaderModifier filter: {NOT_USED}"),
    requestRedirect=ignored(
        obj(scheme=STR, hostname=STR, path=_PATH_MODIFIER, port=INT, statusCode=INT), f"RequestRedirect filter: {NOT_USED}"
    ),
    urlRewrite=ignored(obj(hostname=STR, path=_PATH_MODIFIER), f"URLRewrite filter: {NOT_USED}"),
    extensionRef=ignored(obj(group=STR, kind=STR, name=STR, required=("group", "kind", "name")), f"ExtensionRef filter: {NOT_USED}"),
    cors=ignored(
        obj(
            allowOrigins=lst(STR, 64, unique=True),
            allowCredentials=BOOL,
            allowMethods=lst(STR, 9, unique=True),
            allowHeaders=lst(STR, 64, unique=True),
            exposeHeaders=lst(STR, 64, unique=True),
            maxAge=INT,
        ),
        f"CORS filter: {NOT_USED}",
    ),
    externalAuth=ignored(
        obj(
            protocol=STR,
            backendRef=obj(group=STR, kind=STR, name=STR, namespace=STR, port=INT, required=("name",)),
            grpc=obj(allowedHeaders=lst(STR, 64, unique=True)),
            http=obj(path=STR, allowedHeaders=lst(STR, 64, unique=True), allowedResponseHeaders=lst(STR, 64, unique=True)),
            forwardBody=obj(maxSize=INT),
            required=("backendRef", "protocol"),
        ),
        f"ExternalAuth filter: {NOT_USED}",
    ),
)

# Filter type -> the field that carries its configuration; the CRD requires
# that field for its type and refuses it for any other type.
FILTER_FIELDS: Mapping[str, str] = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestMirror": "requestMirror",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "ExtensionRef": "extensionRef",
    "CORS": "cors",
    "ExternalAuth": "externalAuth",
}
# The CRD: "<type> filter cannot be repeated" (RequestMirror may be).
UNREPEATABLE_FILTERS = ("CORS", "RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect", "URLRewrite")

_VALUE_MATCH = obj(type=STR, name=STR, value=STR)
_MATCH = obj(
    path=obj(type=STR, value=STR),
    headers=lst(_VALUE_MATCH, 16),
    queryParams=lst(_VALUE_MATCH, 16),
    method=STR,
)
_HTTP_BACKEND_REF = obj(
    group=STR,
    kind=STR,
    name=STR,
    namespace=STR,
    port=INT,
    weight=INT,
    filters=ignored(lst(_FILTER, 16), f"a backendRef's filters: {NOT_USED}"),
)
# The CRD's rule on spec.rules is "sum of matches.size() <= 128" (its message
# says "less than 128", but the rule is what the API server enforces).
MAX_MATCHES_PER_ROUTE = 128
# The CRD's maxItems that the converters' outputs must keep too (they cut what is longer).
MAX_RULES_PER_ROUTE = 16
MAX_HOSTNAMES_PER_ROUTE = 16
MAX_BACKEND_REFS_PER_RULE = 16


def route_match_count(rules: Iterable[object]) -> int:
    """Matches across a route's rules as the CRD's rule counts them: after
    defaulting, so a rule without ``matches`` has the default one (a rule that
    is not a mapping is reported elsewhere and counts none)."""
    total = 0
    for rule in rules:
        if isinstance(rule, Mapping):
            matches = rule.get("matches")
            total += len(matches) if isinstance(matches, list) else 1
    return total


# The CRD's SectionName: a rule's name is a lower-case DNS subdomain.
SECTION_NAME = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_RULE = obj(
    name=quiet(dataclasses.replace(STR, pattern=SECTION_NAME)),
    matches=lst(_MATCH, 64),
    filters=lst(_FILTER, 16),
    backendRefs=lst(_HTTP_BACKEND_REF, MAX_BACKEND_REFS_PER_RULE),
    timeouts=ignored(obj(request=_DURATION, backendRequest=_DURATION), NOT_USED),
    retry=ignored(obj(codes=lst(INT), attempts=INT, backoff=_DURATION), NOT_USED),
    sessionPersistence=ignored(
        obj(sessionName=STR, absoluteTimeout=_DURATION, type=STR, cookieConfig=obj(lifetimeType=STR)),
        NOT_USED,
    ),
)

HTTPROUTE = obj(
    apiVersion=STR,
    kind=STR,
    metadata=OBJECT_META,
    spec=obj(
        parentRefs=ignored(lst(_PARENT_REF, 32), f"{NOT_USED} (it decides for whatever Envoy asks about)"),
        hostnames=lst(STR, MAX_HOSTNAMES_PER_ROUTE),
        rules=lst(_RULE, MAX_RULES_PER_ROUTE, min_items=1),
        useDefaultGateways=ignored(STR, NOT_USED),
    ),
    status=quiet(ANY),
)

# spec.compare is read by extproc.compare.config.parse_compare (strict, with its own did-you-mean).
MIRROR_SAMPLER = obj(apiVersion=STR, kind=STR, metadata=OBJECT_META, spec=obj(mirroring=STR, compare=ANY))


@dataclass(frozen=True, slots=True)
class Finding:
    path: str
    message: str


@dataclass(slots=True)
class Findings:
    problems: list[Finding] = field(default_factory=list)
    # Fields present that the sampler ignores, with the note saying so.
    ignored: list[Finding] = field(default_factory=list)


def did_you_mean(word: str, known: Iterable[str]) -> str | None:
    """The closest known word, if one is close (case differences count as close)."""
    choices = list(known)
    by_case = [k for k in choices if k.lower() == word.lower()]
    if by_case:
        return by_case[0]
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_field_message(key: str, known: Mapping[str, Node] | tuple[str, ...]) -> str:
    guess = did_you_mean(key, list(known))
    if guess is not None:
        return f"unknown field; did you mean {guess}?"
    return f"unknown field (known: {', '.join(sorted(known))})"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_ok(value: object, kind: Kind) -> bool:
    if kind is Kind.OBJECT:
        return isinstance(value, dict)
    if kind is Kind.LIST:
        return isinstance(value, list)
    if kind is Kind.STRING:
        return isinstance(value, str)
    if kind is Kind.INTEGER:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is Kind.BOOLEAN:
        return isinstance(value, bool)
    if kind is Kind.STRING_MAP:
        return isinstance(value, dict)
    return True


def check(value: object, node: Node, path: str = "") -> Findings:
    """Unknown fields, list sizes, and the shape of fields the sampler does
    not read, for one document (``path`` "" is its root)."""
    found = Findings()
    _walk(value, node, path, False, found)
    return found


def _walk(value: object, node: Node, path: str, shape: bool, found: Findings) -> None:
    # The API server drops null fields before validating: null means absent.
    if value is None:
        return
    if node.use is Use.IGNORED:
        found.ignored.append(Finding(path, node.note))
    # Below a field the sampler does not read, this walk is the only check.
    shape = shape or node.use is not Use.READ
    if shape and not _type_ok(value, node.kind):
        shown = type(value).__name__ if node.kind in (Kind.OBJECT, Kind.LIST, Kind.STRING_MAP) else repr(value)
        found.problems.append(Finding(path, f"must be {node.kind.value}, got {shown}"))
        return
    if node.pattern is not None and isinstance(value, str) and not re.fullmatch(node.pattern, value):
        found.problems.append(Finding(path, f"must match ^{node.pattern}$ (the CRD's pattern), got {value!r}"))
    if node.kind is Kind.STRING_MAP and shape and isinstance(value, dict):
        for key, text in value.items():
            if not isinstance(text, str):
                found.problems.append(Finding(_join(path, str(key)), f"must be a string, got {text!r}"))
    elif node.kind is Kind.OBJECT and isinstance(value, dict):
        for key, child in value.items():
            where = _join(path, str(key))
            known = node.fields.get(key) if isinstance(key, str) else None
            if known is None:
                found.problems.append(Finding(where, unknown_field_message(str(key), node.fields)))
            else:
                _walk(child, known, where, shape, found)
        if shape:
            for name in node.required:
                if value.get(name) is None:
                    found.problems.append(Finding(_join(path, name), "is required"))
    elif node.kind is Kind.LIST and isinstance(value, list):
        if node.max_items is not None and len(value) > node.max_items:
            found.problems.append(Finding(path, f"must have at most {node.max_items} items, got {len(value)}"))
        if len(value) < node.min_items:
            found.problems.append(Finding(path, f"must have at least {node.min_items} item(s), got {len(value)}"))
        if node.unique:
            seen: list[object] = []
            for i, item in enumerate(value):
                if item in seen:
                    found.problems.append(Finding(f"{path}[{i}]", f"Duplicate value: {item!r} (the CRD's list is a set)"))
                seen.append(item)
        if node.items is not None:
            for i, item in enumerate(value):
                # A null list item is not dropped by the API server: it is a wrong type.
                if item is None and shape and node.items.kind is not Kind.ANY:
                    found.problems.append(Finding(f"{path}[{i}]", f"must be {node.items.kind.value}, got null"))
                    continue
                _walk(item, node.items, f"{path}[{i}]", shape, found)
