"""The live view `up` prints: requests per primary and mirror, from Envoy's
stats; with spec.compare, the comparison per target, from the observer's counters."""

from __future__ import annotations

from collections.abc import Sequence

from ..compare.summary import LiveTarget
from ..core.policy import Policy


def view_rows(policy: Policy, stats: dict[str, int]) -> list[str]:
    def received(cluster: str) -> int:
        return stats.get(f"cluster.{cluster}.upstream_rq_total", 0)

    primaries = list(dict.fromkeys(b.name for r in policy.rules for b in r.backends))
    rows = [f"{'primary':<24}{'requests':>10}"]
    rows += [f"  {name:<22}{received(name):>10}" for name in primaries]
    rows.append(f"{'mirror':<24}{'requests':>10}{'of':>10}{'achieved':>10}  configured")
    targets: dict[str, tuple[set[str], list[str]]] = {}
    for rule in policy.rules:
        for m in rule.mirrors:
            seen, fractions = targets.setdefault(m.backend, (set(), []))
            seen.update(b.name for b in rule.backends)
            fractions.append(f"{100 * m.fraction.numerator / m.fraction.denominator:g}%")
    for name, (sources, fractions) in targets.items():
        got, of = received(name), sum(received(s) for s in sources)
        ratio = f"{100 * got / of:.1f}%" if of else "-"
        rows.append(f"  {name:<22}{got:>10}{of:>10}{ratio:>10}  {', '.join(dict.fromkeys(fractions))}")
    return rows


def compare_rows(live: Sequence[LiveTarget]) -> list[str]:
    """The comparison per target (spec.compare): pairs compared, the share with no
    real difference, answers missing, and the field that differs most (real ones first)."""
    rows = [f"{'compared':<24}{'pairs':>10}{'matched':>10}{'missing':>10}  top differing field"]
    for t in live:
        matched = "-" if t.matched_share is None else f"{100 * t.matched_share:.1f}%"
        name = f"{t.target} (secondary)" if t.is_secondary else t.target
        top = t.top_field
        field = "-" if top is None else f"{top.path} {100 * top.rate:.1f}%"
        if top is not None and top.noise_rate is not None:
            field += f" (noise {100 * top.noise_rate:.1f}%{'' if top.real else ': not real'})"
        rows.append(f"  {name:<22}{t.compared:>10}{matched:>10}{t.unanswered:>10}  {field}  [{t.rule}]")
    return rows
