"""explain for one request and in bulk: the same dict as the decision
function gives, one result per input line, clear errors for bad lines."""

from __future__ import annotations

import json
from typing import Any

import pytest

from extproc.config.build import build_policy
from extproc.config.settings import Settings
from extproc.core.explain import BulkInputError, explain, explain_bulk, render_line, request_headers
from extproc.core.keys import DEFAULT_KEY_CHAIN, parse_key_chain
from extproc.core.matching import Entry, Match, RequestView, ValueMatch, ValueType
from extproc.core.plan import Plan
from extproc.core.policy import BackendRef, MirrorTarget, Policy, Route, Rule
from extproc.core.sampling import Fraction, decide, key_hash
from tests.support.paths import CONFORMANCE

MULTI_PATH = "/percent-multi-mirror-and-modify-headers"
MULTI_RULE = "gateway-conformance-infra/request-percentage-mirror/2"


def conformance(**env: str) -> Policy:
    return build_policy(Settings.load({"MIRROR_CONFIG": str(CONFORMANCE), **env}), CONFORMANCE.read_text())


def outcome(mirrored: bool) -> str:
    return "mirrored" if mirrored else "skipped"


KEYS = [f"req-{i:05d}-{(i * 7919) % 10007:x}" for i in range(10_000)]


@pytest.mark.parametrize(
    "env",
    [
        {"MIRROR_BACKEND": "shadow", "MIRROR_FRACTION": "37/100"},
        {"MIRROR_BACKEND": "shadow", "MIRROR_FRACTION": "5/1000", "MIRROR_SALT": "v2"},
    ],
)
def test_bulk_keys_decide_like_the_decision_function(env: dict[str, str]) -> None:
    policy = build_policy(Settings.load(env))
    salt = env.get("MIRROR_SALT", "").encode()
    fraction = Fraction(*map(int, env["MIRROR_FRACTION"].split("/")))
    results = list(explain_bulk(policy, (k + "\n" for k in KEYS)))
    assert len(results) == len(KEYS)
    mirrored = 0
    for key, result in zip(KEYS, results, strict=True):
        want = decide(salt, key.encode(), fraction)
        assert result["key"] == key and result["u"] == key_hash(salt, key.encode())
        assert [t["decision"] for t in result["targets"]] == [outcome(want)], key
        assert render_line(result) == f"{key}\tsimple\tshadow={outcome(want)}"
        mirrored += want
    assert 0 < mirrored < len(KEYS)


def test_bulk_keys_on_a_path_with_two_targets() -> None:
    policy = conformance()
    results = explain_bulk(policy, KEYS, path=MULTI_PATH + "/x?a=1", host="gw.example", method="POST")
    for key, result in zip(KEYS, results, strict=True):
        v2, v3 = decide(b"", key.encode(), Fraction(35)), decide(b"", key.encode(), Fraction(50))
        assert render_line(result) == f"{key}\t{MULTI_RULE}\tinfra-backend-v2={outcome(v2)},infra-backend-v3={outcome(v3)}"


def test_bulk_result_is_what_explain_gives_for_the_same_request() -> None:
    policy = conformance(MIRROR_SALT="s")
    lines = KEYS[:200]
    for key, result in zip(lines, explain_bulk(policy, lines, path="/percent-mirror"), strict=True):
        assert result == explain(policy, request_headers([("x-request-id", key)], path="/percent-mirror"))


def test_bulk_matches_once_per_request_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = conformance()
    lookups: list[RequestView] = []
    lookup = policy.table.lookup

    def counting(request: RequestView) -> Entry[Rule] | None:
        lookups.append(request)
        return lookup(request)

    monkeypatch.setattr(policy.table, "lookup", counting)
    assert sum(1 for _ in explain_bulk(policy, KEYS[:1000], path="/percent-mirror")) == 1000
    assert len(lookups) == 1
    lines = [json.dumps({"key": k, "path": p}) for k in KEYS[:100] for p in ("/percent-mirror", "/elsewhere")]
    assert sum(1 for _ in explain_bulk(policy, lines)) == 200
    assert len(lookups) == 3


def test_bulk_matching_reads_the_key_when_a_rule_matches_on_it() -> None:
    """The match cache must not hide a rule that matches the key header itself."""
    only_a = Match(headers=(ValueMatch("x-request-id", "a.*", ValueType.REGEX),))
    rule = Rule("ns/r/0", (only_a,), (MirrorTarget("shadow", Fraction(50), 0),), (BackendRef("web"),))
    policy = Policy((Route("ns", "r", (), (rule,)),), DEFAULT_KEY_CHAIN)
    keys = ["alice", "bob", "anna", "carl"] * 3
    rules = [r["rule"] for r in explain_bulk(policy, keys)]
    assert rules == ["ns/r/0", None, "ns/r/0", None] * 3


def test_json_lines_with_headers_cookies_path_host_and_method() -> None:
    policy = conformance(MIRROR_KEY="cookie:session,query:uid,header:x-request-id", MIRROR_SALT="v2")
    requests: list[dict[str, Any]] = [
        {"cookies": {"session": "alice", "other": "x"}, "headers": {"X-Request-Id": "bob"}, "path": MULTI_PATH},
        {"headers": {"x-request-id": "bob"}, "path": "/percent-mirror?uid=carol", "host": "h.example", "method": "post"},
        {"headers": {"x-request-id": "bob"}, "path": "/percent-mirror-fraction"},
        {"path": "/percent-mirror"},
        {"headers": {"x-request-id": "bob"}, "path": "/nowhere"},
        {},
    ]
    results = list(explain_bulk(policy, [json.dumps(r) for r in requests], host="default.example"))
    assert [(r["key_source"], r["key"]) for r in results] == [
        ("cookie:session", "alice"),
        ("query:uid", "carol"),
        ("header:x-request-id", "bob"),
        (None, None),
        (None, None),  # no rule: no key is looked for
        (None, None),
    ]
    for request, result in zip(requests, results, strict=True):
        headers = request_headers(
            list(request.get("headers", {}).items()),
            list(request.get("cookies", {}).items()),
            request.get("path", "/"),
            request.get("host", "default.example"),
            request.get("method", "GET"),
        )
        assert result == explain(policy, headers)
    assert results[0]["targets"][0]["decision"] == outcome(decide(b"v2", b"alice", Fraction(35)))
    assert results[3]["targets"][0]["decision"] == "no_key"
    assert results[4]["rule"] is None and render_line(results[4]) == "-\t-\t-"
    assert render_line(results[3]) == "-\tgateway-conformance-infra/request-percentage-mirror/0\tinfra-backend-v2=no_key"


@pytest.mark.parametrize(
    "chain,key",
    [
        ("header:x-user", "alice"),
        ("cookie:session", "alice"),
        ("query:uid", "alice"),
        ("traceparent", "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("header:host", "alice.example"),
    ],
)
def test_a_key_goes_where_the_first_key_source_reads_it(chain: str, key: str) -> None:
    policy = build_policy(Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "50", "MIRROR_KEY": f"{chain},header:x-request-id"}))
    lines = [key, json.dumps({"key": key, "headers": {"x-request-id": "other"}, "cookies": {"session": "other"}, "path": "/p?uid=other"})]
    for result in explain_bulk(policy, lines, path="/p?x=1"):
        assert (result["key_source"], result["key"]) == (chain, key)
        assert result["targets"][0]["decision"] == outcome(decide(b"", key.encode(), Fraction(50)))


@pytest.mark.parametrize(
    "chain,key,problem",
    [
        ("cookie:session", "a;b", "cannot travel in cookie session"),
        ("query:uid", "a&b", "cannot travel in query parameter uid"),
        ("traceparent", "not-a-trace-id", "is not a trace id"),
    ],
)
def test_a_key_the_first_source_cannot_carry_is_an_error(chain: str, key: str, problem: str) -> None:
    policy = build_policy(Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_KEY": chain}))
    with pytest.raises(BulkInputError, match=f"^line 2: .*{problem}"):
        list(explain_bulk(policy, ["fine" if chain != "traceparent" else "4bf92f3577b34da6a3ce929d0e0e4736", key]))


@pytest.mark.parametrize(
    "line,problem",
    [
        ('{"headers": {"x-request-id": "a"}', "invalid JSON"),
        ("{not json}", "invalid JSON"),
        ('{"header": {"x-request-id": "a"}}', "unknown field 'header'; allowed: key, headers, cookies, path, host, method"),
        ('{"headers": {"x-request-id": 1}}', "headers must be an object of strings"),
        ('{"cookies": ["a=b"]}', "cookies must be an object of strings"),
        ('{"path": 7}', "path must be a string"),
        ('{"headers": {":path": "/x"}}', "give path, host and method as fields of their own"),
        ('{"key": ' + "[" * 3000, "invalid JSON: nested too deeply"),
        ('{"key": "a", "headers": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}}", "invalid JSON: nested too deeply"),
    ],
)
def test_a_malformed_json_line_is_an_error_naming_its_line(line: str, problem: str) -> None:
    """The error is an exception (BulkInputError, a ValueError) raised at the
    bad line, after the results of the lines before it."""
    policy = build_policy(Settings.load({"MIRROR_BACKEND": "shadow"}))
    seen = []
    with pytest.raises(BulkInputError) as info:
        for result in explain_bulk(policy, ["k1", "", json.dumps({"key": "k2"}), line, "k3"]):
            seen.append(result["key"])
    assert info.value.line == 4
    assert str(info.value).startswith("line 4: ") and problem in str(info.value)
    assert seen == ["k1", "k2"]


def test_line_ends_and_bytes_input() -> None:
    policy = build_policy(Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "50"}))
    results = list(explain_bulk(policy, [b"a\r\n", b"\n", b"\xff\xferaw\n", "b"]))
    assert [r["key"] for r in results] == ["a", "\\xff\\xferaw", "b"]
    assert results[1]["u"] == key_hash(b"", b"\xff\xferaw")  # the raw bytes are hashed, not their escape


def test_render_line_is_one_line() -> None:
    policy = build_policy(Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "100"}))
    (result,) = explain_bulk(policy, [json.dumps({"key": "a\tb\u2028c"})])
    line = render_line(result)
    assert line == "a\\tb\\u2028c\tsimple\tshadow=mirrored"
    assert len(line.splitlines()) == 1 and line.count("\t") == 2


def test_headers_and_cookies_given_for_every_line() -> None:
    """The caller's headers and cookies (the CLI's --header/--cookie) apply to
    every line; a JSON line's own header or cookie of the same name wins."""
    canary = Match(headers=(ValueMatch("x-env", "canary"),))
    rule = Rule("ns/r/0", (canary,), (MirrorTarget("shadow", Fraction(50), 0),), (BackendRef("web"),))
    policy = Policy((Route("ns", "r", (), (rule,)),), parse_key_chain("cookie:session,header:x-request-id"))
    lines = [
        "alice",
        json.dumps({"headers": {"x-request-id": "bob"}}),
        json.dumps({"cookies": {"session": "carol"}, "headers": {"x-env": "prod"}}),
        json.dumps({"cookies": {"session": "dave"}}),
    ]
    results = list(explain_bulk(policy, lines, headers=[("x-env", "canary")], cookies=[("session", "default"), ("other", "x")]))
    assert [(r["rule"], r["key"]) for r in results] == [("ns/r/0", "alice"), ("ns/r/0", "default"), (None, None), ("ns/r/0", "dave")]


def test_bulk_reads_caps_without_taking_them() -> None:
    """A cap is per sampler process and depends on arrival order: explain
    shows the bucket's state and what the cap would do in it, and explaining
    many requests takes no token (every line sees the same bucket)."""
    policy = build_policy(Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "100", "MIRROR_MAX_MIRRORS_PER_SECOND": "2"}))
    results = list(explain_bulk(policy, KEYS[:50]))
    assert {(t["decision"], json.dumps(t["cap"])) for r in results for t in r["targets"]} == {
        ("mirrored", json.dumps({"per_second": 2.0, "tokens": 2.0}))
    }
    assert results[0] == explain(policy, request_headers([("x-request-id", KEYS[0])]))
    # A plan whose bucket serving has emptied (a clock that stands still): every line capped.
    plan = Plan(policy, clock=lambda: 5.0)
    while plan.sampled({":path": b"/", "x-request-id": b"k"}):
        pass
    assert {t["decision"] for r in explain_bulk(plan, KEYS[:50]) for t in r["targets"]} == {"capped"}
    assert render_line(next(explain_bulk(plan, ["k"]))) == "k\tsimple\tshadow=capped"


def test_bulk_with_the_rule_envoy_names() -> None:
    policy = conformance()
    rule_0, rule_1 = (f"gateway-conformance-infra/request-percentage-mirror/{i}" for i in (0, 1))
    # /percent-mirror-fraction matches rule 1 (25/50); Envoy may name rule 0 (20%).
    named = list(explain_bulk(policy, KEYS[:300], path="/percent-mirror-fraction", rule_id=rule_0))
    matched = list(explain_bulk(policy, KEYS[:300], path="/percent-mirror-fraction", rule_id="no/such/rule"))
    assert {(r["rule"], r["named_by_envoy"]) for r in named} == {(rule_0, True)}
    assert {(r["rule"], r["named_by_envoy"]) for r in matched} == {(rule_1, False)}
    for key, a, b in zip(KEYS, named, matched, strict=False):
        assert a["targets"][0]["decision"] == outcome(decide(b"", key.encode(), Fraction(20)))
        assert b["targets"][0]["decision"] == outcome(decide(b"", key.encode(), Fraction(25, 50)))
        headers = request_headers([("x-request-id", key)], path="/percent-mirror-fraction")
        assert a == explain(policy, headers, rule_id=rule_0)


def test_request_attributes_that_came_from_bytes_go_back_to_those_bytes() -> None:
    """Arguments that are not UTF-8 arrive decoded with surrogateescape ("\\udcff"
    is the byte 0xff): they go back to their bytes, as --header values do."""
    headers = request_headers([("x-a", "\udcff")], [("c", "\udcfe")], path="/\udcff", host="h\udcff", method="g\udcff")
    assert headers == {":method": b"G\xff", ":path": b"/\xff", ":authority": b"h\xff", "x-a": b"\xff", "cookie": b"c=\xfe"}
