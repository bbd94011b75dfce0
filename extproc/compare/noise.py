"""Which differences are real (pure): Diffy's rule.

A secondary target runs the primary's code and gets the very same requests
(same salt, same fraction). Per field path, the share of compared requests
where primary and secondary differ is that field's noise rate. A candidate's
difference on a field is real only when the candidate's rate on that field
exceeds the noise rate by more than the margin; otherwise it is noise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

DEFAULT_MARGIN = 0.05


class Result(StrEnum):
    SAME = "same"
    DIFFERS = "differs"
    NOISE_ONLY = "noise_only"
    SHADOW_ERROR = "shadow_error"
    SHADOW_MISSING = "shadow_missing"
    PRIMARY_MISSING = "primary_missing"


@dataclass(frozen=True, slots=True)
class Rates:
    """How often each field differed among ``compared`` pairs of one rule and target."""

    compared: int
    differing: Mapping[str, int]

    def rate(self, path: str) -> float:
        return self.differing.get(path, 0) / self.compared if self.compared else 0.0


NO_RATES = Rates(0, {})


def is_real(path: str, candidate: Rates, noise: Rates, margin: float) -> bool:
    return candidate.rate(path) > noise.rate(path) + margin


def real_fields(paths: Iterable[str], candidate: Rates, noise: Rates | None, margin: float) -> list[str]:
    """The differing fields that count; with no secondary every difference counts."""
    if noise is None:
        return list(paths)
    return [p for p in paths if is_real(p, candidate, noise, margin)]


def verdict(paths: Iterable[str], candidate: Rates, noise: Rates | None, margin: float) -> Result:
    """same, differs or noise_only for a pair that was compared."""
    paths = list(paths)
    if not paths:
        return Result.SAME
    return Result.DIFFERS if real_fields(paths, candidate, noise, margin) else Result.NOISE_ONLY
