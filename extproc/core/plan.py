"""The policy compiled for the hot path (pure).

``Plan.answer`` gives the same decision as ``Policy.decide`` (the same
``gate``, ``target_salt`` and ``in_sample``; tests compare the two on
generated requests) with no per-request configuration work, no allocation
beyond the header map, and no metric label lookups: every counter a rule can
touch is resolved when the plan is built, once per policy. Each distinct salt
of a rule's targets is hashed once a request; targets without a salt of their
own share the policy's, so the usual request costs one hash.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from .headers import Headers, Repeated
from .keys import KeyKind, extract_key
from .matching import PathType, RequestView
from .policy import Outcome, Rule, gate, in_sample, target_salt
from .ratelimit import TokenBucket
from .responses import Responder, Sampled
from .sampling import key_hash

Increment = Callable[[], None]


class DecisionCounters(Protocol):
    """Where decisions are counted (the server's Prometheus metrics)."""

    def decision_counter(self, rule: str, target: str, outcome: Outcome) -> Increment: ...


class RateCap:
    """At most ``rate`` mirrors a second to one target, in this process (a
    token bucket holding one second's worth). Unlike the fraction, which
    keys are cut is not consistent: it depends on arrival order."""

    __slots__ = ("bucket", "clock")

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.bucket = TokenBucket(rate, max(1.0, rate), clock())

    def take(self) -> bool:
        return self.bucket.take(self.clock())


class RulePlan:
    """One rule, compiled: the distinct salts its targets hash with; per
    target its threshold, (slot, backend) pair, counters, rate cap and the
    index of its salt; per blocking outcome the counters of every target."""

    __slots__ = ("rule", "salt", "more_salts", "targets", "blocked")

    def __init__(self, rule: Rule, counters: DecisionCounters, *, salt: bytes) -> None:
        """``salt``: the policy's, for the targets without one of their own."""
        self.rule = rule
        own = [target_salt(salt, t) for t in rule.mirrors]
        # Distinct salts in order of first use: index 0 is the first target's;
        # usually the only one (targets share a salt: one hash a request).
        salts = tuple(dict.fromkeys(own))
        self.salt = salts[0]
        self.more_salts = salts[1:]
        self.targets = tuple(
            (
                t,
                (t.slot, t.backend),
                counters.decision_counter(rule.id, t.backend, Outcome.MIRRORED),
                counters.decision_counter(rule.id, t.backend, Outcome.SKIPPED),
                None if rule.max_mirrors_per_second is None else RateCap(rule.max_mirrors_per_second),
                counters.decision_counter(rule.id, t.backend, Outcome.CAPPED),
                salts.index(s),
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
    """A policy compiled for the hot path; built once per policy (reload)."""

    def __init__(self, responder: Responder, counters: DecisionCounters) -> None:
        policy = responder.policy
        self.responder = responder
        self.policy = policy
        self.slot_names = responder.slot_names
        self.rules: dict[int, RulePlan] = {id(r): RulePlan(r, counters, salt=policy.salt) for r in policy.rules if r.mirrors}
        # The common shape (simple mode, or one catch-all rule for every
        # host): every request matches the same rule, no matching needed.
        self.only: RulePlan | None = None
        self.catch_all = False
        vhosts = policy.table.vhosts
        if len(vhosts) == 1 and vhosts[0][0] == "" and vhosts[0][1]:
            m = vhosts[0][1][0].match
            if m.path.type is PathType.PREFIX and m.path.prefix == "/" and not m.headers and not m.query_params and m.method is None:
                self.catch_all = True
                self.only = self.rules.get(id(vhosts[0][1][0].rule))
        # Header-only key chains (the default) skip the generic extractor
        # (host is the exception: ext_proc carries it as :authority).
        chain = policy.key_chain
        plain = all(s.kind is KeyKind.HEADER and s.name != "host" for s in chain)
        self.header_keys: tuple[str, ...] | None = tuple(s.name for s in chain) if plain else None
        self.enabled = policy.enabled
        self.by_id: dict[str, RulePlan | None] = {r.id: self.rules.get(id(r)) for r in policy.rules}

    def rule_plan(self, headers: Headers, repeated: Repeated | None = None, rule_id: str | None = None) -> RulePlan | None:
        """The rule Envoy matched when it says so (gRPC metadata set by the
        generated routes), else the sampler's own matching."""
        if rule_id is not None and rule_id in self.by_id:
            return self.by_id[rule_id]
        if self.catch_all:
            return self.only
        entry = self.policy.table.lookup(RequestView(headers, repeated))
        return None if entry is None else self.rules.get(id(entry.rule))

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
        if plan is None:
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
