"""The report's figures, from the comparisons kept (pure).

Per rule and target: how many were compared, the share that matched, each
differing field with its rate, its noise rate (the secondary's rate on that
field) and whether it is real, example request ids, status-code pairs and
latency percentiles of both sides.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import CompareConfig
from .judge import Comparison
from .noise import Rates, Result, is_real

EXAMPLES = 3
PERCENTILES = (50, 90, 99)
_COMPARED = (Result.SAME, Result.DIFFERS, Result.NOISE_ONLY)


def percentile(values: Sequence[float], p: int) -> float | None:
    """Nearest rank: the smallest value with at least p% of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass(frozen=True, slots=True)
class FieldSummary:
    path: str
    count: int
    rate: float
    noise_rate: float | None  # None: no secondary for this rule
    real: bool
    examples: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TargetSummary:
    rule: str
    target: str
    is_secondary: bool
    results: dict[str, int]
    compared: int  # pairs where both sides answered
    fields: tuple[FieldSummary, ...]
    status_pairs: tuple[tuple[int | None, int | None, int], ...]
    latency_ms: dict[str, dict[str, float | None]]

    @property
    def matched_share(self) -> float | None:
        """No real difference (identical, or differing only where the noise does)."""
        matched = self.results.get(Result.SAME.value, 0) + self.results.get(Result.NOISE_ONLY.value, 0)
        return matched / self.compared if self.compared else None

    @property
    def identical_share(self) -> float | None:
        return self.results.get(Result.SAME.value, 0) / self.compared if self.compared else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "target": self.target,
            "secondary": self.is_secondary,
            "compared": self.compared,
            "matched_share": self.matched_share,
            "identical_share": self.identical_share,
            "results": self.results,
            "fields": [
                {"path": f.path, "count": f.count, "rate": f.rate, "noise_rate": f.noise_rate, "real": f.real, "examples": list(f.examples)}
                for f in self.fields
            ],
            "status_pairs": [{"primary": p, "shadow": s, "count": n} for p, s, n in self.status_pairs],
            "latency_ms": self.latency_ms,
        }


def _rates(rows: Iterable[Comparison]) -> Rates:
    compared = 0
    differing: Counter[str] = Counter()
    for c in rows:
        if c.result in _COMPARED:
            compared += 1
            differing.update({f["path"] for f in c.fields})
    return Rates(compared, dict(differing))


def summarize(comparisons: Iterable[Comparison], config: CompareConfig) -> list[TargetSummary]:
    groups: dict[tuple[str, str], list[Comparison]] = defaultdict(list)
    for c in comparisons:
        groups[(c.rule, c.target)].append(c)
    out = []
    for (rule, target), rows in sorted(groups.items()):
        settings = config.rule(rule)
        is_secondary = target == settings.secondary
        rates = _rates(rows)
        noise = _rates(groups.get((rule, settings.secondary), [])) if settings.secondary and not is_secondary else None
        examples: dict[str, list[str]] = defaultdict(list)
        for c in rows:
            for f in c.fields:
                if len(examples[f["path"]]) < EXAMPLES:
                    examples[f["path"]].append(c.request_id)
        fields = tuple(
            sorted(
                (
                    FieldSummary(
                        path=path,
                        count=count,
                        rate=rates.rate(path),
                        noise_rate=noise.rate(path) if noise is not None else None,
                        real=not is_secondary and (noise is None or is_real(path, rates, noise, settings.margin)),
                        examples=tuple(examples[path]),
                    )
                    for path, count in rates.differing.items()
                ),
                key=lambda f: (not f.real, -f.count, f.path),
            )
        )
        pairs = Counter((c.primary_status, c.shadow_status) for c in rows)
        latency = {
            side: {f"p{p}": percentile([v for c in rows if (v := getattr(c, f"{side}_ms")) is not None], p) for p in PERCENTILES}
            for side in ("primary", "shadow")
        }
        out.append(
            TargetSummary(
                rule=rule,
                target=target,
                is_secondary=is_secondary,
                results={r.value: n for r in Result if (n := sum(1 for c in rows if c.result is r))},
                compared=rates.compared,
                fields=fields,
                status_pairs=tuple((p, s, n) for (p, s), n in sorted(pairs.items(), key=lambda kv: (-kv[1], str(kv[0])))),
                latency_ms=latency,
            )
        )
    return out


# ---------------------------------------------------------------------------
# The live figures (`up`'s view), from the observer's counters rather than its store


@dataclass(frozen=True, slots=True)
class LiveTarget:
    rule: str
    target: str
    is_secondary: bool
    compared: int  # pairs where both sides answered
    matched: int  # no real difference (same, or noise only)
    unanswered: int  # shadow_error, shadow_missing, primary_missing
    top_field: FieldSummary | None  # the real field differing most often, else the most frequent one

    @property
    def matched_share(self) -> float | None:
        return self.matched / self.compared if self.compared else None


def live_targets(
    config: CompareConfig, results: Mapping[tuple[str, str, str], float], fields: Mapping[tuple[str, str, str], float]
) -> list[LiveTarget]:
    """Per rule and target, from the counters ``mirror_sampler_compared_total``
    (keyed by rule, target, result) and ``..._differing_fields_total`` (rule,
    target, path): rates and noise over everything counted so far, as the
    report computes them over everything kept."""
    by_target: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    for (rule, target, result), n in results.items():
        by_target[(rule, target)][result] += int(n)
    differing: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for (rule, target, path), n in fields.items():
        if n:
            differing[(rule, target)][path] = int(n)

    def rates(rule: str, target: str) -> Rates:
        counts = by_target.get((rule, target), Counter())
        return Rates(sum(counts[r.value] for r in _COMPARED), differing.get((rule, target), {}))

    out = []
    for rule, target in sorted(by_target):
        settings = config.rule(rule)
        is_secondary = target == settings.secondary
        own = rates(rule, target)
        noise = rates(rule, settings.secondary) if settings.secondary and not is_secondary else None
        candidates = [
            FieldSummary(
                path=path,
                count=count,
                rate=own.rate(path),
                noise_rate=noise.rate(path) if noise is not None else None,
                real=not is_secondary and (noise is None or is_real(path, own, noise, settings.margin)),
                examples=(),
            )
            for path, count in own.differing.items()
        ]
        counts = by_target[(rule, target)]
        out.append(
            LiveTarget(
                rule=rule,
                target=target,
                is_secondary=is_secondary,
                compared=own.compared,
                matched=counts[Result.SAME.value] + counts[Result.NOISE_ONLY.value],
                unanswered=sum(counts[r.value] for r in Result if r not in _COMPARED),
                top_field=min(candidates, key=lambda f: (not f.real, -f.count, f.path), default=None),
            )
        )
    return out
