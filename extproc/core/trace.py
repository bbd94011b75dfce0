"""What the decision engine did for one request, step by step (pure data).

``Plan.trace`` builds one; ``Plan.sampled`` (serving) takes the same steps
over the same compiled plan without building it. ``explain`` renders it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .keys import KeySource
from .policy import MirrorTarget, Outcome, Rule


@dataclass(frozen=True, slots=True)
class CapState:
    """A target's rate cap at the trace's instant, before this request."""

    per_second: float
    # Tokens in the target's bucket (a request takes one when it has one).
    tokens: float


@dataclass(frozen=True, slots=True)
class TargetTrace:
    target: MirrorTarget
    outcome: Outcome
    # The salt this target's u is hashed with (its own, else the policy's).
    salt: bytes
    # The key hashed with ``salt``; None when no key was hashed (no key, or
    # the rule was blocked before hashing).
    u: int | None = None
    # None: the target has no rate cap. Read only for a target in the sample:
    # outcome CAPPED when the bucket holds no token, MIRRORED when it does.
    cap: CapState | None = None


@dataclass(frozen=True, slots=True)
class Trace:
    rule: Rule | None
    # True: Envoy named the rule (gRPC metadata) and the sampler took it;
    # False: the sampler matched the request itself (no id, or an id that
    # names no rule of this policy).
    named_by_envoy: bool = False
    source: KeySource | None = None
    key: bytes | None = None
    # The key hashed with the policy's salt (None: no key hashed). It is every
    # target's u unless a target has a salt of its own: read TargetTrace.u.
    u: int | None = None
    targets: tuple[TargetTrace, ...] = ()

    @property
    def sampled(self) -> tuple[MirrorTarget, ...]:
        return tuple(t.target for t in self.targets if t.outcome is Outcome.MIRRORED)
