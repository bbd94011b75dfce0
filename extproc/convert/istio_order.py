"""Where Istio and the sampler could pick different routes for a request
(``convert istio``): Istio takes the first route that matches, the sampler
the rule that ranks first in Gateway API precedence (pure)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import re2

from ..core.matching import Entry, compile_regex
from ..core.policy import Route
from .istio_translate import HttpRoute, VirtualService


def _string_overlap(a: object, b: object) -> bool:
    """False only when no value can satisfy both StringMatches."""
    if not isinstance(a, dict) or not isinstance(b, dict) or len(a) != 1 or len(b) != 1:
        return True
    (ka, va), (kb, vb) = next(iter(a.items())), next(iter(b.items()))
    if not isinstance(va, str) or not isinstance(vb, str):
        return True
    if (ka == "prefix" and kb == "exact") or (ka == "regex" and kb == "exact"):
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


def order_problems(vs: VirtualService, routes: Sequence[Route]) -> dict[int, str]:
    """http index -> why the sampler could pick another rule than Istio for
    this mirrored route: a later route (Istio never reaches it first) that may
    take the same request and outranks it in Gateway API precedence.
    ``routes``: the sampler's HTTPRoutes for ``vs`` (``sampler_routes``), whose
    rules, in order, begin with each translated route once, in Istio's order
    (the other HTTPRoutes repeat them for other host names)."""
    problems: dict[int, str] = {}
    for index, later in _clashes(vs, routes):
        problems.setdefault(
            index,
            f"http[{later.index}] comes later but may take the same requests and ranks first in Gateway API precedence "
            "(the sampler's), so the sampler could decide for the wrong route",
        )
    return problems


def outranking_delegates(vs: VirtualService, routes: Sequence[Route]) -> set[int]:
    """The delegating routes (in the sampler's copy only to mirror nothing for
    what Istio sends to the delegate) that outrank an earlier mirrored route:
    left out of the copy, they cost that route nothing (what both match goes
    to the mirrored one in Istio, and so in the sampler)."""
    return {later.index for _, later in _clashes(vs, routes) if later.delegates}


def _clashes(vs: VirtualService, routes: Sequence[Route]) -> Iterator[tuple[int, HttpRoute]]:
    """(a mirrored route's http index, the first later route that may take the same requests and outranks it)."""
    translated = [r for r in vs.routes if r.rule is not None]
    raw_matches = [list(r.raw.get("match") or [{}]) for r in translated]
    rules = [(route, ri, rule) for route in routes for ri, rule in enumerate(route.rules)][: len(translated)]
    entries = [
        [Entry(match, rule, route.creation_timestamp, route.id, ri, mi) for mi, match in enumerate(rule.matches)]
        for route, ri, rule in rules
    ]
    for k, r in enumerate(translated):
        if not r.mirrors or r.delegates:
            continue
        for later in range(k + 1, len(translated)):
            if any(
                el.sort_key() < ek.sort_key() and may_overlap(raw_matches[k][mk], raw_matches[later][ml])
                for mk, ek in enumerate(entries[k])
                for ml, el in enumerate(entries[later])
            ):
                yield r.index, translated[later]
                break
