"""A mirror target with a salt of its own (MirrorTarget.salt): its u is the
key hashed with that salt, so its sample is independent of the rule's other
targets, and still consistent per key and monotone in its own fraction. The
plan's serving answer, its trace and explain agree on it bit for bit (the
inline Lua: test_inline.py)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import pytest

from extproc.core import plan as plan_module
from extproc.core.explain import explain, render_text
from extproc.core.keys import DEFAULT_KEY_CHAIN, extract_key, parse_key_chain
from extproc.core.matching import Match
from extproc.core.plan import Plan
from extproc.core.policy import BackendRef, MirrorTarget, Outcome, Policy, Route, Rule, target_salt
from extproc.core.sampling import Fraction, decide, key_hash
from extproc.core.slots import SlotHeaders

Target = tuple[str, Fraction, bytes | None]


def salted_policy(targets: Sequence[Target], salt: bytes = b"", key: str | None = None, methods: frozenset[str] = frozenset()) -> Policy:
    mirrors = tuple(MirrorTarget(backend, fraction, i, salt=own) for i, (backend, fraction, own) in enumerate(targets))
    rule = Rule("ns/r/0", (Match(),), mirrors, (BackendRef("web", 8080),), methods=methods)
    chain = parse_key_chain(key) if key else DEFAULT_KEY_CHAIN
    return Policy((Route("ns", "r", (), (rule,)),), chain, salt=salt, slot_headers=SlotHeaders(count=max(2, len(mirrors))))


class Counters:
    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, Outcome], int] = {}

    def decision_counter(self, rule: str, target: str, outcome: Outcome) -> Callable[[], None]:
        def inc() -> None:
            self.counts[(rule, target, outcome)] = self.counts.get((rule, target, outcome), 0) + 1

        return inc


KEYS = [f"user-{i}".encode() for i in range(20_000)]


def sample(policy: Policy, backend: str) -> set[bytes]:
    out = set()
    plan = Plan(policy)
    for key in KEYS:
        d = plan.trace({":path": b"/", "x-request-id": key})
        if any(t.backend == backend for t in d.sampled):
            out.add(key)
    return out


def test_target_salt_is_its_own_else_the_policys() -> None:
    assert target_salt(b"p", MirrorTarget("a", Fraction(1), 0)) == b"p"
    assert target_salt(b"p", MirrorTarget("a", Fraction(1), 0, salt=b"")) == b""  # an empty salt of its own is a salt
    assert target_salt(b"p", MirrorTarget("a", Fraction(1), 0, salt=b"t")) == b"t"


@pytest.mark.parametrize("policy_salt", [b"", b"v2"])
def test_each_target_is_decided_with_its_own_u(policy_salt: bytes) -> None:
    targets: list[Target] = [
        ("a", Fraction(30), None),
        ("b", Fraction(30), b"b"),
        ("c", Fraction(5, 7), b"\x00\xff"),
        ("d", Fraction(30), b"b"),
    ]
    plan = Plan(salted_policy(targets, policy_salt))
    for key in KEYS[:3000]:
        d = plan.trace({":path": b"/", "x-request-id": key})
        assert d.u == key_hash(policy_salt, key)  # unchanged meaning: the policy's salt
        for td, (_, fraction, own) in zip(d.targets, targets, strict=True):
            salt = policy_salt if own is None else own
            assert td.salt == salt and td.u == key_hash(salt, key)
            assert (td.outcome is Outcome.MIRRORED) is decide(salt, key, fraction)
        # Same salt, same fraction: the same decision.
        assert d.targets[1].outcome is d.targets[3].outcome


def test_no_key_and_blocked_targets_carry_no_u() -> None:
    plan = Plan(salted_policy([("a", Fraction(50), b"x")], methods=frozenset({"POST"})))
    (blocked,) = plan.trace({":path": b"/", ":method": b"GET", "x-request-id": b"k"}).targets
    assert blocked.outcome is Outcome.METHOD and blocked.u is None and blocked.salt == b"x"
    (no_key,) = plan.trace({":path": b"/", ":method": b"POST"}).targets
    assert no_key.outcome is Outcome.NO_KEY and no_key.u is None and no_key.salt == b"x"


def test_shared_salt_nests_and_own_salts_are_independent() -> None:
    nested = salted_policy([("a", Fraction(50), None), ("b", Fraction(50), None)])
    assert sample(nested, "a") == sample(nested, "b")
    independent = salted_policy([("a", Fraction(50), None), ("b", Fraction(50), b"b")])
    a, b = sample(independent, "a"), sample(independent, "b")
    n = len(KEYS)
    # Independent halves share a quarter of the keys: 5,000 of 20,000, sd about 61.
    assert abs(len(a & b) - n / 4) < 5 * (n * 0.25 * 0.75) ** 0.5
    # ... and each is still about half.
    for s in (a, b):
        assert abs(len(s) - n / 2) < 5 * (n * 0.25) ** 0.5


def test_own_salt_sample_is_consistent_and_monotone_in_its_fraction() -> None:
    sets = [sample(salted_policy([("a", Fraction(10), None), ("b", Fraction(p), b"b")]), "b") for p in (5, 10, 40)]
    assert sets[0] <= sets[1] <= sets[2]
    assert 0 < len(sets[0]) < len(sets[1]) < len(sets[2])
    again = sample(salted_policy([("a", Fraction(90), b"x"), ("b", Fraction(10), b"b")]), "b")
    assert again == sets[1]  # the other targets change nothing


def test_a_target_salt_equal_to_the_policys_changes_nothing() -> None:
    plain = Plan(salted_policy([("a", Fraction(20), None), ("b", Fraction(40), None)], b"s"))
    same = Plan(salted_policy([("a", Fraction(20), None), ("b", Fraction(40), b"s")], b"s"))
    for key in KEYS[:2000]:
        headers = {":path": b"/", "x-request-id": key}
        assert [t.backend for t in plain.trace(headers).sampled] == [t.backend for t in same.trace(headers).sampled]


def test_target_salts_do_not_change_envoys_routes() -> None:
    """Salts are the sampler's business in ext_proc mode: a reload that only
    changes them needs no new Envoy configuration."""
    a = salted_policy([("a", Fraction(20), None), ("b", Fraction(40), None)])
    b = salted_policy([("a", Fraction(20), b"x"), ("b", Fraction(40), b"y")])
    assert a.envoy_shape() == b.envoy_shape()


TARGET_SETS: list[list[Target]] = [
    [("a", Fraction(35), None), ("b", Fraction(50), None)],
    [("a", Fraction(35), None), ("b", Fraction(50), b"b")],
    [("a", Fraction(35), b"x"), ("b", Fraction(50), b"y"), ("c", Fraction(100), None)],
    [("a", Fraction(35), b"x"), ("b", Fraction(50), None), ("c", Fraction(7, 9), b"x"), ("d", Fraction(0), b"")],
]


@pytest.mark.parametrize("targets", TARGET_SETS)
@pytest.mark.parametrize("policy_salt", [b"", b"v2"])
def test_plan_serves_what_the_decision_function_and_its_trace_say(targets: list[Target], policy_salt: bytes) -> None:
    policy = salted_policy(targets, policy_salt, key="cookie:session,header:x-request-id")
    counters = Counters()
    plan = Plan(policy, counters)
    rng = random.Random(7)
    want: dict[tuple[str, str, Outcome], int] = {}
    for i in range(3000):
        headers = {":path": b"/"}
        if rng.random() < 0.9:
            headers["x-request-id"] = rng.randbytes(rng.randrange(1, 24))
        if rng.random() < 0.3:
            headers["cookie"] = b"session=" + str(i).encode()
        found = extract_key(policy.key_chain, headers)
        # The reference: the decision function per target, with the target's salt.
        expected = tuple(
            (t.slot, t.backend) for t in policy.rules[0].mirrors if found and decide(target_salt(policy_salt, t), found[1], t.fraction)
        )
        trace = plan.trace(headers)
        assert plan.sampled(headers) == expected == tuple((t.slot, t.backend) for t in trace.sampled), headers
        for t in trace.targets:
            k = ("ns/r/0", t.target.backend, t.outcome)
            want[k] = want.get(k, 0) + 1
    assert counters.counts == want


@pytest.mark.parametrize(
    "targets,salts",
    [
        ([("a", Fraction(35), None), ("b", Fraction(50), None)], [b"p"]),  # the usual case: one hash
        ([("a", Fraction(35), None), ("b", Fraction(50), b"p")], [b"p"]),  # its own salt, the policy's value
        ([("a", Fraction(35), None), ("b", Fraction(50), b"x"), ("c", Fraction(50), b"x")], [b"p", b"x"]),
        ([("a", Fraction(35), b"x"), ("b", Fraction(50), b"y")], [b"x", b"y"]),  # the policy's salt is never needed
    ],
)
def test_plan_hashes_once_per_distinct_salt(monkeypatch: pytest.MonkeyPatch, targets: list[Target], salts: list[bytes]) -> None:
    policy = salted_policy(targets, b"p")
    plan = Plan(policy, Counters())
    calls: list[bytes] = []

    def counting(salt: bytes, key: bytes) -> int:
        calls.append(salt)
        return key_hash(salt, key)

    monkeypatch.setattr(plan_module, "key_hash", counting)
    plan.sampled({":path": b"/", "x-request-id": b"alice"})
    assert calls == salts


def test_explain_shows_each_targets_salt_and_u() -> None:
    policy = salted_policy([("a", Fraction(42), None), ("b", Fraction(42), b"v2")])
    result = explain(policy, {":path": b"/", "x-request-id": b"alice"})
    a, b = result["targets"]
    assert result["u"] == a["u"] == key_hash(b"", b"alice") == 3287336622105459802
    assert (a["salt"], a["own_salt"]) == ("", False)
    assert (b["salt"], b["own_salt"], b["u"]) == ("v2", True, 2539909752279064467)  # docs/DESIGN.md test vectors
    text = render_text(result)
    assert "u: 3287336622105459802 (policy salt)" in text
    assert "a (x-mirror-cluster-0) fraction 42/100 threshold" in text and "(policy salt), u 3287336622105459802: mirrored" in text
    assert "salt 'v2', u 2539909752279064467: mirrored" in text
