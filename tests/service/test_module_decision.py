"""The dynamic module's C decision against the Python one, bit for bit, and its
parsers on valid, malformed and hostile input, under AddressSanitizer and UBSan.

Compiles C (tests/support/module_harness.py), hence a service test, not a unit test."""

from __future__ import annotations

import json
import random
import resource
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mmh3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.core.headers import header_map
from extproc.core.keys import extract_key, parse_key_chain
from extproc.core.matching import Match
from extproc.core.plan import Plan
from extproc.core.policy import BackendRef, MirrorTarget, Policy, Route, Rule
from extproc.core.ratelimit import TokenBucket
from extproc.core.sampling import Fraction
from extproc.core.slots import SlotHeaders
from extproc.envoy.module import filter_settings, rule_settings, to_json
from tests.support.module_harness import ModuleDriver, build_driver, running

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")

SHARED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def driver_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_driver(tmp_path_factory.mktemp("module-driver"))


@pytest.fixture
def driver(driver_binary: Path) -> Iterator[ModuleDriver]:
    with running(driver_binary) as d:
        yield d


def policy_of(
    targets: list[tuple[str, Fraction, bytes | None]], *, chain: str = "header:x-request-id", salt: bytes = b"", **rule: Any
) -> Policy:
    mirrors = tuple(MirrorTarget(b, f, i, salt=s) for i, (b, f, s) in enumerate(targets))
    r = Rule("ns/r/0", (Match(),), mirrors, (BackendRef("web"),), **rule)
    return Policy((Route("ns", "r", (), (r,)),), parse_key_chain(chain), salt=salt, slot_headers=SlotHeaders(count=max(1, len(mirrors))))


# ---------------------------------------------------------------- the hash


def test_design_vectors(driver: ModuleDriver) -> None:
    assert driver.key_hash(b"", b"user-123") == 17646487862988728035
    assert driver.key_hash(b"", b"alice") == 3287336622105459802
    assert driver.key_hash(b"v2", b"alice") == 2539909752279064467


def test_hash_parity_on_every_tail_length(driver: ModuleDriver) -> None:
    rng = random.Random(16)
    for salt in (b"", b"v2", b"\x00s\xff", "sél".encode(), b"x" * 600):
        for n in [*range(0, 70), 511, 512, 513, 4096, 9000]:
            key = rng.randbytes(n)
            assert driver.key_hash(salt, key) == mmh3.hash64(salt + b"\0" + key, seed=0, x64arch=True, signed=False)[0], (salt, n)


@SHARED
@given(salt=st.binary(max_size=40), key=st.binary(max_size=5000))
def test_hash_parity_generated(driver: ModuleDriver, salt: bytes, key: bytes) -> None:
    assert driver.key_hash(salt, key) == mmh3.hash64(salt + b"\0" + key, seed=0, x64arch=True, signed=False)[0]


# ---------------------------------------------------------------- the key chain

CHAIN = "header:x-user,cookie:session,query:uid,traceparent,header:host,header:x-request-id"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
values = st.one_of(st.binary(max_size=12), st.sampled_from([b"", b" ", b"abc", b"\xff", b"a\tb "]))
cookies = st.one_of(
    st.sampled_from(
        [b"session=abc", b"session=", b" session = x ; a=b", b"xsession=1", b"a=b; session=\xff\xfe", b"session", b"session =x"]
    ),
    st.binary(max_size=20),
)
paths = st.one_of(
    st.sampled_from([b"/", b"/p?uid=7", b"/p?a=1&uid=&uid=2", b"/p?uid", b"/p?uid=1#frag", b"/p?x=1&uid=%41", b"/p#?uid=1"]),
    st.binary(max_size=30).map(lambda b: b"/" + b),
)
traceparents = st.one_of(
    st.sampled_from(
        [
            f"00-{TRACE}-00f067aa0ba902b7-01".encode(),
            f" 00-{TRACE}-00f067aa0ba902b7-01 ".encode(),
            f"00-{TRACE}-00f067aa0ba902b7-01-x".encode(),
            f"cc-{TRACE}-00f067aa0ba902b7-01-x".encode(),
            f"cc-{TRACE}-00f067aa0ba902b7-01-".encode(),
            f"cc-{TRACE}-00f067aa0ba902b7-01x".encode(),
            f"ff-{TRACE}-00f067aa0ba902b7-01".encode(),
            f"00-{'0' * 32}-00f067aa0ba902b7-01".encode(),
            f"00-{TRACE}-{'0' * 16}-01".encode(),
            f"00-{TRACE.upper()}-00f067aa0ba902b7-01".encode(),
        ]
    ),
    st.binary(max_size=60),
)
header_lists = st.lists(
    st.one_of(
        st.tuples(st.just(b"x-user"), values),
        st.tuples(st.just(b"cookie"), cookies),
        st.tuples(st.just(b":path"), paths),
        st.tuples(st.just(b"traceparent"), traceparents),
        st.tuples(st.sampled_from([b":authority", b"host"]), values),
        st.tuples(st.just(b"x-request-id"), values),
        st.tuples(st.just(b":method"), st.sampled_from([b"GET", b"POST", b"", b"get"])),
    ),
    max_size=8,
)


def service_view(pairs: list[tuple[bytes, bytes]]) -> dict[str, bytes]:
    """The sampler's view of the headers (first values, cookie headers joined)."""
    flat, _ = header_map((k.decode(), v) for k, v in pairs)
    return flat


@SHARED
@given(pairs=header_lists, chain=st.sampled_from([CHAIN, "cookie:session,header:cookie", "traceparent", "query:uid,header:x-request-id"]))
def test_key_chain_parity(driver: ModuleDriver, pairs: list[tuple[bytes, bytes]], chain: str) -> None:
    policy = policy_of([("shadow", Fraction(50), None)], chain=chain)
    driver.rule(rule_settings(policy, policy.rules[0]))
    found = extract_key(policy.key_chain, service_view(pairs))
    key, _ = driver.decide(pairs)
    assert key == (None if found is None else found[1])


# ---------------------------------------------------------------- the decision

fractions = st.one_of(
    st.sampled_from([Fraction(0), Fraction(100), Fraction(50), Fraction(1, 3), Fraction(999_999, 1_000_000), Fraction(1, 1_000_000)]),
    st.integers(1, 1000).flatmap(lambda d: st.builds(Fraction, st.integers(0, d), st.just(d))),
)
salts = st.one_of(st.none(), st.sampled_from([b"", b"b", b"\x00\xff\n\"'\\", "é".encode()]))
targets = st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]), fractions, salts), min_size=1, max_size=4)


@SHARED
@given(
    mirrors=targets,
    policy_salt=st.sampled_from([b"", b"v2", b"\x00s\xff"]),
    methods=st.sampled_from([frozenset(), frozenset({"GET"}), frozenset({"POST", "PUT"})]),
    enabled=st.booleans(),
    pairs=header_lists,
)
def test_decision_parity(
    driver: ModuleDriver,
    mirrors: list[tuple[str, Fraction, bytes | None]],
    policy_salt: bytes,
    methods: frozenset[str],
    enabled: bool,
    pairs: list[tuple[bytes, bytes]],
) -> None:
    mirrors = [(f"{b}{i}", f, s) for i, (b, f, s) in enumerate(mirrors)]
    base = policy_of(mirrors, chain=CHAIN, salt=policy_salt, methods=methods)
    policy = Policy(base.routes, base.key_chain, salt=policy_salt, slot_headers=base.slot_headers, enabled=enabled)
    rule = policy.rules[0]
    driver.rule(rule_settings(policy, rule))
    want = [t.outcome.value for t in Plan(policy).trace(service_view(pairs), rule_id=rule.id).targets]
    assert driver.decide(pairs)[1] == want


def test_decision_parity_on_many_fixed_keys(driver: ModuleDriver) -> None:
    """Exact counts: 5,000 keys, four targets with their own and shared salts."""
    policy = policy_of(
        [("a", Fraction(35), None), ("b", Fraction(50), b"b"), ("c", Fraction(1, 3), b"b"), ("d", Fraction(100), b"\x00\xff")], salt=b"v2"
    )
    rule = policy.rules[0]
    driver.rule(rule_settings(policy, rule))
    counts = [0] * 4
    plan = Plan(policy)
    for i in range(5000):
        headers = [(b"x-request-id", f"user-{i}".encode())]
        want = [t.outcome.value for t in plan.trace(service_view(headers), rule_id=rule.id).targets]
        got = driver.decide(headers)[1]
        assert got == want, i
        counts = [c + (o == "mirrored") for c, o in zip(counts, got, strict=True)]
    assert counts[3] == 5000 and 0 < counts[0] < counts[1] < 5000


# ---------------------------------------------------------------- the rate cap


def test_rate_cap_is_the_token_bucket(driver: ModuleDriver) -> None:
    """The shared (atomic) bucket takes what core.ratelimit.TokenBucket takes, on
    a clock where the two agree exactly (whole milliseconds, rates that divide)."""
    policy = policy_of([("a", Fraction(100), None), ("b", Fraction(100), None)], max_mirrors_per_second=4.0)
    driver.rule(rule_settings(policy, policy.rules[0]))
    buckets = [TokenBucket(4.0, 4.0, 0.0), TokenBucket(4.0, 4.0, 0.0)]
    times_ms = [0, 0, 0, 0, 0, 0, 100, 250, 250, 500, 500, 501, 1000, 3000, 3000, 3000, 3000, 3000, 3001]
    for t in times_ms:
        got = driver.decide([(b"x-request-id", b"k")], now_ns=t * 1_000_000 + 10**12)[1]
        want = ["mirrored" if b.take(t / 1000) else "capped" for b in buckets]
        assert got == want, t


# ---------------------------------------------------------------- configuration


def test_generated_settings_are_accepted(driver: ModuleDriver) -> None:
    policy = policy_of([("a", Fraction(35), None), ("b", Fraction(100), b"\x00")], chain=CHAIN, methods=frozenset({"GET"}))
    assert driver.filter_config(to_json(filter_settings(policy)).encode()) == "ok"
    assert driver.rule_config(to_json(rule_settings(policy, policy.rules[0])).encode()) == "ok"


GOOD_RULE: dict[str, Any] = {
    "rule": "ns/r/0",
    "enabled": True,
    "methods": [],
    "key_chain": [{"kind": "header", "name": "x-request-id"}],
    "max_mirrors_per_second": None,
    "targets": [{"slot": "x-mirror-cluster-0", "cluster": "shadow", "salt_hex": "", "threshold": str(2**63)}],
}


def with_change(path: list[str | int], value: Any) -> bytes:
    data = json.loads(json.dumps(GOOD_RULE))
    node = data
    for step in path[:-1]:
        node = node[step]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b"[]", "rule: expected an object"),
        (b'{"rule": "x"} x', "trailing data"),
        (b"[" * 5000, "nested too deeply"),
        (with_change(["enabled"], "yes"), "rule.enabled"),
        (with_change(["enabled"], KeyError), "rule.enabled: missing"),
        (with_change(["colour"], 1), "rule.colour: unknown"),
        # A message is one line (Envoy's log, the driver's protocol), whatever a key holds.
        (with_change(["col\nour"], 1), "rule.col?our: unknown"),
        (with_change(["methods"], "GET"), "rule.methods"),
        (with_change(["key_chain"], []), "rule.key_chain"),
        (with_change(["key_chain", 0, "kind"], "body"), "rule.key_chain[0].kind"),
        (with_change(["key_chain", 0, "name"], "X-Upper"), "rule.key_chain[0].name"),
        (with_change(["key_chain", 0, "name"], ""), "rule.key_chain[0].name"),
        (with_change(["max_mirrors_per_second"], 0), "rule.max_mirrors_per_second"),
        (with_change(["max_mirrors_per_second"], -1), "rule.max_mirrors_per_second"),
        (with_change(["max_mirrors_per_second"], "5"), "rule.max_mirrors_per_second"),
        # Below the floor the bucket's interval overflowed its uint64_t, and the cap was off.
        (with_change(["max_mirrors_per_second"], 1e-11), "rule.max_mirrors_per_second"),
        (with_change(["max_mirrors_per_second"], 5e-324), "rule.max_mirrors_per_second"),
        (with_change(["targets", 0, "threshold"], str(2**64 + 1)), "rule.targets[0].threshold"),
        (with_change(["targets", 0, "threshold"], str(10**20)), "rule.targets[0].threshold"),
        (with_change(["targets", 0, "threshold"], "1.5"), "rule.targets[0].threshold"),
        (with_change(["targets", 0, "threshold"], "-1"), "rule.targets[0].threshold"),
        (with_change(["targets", 0, "threshold"], "007"), "rule.targets[0].threshold"),
        (with_change(["targets", 0, "threshold"], ""), "rule.targets[0].threshold"),
        (with_change(["targets", 0, "threshold"], 5), "rule.targets[0].threshold"),
        (with_change(["targets", 0, "salt_hex"], "abc"), "rule.targets[0].salt_hex"),
        (with_change(["targets", 0, "salt_hex"], "zz"), "rule.targets[0].salt_hex"),
        (with_change(["targets", 0, "slot"], "bad header"), "rule.targets[0].slot"),
        (with_change(["targets", 0, "cluster"], ""), "rule.targets[0].cluster"),
        (with_change(["targets"], [GOOD_RULE["targets"][0]] * 9), "rule.targets"),
        (with_change(["rule"], "a\u0000b"), "rule.rule"),
    ],
)
def test_malformed_rule_config_is_refused_with_the_field(driver: ModuleDriver, text: bytes, message: str) -> None:
    answer = driver.rule_config(text)
    assert answer.startswith("error ") and message in answer, answer


def test_edge_values_are_accepted(driver: ModuleDriver) -> None:
    every = {**GOOD_RULE, "targets": [{**GOOD_RULE["targets"][0], "threshold": str(2**64)}]}
    driver.rule({**every, "max_mirrors_per_second": 0.000001})  # the floor: one mirror in 11.6 days
    assert [driver.decide([(b"x-request-id", b"k")], now_ns=t)[1] for t in (0, 10**15 - 1, 10**15)] == [
        ["mirrored"],
        ["capped"],
        ["mirrored"],
    ]
    assert driver.rule_config(with_change(["targets", 0, "threshold"], str(2**64))) == "ok"
    assert driver.decide([(b"x-request-id", b"k")])[1] == ["mirrored"]
    assert driver.rule_config(with_change(["targets", 0, "threshold"], "0")) == "ok"
    assert driver.decide([(b"x-request-id", b"k")])[1] == ["skipped"]
    assert driver.rule_config(with_change(["targets"], [])) == "ok"
    assert driver.decide([(b"x-request-id", b"k")])[1] == []


def test_a_filter_config_may_carry_a_rule(driver: ModuleDriver) -> None:
    """Envoy Gateway gives each route its own filter config, and no per-route config:
    the rule travels in the filter config there."""
    headers = {"slot_headers": ["x-mirror-cluster-0"], "marker_header": "x-mirror-rule"}
    assert driver.filter_config(json.dumps({**headers, "rule": GOOD_RULE}).encode()) == "ok"
    broken = json.loads(with_change(["targets", 0, "cluster"], ""))
    answer = driver.filter_config(json.dumps({**headers, "rule": broken}).encode())
    assert answer.startswith("error rule.targets[0].cluster"), answer


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b'{"slot_headers": [], "marker_header": "x-mirror-rule"}', "filter.slot_headers"),
        (b'{"slot_headers": ["x-a"]}', "filter.marker_header: missing"),
        (b'{"slot_headers": ["X-A"], "marker_header": "x-mirror-rule"}', "filter.slot_headers[0]"),
        (b'{"slot_headers": ["x-a"], "marker_header": 1}', "filter.marker_header"),
        (b'{"slot_headers": ["x-a"], "marker_header": "m", "marker_header": "m"}', "repeated"),
    ],
)
def test_malformed_filter_config_is_refused_with_the_field(driver: ModuleDriver, text: bytes, message: str) -> None:
    answer = driver.filter_config(text)
    assert answer.startswith("error ") and message in answer, answer


HEADERS: dict[str, Any] = {"slot_headers": ["x-mirror-cluster-0"], "marker_header": "x-mirror-rule"}


@pytest.mark.parametrize(
    ("counted", "message"),
    [
        ({}, "filter.counted: expected a list"),
        ([{"rule": "r"}], "filter.counted[0].clusters: missing"),
        ([{"rule": "r", "clusters": []}], "filter.counted[0].clusters"),
        ([{"rule": "r", "clusters": "c"}], "filter.counted[0].clusters"),
        ([{"rule": "", "clusters": ["c"]}], "filter.counted[0].rule"),
        ([{"rule": "r", "clusters": ["c", 7]}], "filter.counted[0].clusters[1]"),
        ([{"rule": "r", "clusters": ["c"], "colour": 1}], "filter.counted[0].colour: unknown"),
        ([{"rule": "r", "clusters": ["c"]}, {"rule": "r", "clusters": ["d", "c"]}], "filter.counted[1].clusters[1]: repeated"),
        ([{"rule": "r", "clusters": [f"c{i}" for i in range(4097)]}], "more than 4096"),
    ],
)
def test_malformed_counted_pairs_are_refused_with_the_field(driver: ModuleDriver, counted: Any, message: str) -> None:
    answer = driver.filter_config(json.dumps({**HEADERS, "counted": counted}).encode())
    assert answer.startswith("error ") and message in answer, answer


names = st.text(st.characters(min_codepoint=1, max_codepoint=0x2FF), min_size=1, max_size=12)


@SHARED
@given(
    pairs=st.lists(st.tuples(st.sampled_from(["r", "ns/r/0", "ns/r/1"]), names), max_size=40, unique=True),
    rule_id=st.sampled_from(["r", "ns/r/0", "ns/r/1", "ns/other/0"]),
    clusters=st.lists(names, min_size=1, max_size=8),
)
def test_counted_lookup_finds_each_rule_target_pair(
    driver: ModuleDriver, pairs: list[tuple[str, str]], rule_id: str, clusters: list[str]
) -> None:
    """The counters a target increments are those of its own (rule, cluster) pair, or
    none (-1: the labelled counter); pairs laid out in filter order, rule by rule."""
    by_rule: dict[str, list[str]] = {}
    for rule, cluster in pairs:
        by_rule.setdefault(rule, []).append(cluster)
    counted = [{"rule": rule, "clusters": cs} for rule, cs in by_rule.items()]
    assert driver.filter_config(json.dumps({**HEADERS, "counted": counted}).encode()) == "ok"
    order = [(c["rule"], cluster) for c in counted for cluster in c["clusters"]]
    targets = [{**GOOD_RULE["targets"][0], "cluster": c} for c in clusters]
    driver.rule({**GOOD_RULE, "rule": rule_id, "targets": targets})
    want = [order.index((rule_id, c)) if (rule_id, c) in order else -1 for c in clusters]
    assert driver.counted_indexes() == want


json_leaves = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=20))
json_values = st.recursive(
    json_leaves, lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5))
)


@SHARED
@given(text=st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode())))
def test_hostile_config_never_crashes(driver: ModuleDriver, text: bytes) -> None:
    assert driver.rule_config(text).startswith(("ok", "error "))
    assert driver.filter_config(text).startswith(("ok", "error "))


@SHARED
@given(
    rule=st.fixed_dictionaries({k: json_values for k in GOOD_RULE}).map(lambda d: json.dumps(d).encode()),
)
def test_hostile_fields_never_crash(driver: ModuleDriver, rule: bytes) -> None:
    assert driver.rule_config(rule).startswith(("ok", "error "))


@SHARED
@given(counted=json_values.map(lambda v: json.dumps({**HEADERS, "counted": v}).encode()))
def test_hostile_counted_pairs_never_crash(driver: ModuleDriver, counted: bytes) -> None:
    assert driver.filter_config(counted).startswith(("ok", "error "))


def test_hostile_headers_never_crash(driver: ModuleDriver) -> None:
    """Huge, empty, NUL, invalid UTF-8 and thousands of cookies, through every key source."""
    policy = policy_of([("a", Fraction(50), None)], chain=CHAIN)
    driver.rule(rule_settings(policy, policy.rules[0]))
    many_cookies = [(b"cookie", f"c{i}=v{i}".encode()) for i in range(3000)] + [(b"cookie", b"session=last")]
    cases = [
        [],
        [(b"x-user", b"\x00" * 10)],
        [(b"x-user", b"\xff\xfe\xfd" * 100_000)],
        many_cookies,
        [(b"cookie", b";" * 100_000 + b"session=x")],
        [(b":path", b"/?" + b"&" * 100_000 + b"uid=1")],
        [(b"traceparent", b"00-" + b"a" * 100_000)],
        [(b":authority", b""), (b"host", b"h")],
    ]
    for pairs in cases:
        key, outcomes = driver.decide(pairs)
        assert key == (lambda f: None if f is None else f[1])(extract_key(policy.key_chain, service_view(pairs)))
        assert len(outcomes) == 1


@pytest.mark.parametrize(("chain", "header"), [("cookie:sé", (b"cookie", "sé=1".encode())), ("query:sé", (b":path", "/?sé=1".encode()))])
def test_key_source_names_travel_as_utf8(driver: ModuleDriver, chain: str, header: tuple[bytes, bytes]) -> None:
    source = parse_key_chain(chain)[0]
    policy = policy_of([("a", Fraction(100), None)], chain=str(source))
    driver.rule(rule_settings(policy, policy.rules[0]))
    assert driver.decide([header])[0] == b"1"


def test_the_module_takes_every_key_chain_the_sampler_accepts_and_no_more(driver: ModuleDriver) -> None:
    """keys.MAX_NAME_BYTES and keys.MAX_CHAIN are the module's bounds: a chain the
    sampler accepts at its limits the module accepts and reads alike; one past a
    limit, which the sampler refuses at start-up, the module refuses too."""
    longest = {"header": "h" * 256, "cookie": "c" * 256, "query": "é" * 128}
    fill = [f"header:x-{i}" for i in range(12)]
    chain = ",".join([*fill, *(f"{kind}:{name}" for kind, name in longest.items()), "traceparent"])
    assert len(parse_key_chain(chain)) == 16
    policy = policy_of([("a", Fraction(100), None)], chain=chain)
    settings = rule_settings(policy, policy.rules[0])
    driver.rule(settings)
    for pairs in (
        [(b"h" * 256, b"1")],
        [(b"cookie", b"c" * 256 + b"=2")],
        [(b":path", b"/?" + ("é" * 128).encode() + b"=3")],
    ):
        found = extract_key(policy.key_chain, service_view(pairs))
        assert found is not None and driver.decide(pairs)[0] == found[1]
    for kind, name in longest.items():
        too_long = name + name[-1]
        with pytest.raises(ValueError, match="longer than 256 bytes"):
            parse_key_chain(f"{kind}:{too_long}")
        index = next(i for i, s in enumerate(settings["key_chain"]) if s["kind"] == kind)
        answer = driver.rule_config(
            to_json({**settings, "key_chain": [*settings["key_chain"][:index], {"kind": kind, "name": too_long}]}).encode()
        )
        assert answer.startswith(f"error rule.key_chain[{index}].name"), answer
    with pytest.raises(ValueError, match="at most 16"):
        parse_key_chain(chain + ",header:x-extra")
    answer = driver.rule_config(
        to_json({**settings, "key_chain": [*settings["key_chain"], {"kind": "header", "name": "x-extra"}]}).encode()
    )
    assert answer.startswith("error rule.key_chain"), answer


def test_the_largest_filter_config_parses_within_a_small_address_space(tmp_path: Path) -> None:
    """json.c reserved, for each string, the whole rest of the document: the
    largest filter configuration (4096 counted pairs, 450 KB) took 3.6 GB of
    address space, and was refused wherever that is limited."""
    binary = build_driver(tmp_path, sanitized=False)
    counted = [
        {"rule": f"default/route-{i:04}/mirror-rule-name", "clusters": [f"mirror-cluster-{i:04}.namespace.svc.cluster.local"]}
        for i in range(4096)
    ]
    text = json.dumps({"slot_headers": ["x-s"], "marker_header": "x-m", "counted": counted}).encode()

    def small_address_space() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (256 << 20, 256 << 20))

    driver = ModuleDriver(binary, small_address_space)
    try:
        assert driver.filter_config(text) == "ok"
    finally:
        driver.end()
