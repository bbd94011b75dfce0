"""The one decision engine: ``Plan.sampled`` (serving) and ``Plan.trace``
(explain) take the same steps, and the trace takes nothing from serving.

The differential test generates policies (rules with methods, per-target
salts, rate caps, a rule without mirrors, the kill switch) and request
sequences on a clock (rule ids Envoy names, known and unknown), traces each
request and then serves it at the same instant: the trace names the sampled
targets serving answers with, and its outcomes, summed, are the serving
counts. The rule and the fraction decisions are also held to the plain
reference (tests/support/decision.py)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from hypothesis import event, given, settings
from hypothesis import strategies as st

from extproc.core.explain import explain, render_text
from extproc.core.keys import parse_key_chain
from extproc.core.matching import Match, PathMatch, PathType
from extproc.core.plan import Plan, RateCap
from extproc.core.policy import BackendRef, MirrorTarget, Outcome, Policy, Route, Rule
from extproc.core.sampling import Fraction
from extproc.core.slots import SlotHeaders
from extproc.core.trace import CapState
from tests.support.decision import reference_outcomes, reference_rule


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Counters:
    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str, Outcome]] = Counter()

    def decision_counter(self, rule: str, target: str, outcome: Outcome) -> Callable[[], None]:
        def inc() -> None:
            self.counts[(rule, target, outcome)] += 1

        return inc


PATHS = [b"/", b"/api", b"/api/v1", b"/exact", b"/exact/no", b"/plain"]
CAPS = [None, 0.5, 1.0, 2.5]

fractions = st.sampled_from([Fraction(0), Fraction(30), Fraction(50), Fraction(7, 9), Fraction(100), Fraction(100)])
salts = st.sampled_from([None, None, b"", b"own", b"\x00\xff"])
methods = st.sampled_from([frozenset(), frozenset(), frozenset({"GET"}), frozenset({"POST", "PUT"})])


@st.composite
def rules(draw: st.DrawFn, index: int, match: Match) -> Rule:
    n = draw(st.integers(1, 3))
    mirrors = tuple(MirrorTarget(f"m{index}{i}", draw(fractions), i, salt=draw(salts)) for i in range(n))
    cap = draw(st.sampled_from(CAPS))
    return Rule(f"ns/r/{index}", (match,), mirrors, (BackendRef("web"),), methods=draw(methods), max_mirrors_per_second=cap)


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    matched = (
        draw(rules(0, Match(PathMatch(PathType.EXACT, "/exact")))),
        draw(rules(1, Match(PathMatch(PathType.PREFIX, "/api")))),
        # A rule without a RequestMirror filter: nothing to decide, nothing counted.
        Rule("ns/r/2", (Match(PathMatch(PathType.PREFIX, "/plain")),), (), (BackendRef("web"),)),
        draw(rules(3, Match())),
    )
    chain = draw(st.sampled_from(["header:x-request-id", "cookie:session,header:x-request-id", "header:host,header:x-request-id"]))
    return Policy(
        (Route("ns", "r", (), matched),),
        parse_key_chain(chain),
        salt=draw(st.sampled_from([b"", b"v2"])),
        slot_headers=SlotHeaders(count=3),
        enabled=draw(st.sampled_from([True, True, True, False])),  # the kill switch, now and then
    )


@st.composite
def requests(draw: st.DrawFn) -> tuple[dict[str, bytes], str | None, float]:
    headers = {":path": draw(st.sampled_from(PATHS)), ":method": draw(st.sampled_from([b"GET", b"POST", b"PUT"])), ":authority": b"h"}
    key = draw(st.sampled_from([None, b"", b"alice", b"bob", b"user-123"]) | st.binary(min_size=1, max_size=12))
    if key is not None:
        headers["x-request-id"] = key
    if draw(st.booleans()):
        headers["cookie"] = b"session=" + draw(st.sampled_from([b"s1", b"s2", b""]))
    rule_id = draw(st.sampled_from([None, None, "ns/r/0", "ns/r/1", "ns/r/2", "ns/r/3", "no/such/rule", ""]))
    # Often the same instant (a burst on one bucket), sometimes a refill.
    elapsed = draw(st.sampled_from([0.0, 0.0, 0.0, 0.0, 0.1, 0.4, 1.0, 3.0]))
    return headers, rule_id, elapsed


@settings(max_examples=300, deadline=None)
@given(policy=policies(), sequence=st.lists(requests(), min_size=1, max_size=40))
def test_trace_outcomes_are_the_serving_counts(policy: Policy, sequence: list[tuple[dict[str, bytes], str | None, float]]) -> None:
    clock, counters = Clock(), Counters()
    plan = Plan(policy, counters, clock)
    traced: Counter[tuple[str, str, Outcome]] = Counter()
    for headers, rule_id, elapsed in sequence:
        clock.now += elapsed
        trace = plan.trace(headers, rule_id=rule_id)
        assert plan.trace(headers, rule_id=rule_id) == trace  # a trace takes no token
        assert plan.sampled(headers, rule_id=rule_id) == tuple((t.slot, t.backend) for t in trace.sampled)
        # The rule: the one Envoy names when the policy has it, else the sampler's own matching.
        assert trace.rule is reference_rule(policy, headers, rule_id)
        assert trace.named_by_envoy is (rule_id in policy.rules_by_id)
        # The fraction decisions are the reference's; a cap only turns a mirror into capped.
        reference = reference_outcomes(policy, headers, rule_id)
        assert [t.target for t in trace.targets] == [t for t, _ in reference]
        for t, (_, want) in zip(trace.targets, reference, strict=True):
            assert trace.rule is not None
            # The cap is read wherever a key was hashed, and only for a rule that has one.
            assert (t.cap is not None) is (t.u is not None and trace.rule.max_mirrors_per_second is not None)
            if t.outcome is Outcome.CAPPED:
                assert want is Outcome.MIRRORED and t.cap is not None and t.cap.tokens < 1.0
            else:
                assert t.outcome is want
                assert t.outcome is not Outcome.MIRRORED or t.cap is None or t.cap.tokens >= 1.0
            traced[(trace.rule.id, t.target.backend, t.outcome)] += 1
            event(f"outcome {t.outcome}")
        event(f"rule named by Envoy: {trace.named_by_envoy}")
    assert counters.counts == traced


def capped_policy(rate: float) -> Policy:
    rule = Rule("ns/r/0", (Match(),), (MirrorTarget("shadow", Fraction(100), 0),), (BackendRef("web"),), max_mirrors_per_second=rate)
    return Policy((Route("ns", "r", (), (rule,)),), parse_key_chain("header:x-request-id"))


REQUEST = {":path": b"/", "x-request-id": b"alice"}


def test_trace_reads_the_cap_at_the_clock_and_takes_nothing() -> None:
    clock = Clock()
    plan = Plan(capped_policy(2.0), Counters(), clock)
    # However often explained, the bucket stays full...
    for _ in range(10):
        (t,) = plan.trace(REQUEST).targets
        assert (t.outcome, t.cap) == (Outcome.MIRRORED, CapState(2.0, 2.0))
    # ... so serving still gets its two a second.
    assert [bool(plan.sampled(REQUEST)) for _ in range(3)] == [True, True, False]
    (t,) = plan.trace(REQUEST).targets
    assert (t.outcome, t.cap) == (Outcome.CAPPED, CapState(2.0, 0.0))
    # At a later instant, given or read from the plan's clock, the bucket has refilled.
    (later,) = plan.trace(REQUEST, now=clock.now + 0.5).targets
    assert (later.outcome, later.cap) == (Outcome.MIRRORED, CapState(2.0, 1.0))
    clock.now += 0.25
    (t,) = plan.trace(REQUEST).targets
    assert (t.outcome, t.cap) == (Outcome.CAPPED, CapState(2.0, 0.5))
    assert plan.sampled(REQUEST) == ()  # serving agrees: half a token is none


def test_a_skipped_or_blocked_target_shows_its_cap_but_takes_nothing() -> None:
    rule = Rule(
        "ns/r/0",
        (Match(),),
        (MirrorTarget("shadow", Fraction(0), 0),),
        (BackendRef("web"),),
        methods=frozenset({"GET"}),
        max_mirrors_per_second=1.0,
    )
    plan = Plan(Policy((Route("ns", "r", (), (rule,)),), parse_key_chain("header:x-request-id")), Counters(), Clock())
    (skipped,) = plan.trace(REQUEST).targets
    assert (skipped.outcome, skipped.cap) == (Outcome.SKIPPED, CapState(1.0, 1.0))
    (blocked,) = plan.trace({**REQUEST, ":method": b"POST"}).targets
    assert (blocked.outcome, blocked.cap, blocked.u) == (Outcome.METHOD, None, None)


def test_explain_shows_the_cap_and_what_it_would_do() -> None:
    clock = Clock()
    plan = Plan(capped_policy(3.0), Counters(), clock)
    fresh = explain(plan, REQUEST)
    assert fresh["targets"][0]["cap"] == {"per_second": 3.0, "tokens": 3.0}
    assert fresh["targets"][0]["decision"] == "mirrored"
    assert "cap 3/s (3 tokens now): mirrored" in render_text(fresh)
    for _ in range(3):
        plan.sampled(REQUEST)
    drained = explain(plan, REQUEST)
    assert drained["targets"][0]["decision"] == "capped"
    assert "cap 3/s (0 tokens now): capped" in render_text(drained)
    assert explain(plan, REQUEST, now=clock.now + 1)["targets"][0]["decision"] == "mirrored"
    # A policy given to explain is compiled afresh: its buckets are full.
    assert explain(capped_policy(3.0), REQUEST)["targets"][0]["decision"] == "mirrored"
    assert explain(capped_policy(3.0), REQUEST)["targets"][0]["cap"] == {"per_second": 3.0, "tokens": 3.0}


def test_explain_shows_the_rule_envoy_names() -> None:
    web = (BackendRef("web"),)
    first = Rule("ns/r/0", (Match(PathMatch(PathType.PREFIX, "/a")),), (MirrorTarget("m0", Fraction(100), 0),), web)
    second = Rule("ns/r/1", (Match(),), (MirrorTarget("m1", Fraction(0), 0),), web)
    policy = Policy((Route("ns", "r", (), (first, second)),), parse_key_chain("header:x-request-id"))
    matched = explain(policy, {":path": b"/b", "x-request-id": b"k"})
    assert (matched["rule"], matched["named_by_envoy"], matched["targets"][0]["decision"]) == ("ns/r/1", False, "skipped")
    named = explain(policy, {":path": b"/b", "x-request-id": b"k"}, rule_id="ns/r/0")
    assert (named["rule"], named["named_by_envoy"], named["targets"][0]["decision"]) == ("ns/r/0", True, "mirrored")
    assert render_text(named).startswith("rule: ns/r/0 (named by Envoy)\n")
    unknown = explain(policy, {":path": b"/b", "x-request-id": b"k"}, rule_id="no/such/rule")
    assert (unknown["rule"], unknown["named_by_envoy"]) == ("ns/r/1", False)


def test_rate_cap_state_is_the_buckets() -> None:
    clock = Clock()
    cap = RateCap(4.0, clock)
    assert cap.state(clock.now) == CapState(4.0, 4.0)
    assert all(cap.take() for _ in range(4)) and not cap.take()
    assert cap.state(clock.now + 0.5) == CapState(4.0, 2.0)
    assert cap.state(clock.now + 5) == CapState(4.0, 4.0)  # never more than a second's worth
    assert cap.state(clock.now) == CapState(4.0, 0.0)  # reading moved nothing
