"""The live view `up` prints: requests per primary and mirror, from Envoy's stats."""

from __future__ import annotations

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
