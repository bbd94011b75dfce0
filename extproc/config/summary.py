"""What check-config shows of a valid configuration: per route, what the
sampler will match and mirror, and what it skipped and why (pure)."""

from __future__ import annotations

from collections.abc import Sequence

from ..compare.config import CompareConfig
from ..compare.differ import DEFAULT_IGNORED_HEADERS
from ..core.matching import Match, ValueMatch
from ..core.policy import MirrorTarget, Policy, Route, Rule
from .manifests import Skipped


def summarize(policy: Policy, skipped: Sequence[Skipped] = (), compare: CompareConfig | None = None) -> str:
    """The policy as a reader checks it against their manifests; ``skipped``
    and ``compare`` from ``parse_manifests`` (empty in simple mode)."""
    lines = [
        "mirroring: " + ("enabled" if policy.enabled else "DISABLED (kill switch): no request is mirrored"),
        f"key: {', '.join(str(k) for k in policy.key_chain)}; salt: {policy.salt.decode(errors='replace')!r}",
    ]
    by_route: dict[str, list[Skipped]] = {}
    for item in skipped:
        if item.route is not None:
            by_route.setdefault(item.route, []).append(item)
    for route in policy.routes:
        lines.extend(_route_lines(policy, route, by_route.get(route.id, [])))
    documents = [item for item in skipped if item.route is None]
    if documents:
        lines.append("skipped documents:")
        lines.extend(f"  {item.document}: {item.what}: {item.why}" for item in documents)
    if compare is not None:
        lines.extend(_compare_lines(compare))
    return "\n".join(lines) + "\n"


def _compare_lines(compare: CompareConfig) -> list[str]:
    """spec.compare: not the sampler's decision; envoy-config and the observer act on it."""
    r = compare.retention
    lines = [
        f"compare: {len(compare.rules)} rule(s) (the sampler does not act on it: envoy-config adds the capture points, "
        "`compare capture` judges; docs/compare.md)",
        f"  bodyLimit {compare.body_limit} bytes, shadowTimeout {compare.shadow_timeout_s:g}s, joinTimeout {r.join_timeout_s:g}s, "
        f"values stored: {'yes' if compare.store_values else 'no (paths only)'}",
        f"  retention: {r.max_comparisons} comparisons, {r.max_age_s:g}s, {r.max_pending} pending",
    ]
    if compare.private_headers:
        lines.append(f"  private headers: {', '.join(sorted(compare.private_headers))}")
    for rule_id, rule in compare.rules.items():
        secondary = (
            f"secondary {rule.secondary} (its differences are the noise)" if rule.secondary else "no secondary (every difference is real)"
        )
        lines.append(f"  rule {rule_id}: targets {', '.join(rule.targets)}; {secondary}; margin {rule.margin:g}")
        diff = rule.diff_rules
        if diff.ignored:
            lines.append(f"    ignore: {', '.join(str(p) for p in diff.ignored)}")
        extra = sorted(diff.ignored_headers - DEFAULT_IGNORED_HEADERS)
        if extra:
            lines.append(f"    ignore headers (beyond the defaults): {', '.join(extra)}")
        if diff.tolerance:
            lines.append(f"    numbers equal within {diff.tolerance:g}")
    return lines


def _route_lines(policy: Policy, route: Route, ignored: Sequence[Skipped]) -> list[str]:
    # Simple mode's one route has no namespace and no file.
    source = f" ({route.source})" if route.source else " (simple mode: every request)"
    lines = [f"route {route.id if route.namespace else route.name}{source}", f"  hostnames: {', '.join(route.hostnames) or 'any host'}"]
    for rule in route.rules:
        lines.extend(_rule_lines(policy, rule))
    if ignored:
        lines.append("  not acted on:")
        lines.extend(f"    {item.what}: {item.why}" for item in ignored)
    return lines


def _rule_lines(policy: Policy, rule: Rule) -> list[str]:
    lines = [f"  rule {rule.id}"]
    lines.extend(f"    match: {_match_text(m)}" for m in rule.matches)
    if rule.methods:
        lines.append(f"    mirrors only methods: {', '.join(sorted(rule.methods))}")
    if rule.max_mirrors_per_second is not None:
        lines.append(f"    at most {rule.max_mirrors_per_second:g} mirrors per second per target")
    lines.extend(f"    mirror {_mirror_text(policy, t)}" for t in rule.mirrors)
    if not rule.mirrors:
        lines.append("    no mirrors")
    if rule.backends:
        backends = ", ".join(f"{b.name}{'' if b.port is None else f':{b.port}'} (weight {b.weight})" for b in rule.backends)
        lines.append(f"    backends: {backends} (for envoy-config)")
    mod = rule.header_modifier
    if mod is not None:
        ops = [
            (op, names)
            for op, names in (("set", [n for n, _ in mod.set]), ("add", [n for n, _ in mod.add]), ("remove", list(mod.remove)))
            if names
        ]
        text = "; ".join(f"{op} {', '.join(names)}" for op, names in ops) or "none"
        lines.append(f"    request headers: {text} (for envoy-config)")
    return lines


def _match_text(match: Match) -> str:
    parts = [f"path {match.path.type.value} {match.path.value}"]
    parts.extend(f"header {_value_text(v)}" for v in match.headers)
    parts.extend(f"query {_value_text(v)}" for v in match.query_params)
    if match.method is not None:
        parts.append(f"method {match.method}")
    return ", ".join(parts)


def _value_text(value: ValueMatch) -> str:
    return f"{value.name} {value.type.value} {value.value!r}"


def _mirror_text(policy: Policy, target: MirrorTarget) -> str:
    f = target.fraction
    slot = policy.slot_names[target.slot] if target.slot < len(policy.slot_names) else f"slot {target.slot}"
    text = f"{target.backend}: {f.numerator}/{f.denominator} ({100 * f.numerator / f.denominator:g}%), slot header {slot}"
    if target.salt is not None:
        text += f", own salt {target.salt.decode(errors='replace')!r} (sampled independently of the rule's other targets)"
    return text
