"""The decision as docs/DESIGN.md states it, written plainly and apart from
the engine (``core.plan.Plan``): the reference the differential tests hold
the plan's serving answer and its trace to. No compiled tables, no fast
paths, no rate caps (a cap depends on arrival order: the tests that cover
caps compare serving with the trace at the same instant)."""

from __future__ import annotations

from extproc.core.keys import extract_key
from extproc.core.policy import MirrorTarget, Outcome, Policy, Rule, target_salt
from extproc.core.sampling import decide


def reference_rule(policy: Policy, headers: dict[str, bytes], rule_id: str | None = None) -> Rule | None:
    """The rule Envoy names when it is one of the policy's, else the policy's own matching."""
    named = policy.rules_by_id.get(rule_id) if rule_id else None
    return named if named is not None else policy.match(headers)


def reference_outcomes(policy: Policy, headers: dict[str, bytes], rule_id: str | None = None) -> list[tuple[MirrorTarget, Outcome]]:
    """Each target of the request's rule with its outcome, caps ignored."""
    rule = reference_rule(policy, headers, rule_id)
    if rule is None:
        return []
    method = headers.get(":method", b"GET").decode("latin-1")
    if not policy.enabled:
        blocked: Outcome | None = Outcome.DISABLED
    elif rule.methods and method not in rule.methods:
        blocked = Outcome.METHOD
    else:
        blocked = None
    if blocked is None:
        found = extract_key(policy.key_chain, headers)
        if found is not None:
            key = found[1]
            sampled = [decide(target_salt(policy.salt, t), key, t.fraction) for t in rule.mirrors]
            return [(t, Outcome.MIRRORED if s else Outcome.SKIPPED) for t, s in zip(rule.mirrors, sampled, strict=True)]
        blocked = Outcome.NO_KEY
    return [(t, blocked) for t in rule.mirrors]
