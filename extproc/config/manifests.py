"""HTTPRoute manifests (and the MirrorSampler document: kill switch, compare
settings) to routes, with every problem named by file, document and field
path (pure).

As strict as the Kubernetes API server with the Gateway API CRDs (v1.6.1,
experimental channel; the field list is in schema.py): an unknown field, a
duplicate YAML key, a near miss of the HTTPRoute kind or a CRD rule broken
is an error, so that a typo never turns into a silent 100% mirror. What the
sampler skips (other kinds, fields it does not act on) comes back as
``Skipped`` items, for check-config to show.

``parse_manifests`` is the one entry point: this module finds the documents
and their kinds; manifest_yaml.py does the YAML, httproute.py one HTTPRoute.
The caller passes the text; nothing here reads files.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from ..compare.config import CompareConfig, mirror_targets, parse_compare
from ..core.policy import Route
from . import schema
from .errors import ConfigError, Problems
from .httproute import check_annotations, mapping_field, parse_route
from .manifest_yaml import DuplicateKey, read_documents, unencodable_paths

GATEWAY_GROUP = "gateway.networking.k8s.io"
API_VERSIONS = (f"{GATEWAY_GROUP}/v1", f"{GATEWAY_GROUP}/v1beta1")
# Every kind of the Gateway API group (v1.6.1, experimental channel): any
# other kind in that group is a mistake, not a document to skip.
GATEWAY_KINDS = (
    "BackendTLSPolicy",
    "Gateway",
    "GatewayClass",
    "GRPCRoute",
    "HTTPRoute",
    "ListenerSet",
    "ReferenceGrant",
    "TCPRoute",
    "TLSRoute",
    "UDPRoute",
)
# Kinds that share files with routes (Kubernetes, Envoy Gateway, Istio): skipped
# without suspicion; any other kind close to HTTPRoute or MirrorSampler is a typo.
WELL_KNOWN_KINDS = frozenset(GATEWAY_KINDS) | {
    "List",
    "Namespace",
    "Service",
    "ServiceAccount",
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Pod",
    "Job",
    "CronJob",
    "ConfigMap",
    "Secret",
    "Endpoints",
    "EndpointSlice",
    "Ingress",
    "IngressClass",
    "NetworkPolicy",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "PersistentVolumeClaim",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "XBackendTrafficPolicy",
    "XListenerSet",
    "XMesh",
    "XBackend",
    "EnvoyProxy",
    "EnvoyExtensionPolicy",
    "EnvoyPatchPolicy",
    "ClientTrafficPolicy",
    "BackendTrafficPolicy",
    "SecurityPolicy",
    "Backend",
    "HTTPRouteFilter",
    "VirtualService",
    "DestinationRule",
    "EnvoyFilter",
}


@dataclass(frozen=True, slots=True)
class Skipped:
    """Something in the file the sampler does not act on, and why."""

    document: str  # "routes.yaml (document 2)"
    route: str | None  # "namespace/name" of the HTTPRoute it belongs to; None: a whole document
    what: str  # "Service backend-2", or a field path such as "spec.parentRefs"
    why: str


@dataclass(frozen=True, slots=True)
class ParseResult:
    routes: list[Route]
    enabled: bool  # False when a MirrorSampler document switches mirroring off
    problems: list[str]
    skipped: list[Skipped]
    # A MirrorSampler document's spec.compare: the sampler refuses it when
    # invalid and otherwise ignores it (envoy-config and the observer use it).
    compare: CompareConfig | None = None


SWITCH_GROUP = "mirror-sampler.io"
SWITCH_API = f"{SWITCH_GROUP}/v1alpha1"
SWITCH_KIND = "MirrorSampler"
# Kinds this parser reads; a kind close to one of them is a typo, not a document to skip.
_READ_KINDS = ("HTTPRoute", SWITCH_KIND)


@dataclass(frozen=True, slots=True)
class SamplerDocument:
    switch: bool | None  # spec.mirroring: True Enabled, False Disabled, None not given
    compare: Any  # spec.compare as written (None: not given); parse_compare reads it once the routes are known


def sampler_document(doc: dict[str, Any], where: str, duplicates: list[DuplicateKey]) -> tuple[SamplerDocument | None, list[str]]:
    """A MirrorSampler document: spec.mirroring Enabled or Disabled (the kill
    switch) and/or spec.compare (the comparison's settings, docs/compare.md)."""
    p = Problems(where)
    for dup in duplicates:
        p.add(dup.path, dup.message)
    if doc.get("apiVersion") != SWITCH_API:
        p.add("apiVersion", f"must be {SWITCH_API} for a {SWITCH_KIND}, got {doc.get('apiVersion')!r}")
        return None, p.items
    for problem in schema.check(doc, schema.MIRROR_SAMPLER).problems:
        p.add(problem.path, problem.message)
    meta = mapping_field(p, "metadata", doc.get("metadata"))
    check_annotations(p, mapping_field(p, "metadata.annotations", meta.get("annotations")), ())
    spec = mapping_field(p, "spec", doc.get("spec"), required=True)
    value, compare = spec.get("mirroring"), spec.get("compare")
    if not (value is None and compare is not None) and value not in ("Enabled", "Disabled"):
        p.add("spec.mirroring", f"must be Enabled or Disabled (optional in a document with spec.compare), got {value!r}")
    if p.items:
        return None, p.items
    return SamplerDocument(None if value is None else value == "Enabled", compare), []


def _compare(given: list[tuple[str, Any]], routes: list[Route], problems: list[str]) -> CompareConfig | None:
    """The one spec.compare of the file (given per document), checked against
    the file's routes: which rules mirror, to which targets."""
    if not given:
        return None
    first, data = given[0]
    problems.extend(
        f"{where}: spec.compare: given again (first in {first}); one MirrorSampler document carries it" for where, _ in given[1:]
    )
    try:
        return parse_compare(data, first, mirror_targets(routes), at="spec.compare")
    except ConfigError as e:
        problems.extend(e.problems)
        return None


def _kind_problem(kind: str, api_version: object) -> str | None:
    """Why a document that is neither an HTTPRoute nor a MirrorSampler is an
    error rather than one to skip: an unknown kind of the Gateway API or
    sampler groups, or a near miss of a kind the sampler reads."""
    group = api_version.partition("/")[0] if isinstance(api_version, str) and "/" in api_version else ""
    own = {GATEWAY_GROUP: GATEWAY_KINDS, SWITCH_GROUP: (SWITCH_KIND,)}.get(group)
    if own is not None and kind not in own:
        guess = schema.did_you_mean(kind, own)
        hint = f"did you mean {guess}?" if guess else f"known: {', '.join(own)}"
        return f"{kind!r} is not a kind of {group}; {hint}"
    if kind in WELL_KNOWN_KINDS:
        return None
    for read in _READ_KINDS:
        # Case-blind and close: HttpRoute, HTTPRoutes, HTTPRoue, Mirrorsampler.
        if kind.lower() == read.lower() or difflib.SequenceMatcher(None, kind.lower(), read.lower()).ratio() >= 0.8:
            return f"unknown kind {kind!r}; did you mean {read}?"
    return None


def _document_name(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    return f" {name}" if isinstance(name, str) else ""


def parse_manifests(text: str, source: str, slots: int = 2) -> ParseResult:
    """HTTPRoutes, whether mirroring is enabled (a MirrorSampler document may
    switch it off), every problem, and what was skipped and why (for
    check-config), from multi-document YAML; other kinds are skipped."""
    try:
        documents = read_documents(text, source)
    except ConfigError as e:
        return ParseResult([], True, e.problems, [])
    routes: list[Route] = []
    problems: list[str] = []
    skipped: list[Skipped] = []
    seen: dict[str, str] = {}
    enabled = True
    compare_given: list[tuple[str, Any]] = []
    for i, (doc, duplicates) in enumerate(documents):
        where = f"{source} (document {i + 1})"
        if doc is None:
            continue
        if not isinstance(doc, dict):
            problems.append(f"{where}: must be a mapping with apiVersion and kind, got {type(doc).__name__}")
            continue
        bad_text = list(unencodable_paths(doc))
        if bad_text:
            problems.extend(f"{where}: {path}: must be valid Unicode text (lone surrogate escape)" for path in bad_text)
            continue
        kind = doc.get("kind")
        if not isinstance(kind, str) or not kind:
            problems.append(f"{where}: kind: is required (a Kubernetes manifest names its kind), got {kind!r}")
            continue
        if kind == SWITCH_KIND:
            sampler_doc, errors = sampler_document(doc, where, duplicates)
            problems.extend(errors)
            if sampler_doc is not None:
                enabled = enabled and sampler_doc.switch is not False
                if sampler_doc.compare is not None:
                    compare_given.append((where, sampler_doc.compare))
            continue
        if kind != "HTTPRoute":
            problem = _kind_problem(kind, doc.get("apiVersion"))
            if problem is not None:
                problems.append(f"{where}: kind: {problem}")
                continue
            # Services, Deployments, Gateways... may share the file; their
            # YAML must still be sound.
            problems.extend(f"{where}: {dup.path}: {dup.message}" for dup in duplicates)
            why = "not an HTTPRoute: the sampler reads HTTPRoute and MirrorSampler documents"
            skipped.append(Skipped(where, None, f"{kind}{_document_name(doc)}", why))
            continue
        if doc.get("apiVersion") not in API_VERSIONS:
            allowed = ", ".join(API_VERSIONS)
            problems.append(f"{where}: apiVersion: must be one of {allowed} for an HTTPRoute, got {doc.get('apiVersion')!r}")
            continue
        route, errors, ignored = parse_route(doc, where, slots, duplicates)
        problems.extend(errors)
        if route is not None:
            if route.id in seen:
                problems.append(f"{where}: HTTPRoute {route.id} is already defined in {seen[route.id]}")
            else:
                seen[route.id] = where
                routes.append(route)
                skipped.extend(Skipped(where, route.id, f.path, f.message) for f in ignored)
    compare = _compare(compare_given, routes, problems)
    if not routes and not problems:
        problems.append(f"{source}: no HTTPRoute ({', '.join(API_VERSIONS)}) found")
    return ParseResult(routes, enabled, problems, skipped, compare)
