"""One Envoy route of ``convert envoy``: its mirrors, read from the user's
route as the sampler can take them over, and the route rewritten as
``core.variants`` lays it out (variant routes, then the plain route), every
field this module does not know about kept (pure).

Each rewritten route carries an entry of ours in
``metadata.filter_metadata`` that records what was changed, so that a
converted configuration converts again to itself (``unconvert``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ..config.settings import NAME
from ..core.policy import SAMPLER_CLUSTER
from ..core.slots import MAX_COUNT, SlotHeaders
from ..core.variants import rule_layout
from ..envoy import render
from ..envoy.lua import DECIDE_FILTER
from ..envoy.module import MODULE_FILTER
from .envoy_data import Findings, Source, camel_name, key_of, mapping_or_empty, repeated, value_of

# Our ext_proc filter's name in a converted configuration. Not Envoy's
# canonical ext_proc name: the user may run an ext_proc filter of their own,
# and per-route configuration is looked up by filter name.
SAMPLER_FILTER = "mirror-sampler.ext_proc"
# The deciding filters a conversion adds, each configured per route: one engine's at a time.
OUR_ROUTE_FILTERS = (SAMPLER_FILTER, MODULE_FILTER, DECIDE_FILTER)
# Our entry in each converted route's metadata.filter_metadata.
METADATA_KEY = "mirror-sampler"
_DENOMINATORS = {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000, 0: 100, 1: 10_000, 2: 1_000_000}
# RequestMirrorPolicy in Envoy 1.40; anything else is a field this module cannot vouch for.
_MIRROR_FIELDS = (
    "cluster",
    "cluster_header",
    "runtime_fraction",
    "trace_sampled",
    "disable_shadow_host_suffix_append",
    "request_headers_mutations",
    "host_rewrite_literal",
)


@dataclass
class Mirror:
    cluster: str
    numerator: int
    denominator: int
    policy: dict[str, Any]  # the user's mirror policy, as written
    runtime_key: str | None


class Refused(Exception):
    """A mirror the sampler cannot honour exactly: the route stays as it was."""


class RouteRewriter(Findings):
    """Reads and rewrites one route at a time for these slot headers."""

    def __init__(self, slot_headers: SlotHeaders) -> None:
        super().__init__()
        self.slot_headers = slot_headers

    def route_mirrors(self, src: Source, path: str, route: dict[str, Any]) -> list[Mirror] | None:
        """The route's mirrors if the sampler can take them over; None when it
        has none, or when it is refused (with a note) or malformed (a problem)."""
        action = value_of(route, "route")
        if not isinstance(action, dict):
            return None
        policies_key = key_of(action, "request_mirror_policies")
        if policies_key is None:
            return None
        ppath = f"{path}.{src.field(route, 'route')}.{policies_key}"
        n_problems = len(self.problems)
        raw = self.items(src, ppath, action[policies_key], dict)
        if not raw:
            return None
        # The fields the conversion adds to, each read as Envoy does: a lone item is a list of one.
        match = mapping_or_empty(value_of(route, "match"))
        headers = self.items(src, f"{path}.{src.field(route, 'match')}.{src.field(match, 'headers')}", value_of(match, "headers"), dict)
        self.items(src, f"{path}.{src.field(route, 'request_headers_to_remove')}", value_of(route, "request_headers_to_remove"), str)
        mirrors: list[Mirror] = []
        refusals: list[str] = []
        names = [h.get("name") for h in headers or []]
        slot_matchers = sorted({str(n) for n in names if n in self.slot_headers.names})
        if slot_matchers:
            # A variant route `mirror-sampler envoy-config` rendered: its mirrors
            # are already the sampler's decision.
            refusals.append(f"match.headers: matches slot header(s) {', '.join(slot_matchers)}: already a mirror-sampler variant route")
        for j, policy in enumerate(raw):
            try:
                mirror = self.mirror(src, f"{ppath}[{j}]", policy)
            except Refused as e:
                refusals.append(f"{policies_key}[{j}]: {e}")
                continue
            if mirror is not None:
                mirrors.append(mirror)
        if len(self.problems) > n_problems:
            return None
        clusters = [m.cluster for m in mirrors]
        for c in sorted({c for c in clusters if clusters.count(c) > 1}):
            refusals.append(f"{policies_key}: mirrors to {c!r} twice; the sampler decides once per cluster")
        if len(raw) > MAX_COUNT:
            refusals.append(f"{policies_key}: {len(raw)} mirrors; the sampler has at most {MAX_COUNT} slot headers")
        elif len(raw) > self.slot_headers.count:
            refusals.append(
                f"{policies_key}: {len(raw)} mirrors but only {self.slot_headers.count} slot headers (convert with --slots {len(raw)} "
                f"and run the sampler with MIRROR_SLOTS={len(raw)})"
            )
        if refusals:
            what = f"route {route['name']!r}" if route.get("name") else "route"
            self.notes.extend(f"{src.label}: {path}: {what} left as it was: {r}" for r in refusals)
            return None
        return mirrors

    def mirror(self, src: Source, path: str, policy: Any) -> Mirror | None:
        if not isinstance(policy, dict):
            self.problems.append(f"{src.label}: {path}: must be a mapping, got {type(policy).__name__}")
            return None
        known = {*_MIRROR_FIELDS, *(camel_name(f) for f in _MIRROR_FIELDS)}
        unknown = sorted(str(k) for k in policy if k not in known)
        if unknown:
            raise Refused(f"unknown field(s) {', '.join(unknown)}: the sampler cannot tell what they change")
        header = value_of(policy, "cluster_header")
        if header is not None:
            raise Refused(f"cluster_header {header!r}: the mirror goes to the cluster a request header names; the sampler cannot set it")
        mutations_key = src.field(policy, "request_headers_mutations")
        self.items(src, f"{path}.{mutations_key}", policy.get(mutations_key), dict)
        cluster = value_of(policy, "cluster")
        if not isinstance(cluster, str) or not cluster:
            self.problems.append(f"{src.label}: {path}.cluster: must be a non-empty string, got {cluster!r}")
            return None
        if not NAME.match(cluster) or len(cluster) > 253:
            raise Refused(
                f"cluster {cluster!r} is not a lower-case DNS-1123 name, which the sampler's backend names must be "
                "(rename the cluster, e.g. with '-' for '_')"
            )
        if cluster == SAMPLER_CLUSTER:
            raise Refused(f"cluster {cluster!r} is the sampler's own cluster name")
        numerator, denominator, runtime_key = 100, 100, None
        fraction_key = key_of(policy, "runtime_fraction")
        if fraction_key is not None:
            fpath = f"{path}.{fraction_key}"
            rf = self.mapping(src, fpath, policy[fraction_key])
            if rf is None:
                return None
            for extra in sorted(k for k in rf if k not in ("default_value", "defaultValue", "runtime_key", "runtimeKey")):
                self.problems.append(f"{src.label}: {fpath}.{extra}: unknown field; allowed: default_value, runtime_key")
            runtime_key = value_of(rf, "runtime_key")
            if runtime_key is not None and not isinstance(runtime_key, str):
                self.problems.append(f"{src.label}: {fpath}.runtime_key: must be a string, got {runtime_key!r}")
            default = self.mapping(src, f"{fpath}.default_value", value_of(rf, "default_value")) or {}
            numerator = value_of(default, "numerator") if value_of(default, "numerator") is not None else 0
            raw_denominator = value_of(default, "denominator") if value_of(default, "denominator") is not None else "HUNDRED"
            if isinstance(numerator, str) and numerator.isdigit():
                numerator = int(numerator)  # protobuf JSON writes 64-bit-safe integers as strings; uint32 may come either way
            if not isinstance(numerator, int) or isinstance(numerator, bool) or not 0 <= numerator < 2**32:
                self.problems.append(f"{src.label}: {fpath}.default_value.numerator: must be an integer 0..4294967295, got {numerator!r}")
                return None
            if isinstance(raw_denominator, bool) or raw_denominator not in _DENOMINATORS:
                self.problems.append(
                    f"{src.label}: {fpath}.default_value.denominator: must be HUNDRED, TEN_THOUSAND or MILLION, got {raw_denominator!r}"
                )
                return None
            for extra in sorted(k for k in default if k not in ("numerator", "denominator")):
                self.problems.append(f"{src.label}: {fpath}.default_value.{extra}: unknown field; allowed: numerator, denominator")
            denominator = _DENOMINATORS[raw_denominator]
            # Envoy mirrors every request when the numerator exceeds the denominator.
            numerator = min(numerator, denominator)
        return Mirror(cluster, numerator, denominator, policy, runtime_key if isinstance(runtime_key, str) else None)

    def per_route(self, src: Source, route: dict[str, Any], config: dict[str, Any]) -> None:
        key = src.field(route, "typed_per_filter_config")
        per_filter = mapping_or_empty(route.get(key))
        per_filter[SAMPLER_FILTER] = config
        route[key] = per_filter

    def convert_route(self, src: Source, route: dict[str, Any], rule_id: str, mirrors: list[Mirror]) -> list[dict[str, Any]]:
        plain = copy.deepcopy(route)
        action = plain[src.field(plain, "route")]
        policies_key = src.field(action, "request_mirror_policies")
        original = action.pop(policies_key)
        remove_key = src.field(plain, "request_headers_to_remove")
        removed = repeated(plain.get(remove_key))
        already = {r.lower() for r in removed if isinstance(r, str)}
        added = [s for s in self.slot_headers.names if s not in already]
        plain[remove_key] = [*removed, *added]
        self.per_route(src, plain, render.as_data(render.ext_proc_naming(rule_id), src.casing))
        set_ours(src, plain, {"rule": rule_id, "request_mirror_policies": copy.deepcopy(original), "request_headers_to_remove": added})

        routes = []
        for layout in rule_layout(mirrors, _cluster, self.slot_headers):
            if layout.is_plain:
                routes.append(plain)
                continue
            suffix = "+".join(layout.tokens)
            variant = copy.deepcopy(plain)
            name_key = src.field(variant, "name")
            if name_key in variant:
                variant[name_key] = f"{variant[name_key]} mirror {suffix}"
            else:
                variant = {name_key: f"{rule_id} mirror {suffix}", **variant}
            match = variant.get(src.field(variant, "match"))
            if not isinstance(match, dict):
                match = variant[src.field(variant, "match")] = {}
            headers_key = src.field(match, "headers")
            slots = [render.as_data(h, src.casing) for h in render.slot_matchers(layout)]
            match[headers_key] = [*repeated(match.get(headers_key)), *slots]
            variant_action = variant[src.field(variant, "route")]
            variant_action[policies_key] = [self.static_policy(src, m.policy, rule_id) for m in layout.targets]
            set_ours(src, variant, {"rule": rule_id, "variant": suffix})
            routes.append(variant)
        return routes

    def static_policy(self, src: Source, policy: dict[str, Any], rule_id: str) -> dict[str, Any]:
        """The user's mirror policy, always taken (the sampler already decided),
        adding the marker header that names the rule on the mirrored copy."""
        out = {k: copy.deepcopy(v) for k, v in policy.items() if k not in ("runtime_fraction", "runtimeFraction")}
        key = src.field(out, "request_headers_mutations")
        marker = render.as_data(render.marker_mutation(self.slot_headers, rule_id), src.casing)
        out[key] = [*repeated(out.get(key)), marker]
        return out

    def unconvert(self, src: Source, routes: list[Any]) -> list[Any]:
        """Routes as they were before an earlier conversion: variants dropped,
        plain routes given back their mirror policies."""
        out: list[Any] = []
        for route in routes:
            if not isinstance(route, dict):
                out.append(route)
                continue
            ours = pop_ours(route)
            if ours is not None and "variant" in ours:
                continue
            key = key_of(route, "typed_per_filter_config")
            if key is not None and isinstance(route[key], dict):
                for ours_filter in OUR_ROUTE_FILTERS:
                    route[key].pop(ours_filter, None)
                if not route[key]:
                    del route[key]
            if ours is not None and isinstance(value_of(route, "route"), dict):
                action = value_of(route, "route")
                action[src.field(action, "request_mirror_policies")] = ours.get("request_mirror_policies") or []
                remove_key = key_of(route, "request_headers_to_remove")
                if remove_key is not None and isinstance(route[remove_key], list):
                    removed = list(route[remove_key])
                    for name in ours.get("request_headers_to_remove") or []:
                        if name in removed:
                            removed.remove(name)
                    if removed:
                        route[remove_key] = removed
                    else:
                        del route[remove_key]
            out.append(route)
        return out


def _cluster(mirror: Mirror) -> str:
    return mirror.cluster


def set_ours(src: Source, route: dict[str, Any], value: dict[str, Any]) -> None:
    meta_key = src.field(route, "metadata")
    meta = mapping_or_empty(route.get(meta_key))
    fm_key = src.field(meta, "filter_metadata")
    filter_metadata = mapping_or_empty(meta.get(fm_key))
    filter_metadata[METADATA_KEY] = value
    meta[fm_key] = filter_metadata
    route[meta_key] = meta


def ours_of(route: dict[str, Any]) -> dict[str, Any] | None:
    """What set_ours recorded on the route, left in place."""
    meta = value_of(route, "metadata")
    filter_metadata = value_of(meta, "filter_metadata") if isinstance(meta, dict) else None
    ours = filter_metadata.get(METADATA_KEY) if isinstance(filter_metadata, dict) else None
    return ours if isinstance(ours, dict) else None


def pop_ours(route: dict[str, Any]) -> dict[str, Any] | None:
    meta_key = key_of(route, "metadata")
    meta = route.get(meta_key) if meta_key else None
    if not isinstance(meta, dict):
        return None
    fm_key = key_of(meta, "filter_metadata")
    filter_metadata = meta.get(fm_key) if fm_key else None
    if not isinstance(filter_metadata, dict) or not isinstance(filter_metadata.get(METADATA_KEY), dict):
        return None
    ours: dict[str, Any] = filter_metadata.pop(METADATA_KEY)
    assert fm_key is not None and meta_key is not None
    if not filter_metadata:
        del meta[fm_key]
    if not meta:
        del route[meta_key]
    return ours
