"""One request's verdict per target (pure): the primary and each shadow's
capture paired up and diffed; ``settle`` then applies the noise rule."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .differ import Diff, DiffRules, diff
from .differ import Side as Compared
from .noise import Rates, Result, verdict
from .records import Capture


@dataclass(frozen=True, slots=True)
class Pairing:
    """A primary and one target's shadow for one request, before the noise rule."""

    rule: str
    target: str
    request_id: str
    primary: Capture | None
    shadow: Capture | None
    diff: Diff | None  # None unless both sides answered
    outcome: Result | None  # set when there is nothing to diff: error or missing

    @property
    def paths(self) -> tuple[str, ...]:
        return self.diff.paths if self.diff is not None else ()


def _compared(capture: Capture) -> Compared:
    return Compared(capture.status, capture.headers, capture.body, capture.body_truncated)


def pair(primary: Capture | None, shadow: Capture | None, rule: str, target: str, request_id: str, rules: DiffRules) -> Pairing:
    if shadow is None:
        return Pairing(rule, target, request_id, primary, None, None, Result.SHADOW_MISSING)
    if primary is None:
        return Pairing(rule, target, request_id, None, shadow, None, Result.PRIMARY_MISSING)
    if shadow.local_reply:
        # Envoy answered for the shadow (unreachable, reset, timed out): not the shadow's answer.
        return Pairing(rule, target, request_id, primary, shadow, None, Result.SHADOW_ERROR)
    return Pairing(rule, target, request_id, primary, shadow, diff(_compared(primary), _compared(shadow), rules), None)


def pair_up(primary: Capture | None, shadows: Mapping[str, Capture], rules: DiffRules, *, rule: str, request_id: str) -> list[Pairing]:
    """Every target the primary says was mirrored, and every shadow that
    arrived (a shadow without its primary is ``primary_missing``)."""
    targets: list[str] = list(primary.targets) if primary is not None else []
    targets += [t for t in sorted(shadows) if t not in targets]
    return [pair(primary, shadows.get(t), rule, t, request_id, rules) for t in targets]


def settle(pairing: Pairing, rates: Rates, noise: Rates | None, margin: float, *, is_secondary: bool) -> Result:
    """The final result: a secondary's differences are noise by definition."""
    if pairing.outcome is not None:
        return pairing.outcome
    if is_secondary:
        return Result.NOISE_ONLY if pairing.paths else Result.SAME
    return verdict(pairing.paths, rates, noise, margin)


def including(rates: Rates, paths: Sequence[str]) -> Rates:
    """The rates with one more compared pair that differed on ``paths``: a
    verdict counts the pair it judges."""
    differing = dict(rates.differing)
    for p in set(paths):
        differing[p] = differing.get(p, 0) + 1
    return Rates(rates.compared + 1, differing)


@dataclass(frozen=True, slots=True)
class Comparison:
    """One request's verdict for one target, as stored."""

    rule: str
    target: str
    request_id: str
    result: Result
    method: str
    path: str
    primary_status: int | None
    shadow_status: int | None
    primary_ms: float | None
    shadow_ms: float | None
    # Differing fields: path, and both values when the configuration keeps them.
    fields: tuple[dict[str, str], ...]
    compared_at: float
