"""The decision engine: the policy compiled once, serving and explaining (pure).

``Plan`` is the only place that decides. It picks the rule (the one Envoy
named, else its own matching), gates it (kill switch, methods), reads the
key, hashes it once per distinct salt, compares each target's u with its
threshold and applies the target's rate cap. It drives those steps two ways
over the same compiled ``RulePlan``:

- ``sampled`` / ``answer`` serve: no per-request configuration work, no
  allocation beyond the header map and the sampled pairs, no metric label
  lookups (every counter a rule can touch is resolved when the plan is
  built), and no trace objects;
- ``trace`` explains: the same steps, recorded (``trace.Trace``), counting
  nothing and taking no cap token, so explaining a request never changes
  what serving does next.

The differential tests hold the two drivers to the same outcomes, caps and
rule ids included. The Plan also owns the policy's ``Responder`` (the
serialised answers).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple, Protocol

from .headers import Headers, Repeated
from .keys import KeyKind, extract_key
from .matching import PathType, RequestView
from .policy import MirrorTarget, Outcome, Policy, Rule, target_salt
from .ratelimit import TokenBucket
from .responses import Responder, Sampled
from .sampling import key_hash
from .trace import CapState, TargetTrace, Trace

Increment = Callable[[], None]
Clock = Callable[[], float]


class DecisionCounters(Protocol):
    """Where decisions are counted (the server's Prometheus metrics)."""

    def decision_counter(self, rule: str, target: str, outcome: Outcome) -> Increment: ...


def _uncounted() -> None:
    pass


class Uncounted:
    """Counters for a plan that only explains: every increment does nothing."""

    def decision_counter(self, rule: str, target: str, outcome: Outcome) -> Increment:
        return _uncounted


def gate(rule: Rule, enabled: bool, headers: Headers) -> Outcome | None:
    """Why none of a rule's targets is mirrored whatever the key, or None:
    the kill switch first, then the rule's method filter."""
    if not enabled:
        return Outcome.DISABLED
    if rule.raw_methods and headers.get(":method", b"GET") not in rule.raw_methods:
        return Outcome.METHOD
    return None


def in_sample(u: int, target: MirrorTarget) -> bool:
    """The decision for one target: ``u * d < n * 2**64``, as one comparison
    with the target's precomputed threshold (``Fraction.threshold``)."""
    return u < target.threshold


class RateCap:
    """At most ``rate`` mirrors a second to one target, in this process (a
    token bucket holding one second's worth). Unlike the fraction, which
    keys are cut is not consistent: it depends on arrival order."""

    __slots__ = ("rate", "bucket", "clock")

    def __init__(self, rate: float, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self.bucket = TokenBucket(rate, max(1.0, rate), clock())

    def take(self) -> bool:
        return self.bucket.take(self.clock())

    def state(self, now: float) -> CapState:
        """The bucket at ``now``, untouched: ``take`` then would succeed
        exactly when it holds a whole token."""
        return CapState(self.rate, self.bucket.available(now))


class TargetPlan(NamedTuple):
    """One mirror target, compiled. A tuple, so that serving unpacks it in
    one step; its order is the order ``Plan.sampled`` unpacks."""

    target: MirrorTarget
    pair: tuple[int, str]  # (slot, backend): what the answer sets
    mirrored: Increment
    skipped: Increment
    cap: RateCap | None
    capped: Increment
    salt_index: int  # into RulePlan.salts


class RulePlan:
    """One rule, compiled: the distinct salts its targets hash with, its
    targets, and per blocking outcome the counters of every target. A rule
    without mirrors has no targets (nothing to decide or count)."""

    __slots__ = ("rule", "salts", "salt", "more_salts", "targets", "blocked")

    def __init__(self, rule: Rule, counters: DecisionCounters, *, salt: bytes, clock: Clock) -> None:
        """``salt``: the policy's, for the targets without one of their own."""
        self.rule = rule
        own = [target_salt(salt, t) for t in rule.mirrors]
        # Distinct salts in order of first use: index 0 is the first target's;
        # usually the only one (targets share a salt: one hash a request).
        self.salts = tuple(dict.fromkeys(own)) or (salt,)
        self.salt = self.salts[0]
        self.more_salts = self.salts[1:]
        cap = rule.max_mirrors_per_second
        self.targets = tuple(
            TargetPlan(
                t,
                (t.slot, t.backend),
                counters.decision_counter(rule.id, t.backend, Outcome.MIRRORED),
                counters.decision_counter(rule.id, t.backend, Outcome.SKIPPED),
                None if cap is None else RateCap(cap, clock),
                counters.decision_counter(rule.id, t.backend, Outcome.CAPPED),
                self.salts.index(s),
            )
            for t, s in zip(rule.mirrors, own, strict=True)
        )
        self.blocked: dict[Outcome, tuple[Increment, ...]] = {
            outcome: tuple(counters.decision_counter(rule.id, t.backend, outcome) for t in rule.mirrors)
            for outcome in (Outcome.DISABLED, Outcome.METHOD, Outcome.NO_KEY)
        }


def _with_more(u: int, salts: tuple[bytes, ...], key: bytes) -> tuple[int, ...]:
    # Out of Plan.sampled so that ``key`` stays a plain local there: a
    # comprehension would make it a closure cell, made on every request.
    return (u, *[key_hash(s, key) for s in salts])


class Plan:
    """A policy compiled for deciding; built once per policy (reload).

    ``counters``: where serving counts its decisions (none for a plan that
    only explains). ``clock``: what the rate caps read (seconds, monotonic).
    """

    def __init__(self, policy: Policy, counters: DecisionCounters | None = None, clock: Clock = time.monotonic) -> None:
        counted = Uncounted() if counters is None else counters
        self.policy = policy
        self.responder = Responder(policy)
        self.slot_names = self.responder.slot_names
        self.clock = clock
        self.rules: dict[int, RulePlan] = {id(r): RulePlan(r, counted, salt=policy.salt, clock=clock) for r in policy.rules}
        # The common shape (simple mode, or one catch-all rule for every
        # host): every request matches the same rule, no matching needed.
        self.only: RulePlan | None = None
        self.catch_all = False
        vhosts = policy.table.vhosts
        if len(vhosts) == 1 and vhosts[0][0] == "" and vhosts[0][1]:
            m = vhosts[0][1][0].match
            if m.path.type is PathType.PREFIX and m.path.prefix == "/" and not m.headers and not m.query_params and m.method is None:
                self.catch_all = True
                self.only = self.rules[id(vhosts[0][1][0].rule)]
        # Header-only key chains (the default) skip the generic extractor
        # (host is the exception: ext_proc carries it as :authority).
        chain = policy.key_chain
        plain = all(s.kind is KeyKind.HEADER and s.name != "host" for s in chain)
        self.header_keys: tuple[str, ...] | None = tuple(s.name for s in chain) if plain else None
        self.enabled = policy.enabled
        self.by_id: dict[str, RulePlan] = {r.id: self.rules[id(r)] for r in policy.rules}

    def rule_plan(self, headers: Headers, repeated: Repeated | None = None, rule_id: str | None = None) -> RulePlan | None:
        """The rule Envoy matched when it says so (gRPC metadata set by the
        generated routes), else the sampler's own matching."""
        if rule_id is not None and rule_id in self.by_id:
            return self.by_id[rule_id]
        if self.catch_all:
            return self.only
        entry = self.policy.table.lookup(RequestView(headers, repeated))
        return None if entry is None else self.rules[id(entry.rule)]

    def key(self, headers: Headers) -> bytes | None:
        names = self.header_keys
        if names is not None:
            for name in names:
                value = headers.get(name)
                if value:
                    return value
            return None
        found = extract_key(self.policy.key_chain, headers)
        return None if found is None else found[1]

    def sampled(self, headers: Headers, repeated: Repeated | None = None, rule_id: str | None = None) -> Sampled:
        """The (slot, backend) pairs this request is mirrored to; counts the decision."""
        plan = self.rule_plan(headers, repeated, rule_id)
        if plan is None or not plan.targets:
            return ()
        blocked = gate(plan.rule, self.enabled, headers)
        if blocked is None:
            key = self.key(headers)
            if key is not None:
                u = key_hash(plan.salt, key)
                # Targets with other salts: one more hash per distinct salt
                # (us[i] is the u of salt i; i == 0 is u).
                more = plan.more_salts
                us = _with_more(u, more, key) if more else ()
                sampled = []
                for target, pair, mirrored, skipped, cap, capped, salt_index in plan.targets:
                    if not in_sample(us[salt_index] if salt_index else u, target):
                        skipped()
                    elif cap is None or cap.take():
                        mirrored()
                        sampled.append(pair)
                    else:
                        capped()
                return tuple(sampled)
            blocked = Outcome.NO_KEY
        for inc in plan.blocked[blocked]:
            inc()
        return ()

    def answer(self, headers: Headers, repeated: Repeated | None = None, rule_id: str | None = None) -> bytes:
        sampled = self.sampled(headers, repeated, rule_id)
        forged = False
        for name in self.slot_names:
            if name in headers:
                forged = True
                break
        return self.responder.response(sampled, forged)

    def trace(self, headers: Headers, repeated: Repeated | None = None, rule_id: str | None = None, now: float | None = None) -> Trace:
        """What ``sampled`` would decide for this request, step by step,
        counting nothing and taking no cap token. ``now``: the instant at
        which the caps are read (default: the plan's clock)."""
        named = rule_id is not None and rule_id in self.by_id
        return self.trace_rule(self.rule_plan(headers, repeated, rule_id), headers, named_by_envoy=named, now=now)

    def trace_rule(self, plan: RulePlan | None, headers: Headers, *, named_by_envoy: bool = False, now: float | None = None) -> Trace:
        """``trace`` past the choice of the rule (``rule_plan``'s answer), for
        callers that choose it once for many requests (``explain_bulk``)."""
        if plan is None:
            return Trace(None)
        rule = plan.rule
        if not plan.targets:
            return Trace(rule, named_by_envoy)
        salts = plan.salts
        blocked = gate(rule, self.enabled, headers)
        found = None if blocked is not None else extract_key(self.policy.key_chain, headers)
        if found is None:
            outcome = Outcome.NO_KEY if blocked is None else blocked
            return Trace(rule, named_by_envoy, targets=tuple(TargetTrace(t.target, outcome, salts[t.salt_index]) for t in plan.targets))
        source, key = found
        us = _with_more(key_hash(plan.salt, key), plan.more_salts, key)
        policy_salt = self.policy.salt
        policy_u = us[salts.index(policy_salt)] if policy_salt in salts else key_hash(policy_salt, key)
        instant = now
        targets = []
        for t in plan.targets:
            u = us[t.salt_index]
            state = None
            if t.cap is not None:
                if instant is None:
                    instant = self.clock()
                state = t.cap.state(instant)
            if not in_sample(u, t.target):
                outcome = Outcome.SKIPPED
            elif state is None or state.tokens >= 1.0:
                outcome = Outcome.MIRRORED
            else:
                outcome = Outcome.CAPPED
            targets.append(TargetTrace(t.target, outcome, salts[t.salt_index], u, state))
        return Trace(rule, named_by_envoy, source, key, policy_u, tuple(targets))
