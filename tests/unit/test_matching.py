"""Gateway API HTTPRoute matching and precedence, built the real way: YAML text
through config.parse_manifests/build_policy, then Policy.match and the plan's trace
(docs/DESIGN.md "Gateway API facts the matcher needs")."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
import yaml

from extproc.config.build import build_policy
from extproc.config.settings import Settings
from extproc.core.plan import Plan
from extproc.core.policy import Outcome, Policy
from extproc.core.sampling import Fraction, key_hash
from tests.support.manifests import API, httproute


def policy(*docs: str | dict[str, Any], **env: str) -> Policy:
    text = "\n---\n".join(textwrap.dedent(d) if isinstance(d, str) else yaml.safe_dump(d) for d in docs)
    return build_policy(Settings.load({"MIRROR_CONFIG": "routes.yaml", **env}), text)


def route(
    name: str, *rules: dict[str, Any], hostnames: list[str] | None = None, namespace: str | None = None, created: str | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"parentRefs": [{"name": "gw"}]}
    if hostnames is not None:
        spec["hostnames"] = hostnames
    return httproute(*(rules or [{}]), name=name, namespace=namespace or None, created=created or None, **spec)


def rule(*matches: dict[str, Any], mirrors: tuple[tuple[str, int], ...] = ()) -> dict[str, Any]:
    r: dict[str, Any] = {"backendRefs": [{"name": "primary", "port": 8080}]}
    if matches:
        r["matches"] = list(matches)
    if mirrors:
        r["filters"] = [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": b}, "percent": p}} for b, p in mirrors]
    return r


def m(
    path: str | None = None,
    type: str = "PathPrefix",
    headers: dict[str, str] | None = None,
    query: dict[str, str] | None = None,
    method: str | None = None,
    regex: bool = False,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if path is not None:
        out["path"] = {"type": type, "value": path}
    vt = "RegularExpression" if regex else "Exact"
    if headers:
        out["headers"] = [{"name": k, "value": v, "type": vt} for k, v in headers.items()]
    if query:
        out["queryParams"] = [{"name": k, "value": v, "type": vt} for k, v in query.items()]
    if method:
        out["method"] = method
    return out


def req(path: str | bytes = "/", host: str | bytes = "example.com", method: str = "GET", **headers: str | bytes) -> dict[str, bytes]:
    def b(v: str | bytes) -> bytes:
        return v if isinstance(v, bytes) else v.encode()

    out = {":path": b(path), ":authority": b(host), ":method": method.encode()}
    out.update({k.replace("_", "-").lower(): b(v) for k, v in headers.items()})
    return out


def matched(pol: Policy, headers: dict[str, bytes]) -> str | None:
    r = pol.match(headers)
    return None if r is None else r.id


def one_rule(*matches: dict[str, Any]) -> Policy:
    return policy(route("r", rule(*matches)))


# --------------------------------------------------------------------------
# Path matching.


CONFORMANCE_PATHS = """
    apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata:
      name: request-percentage-mirror
      namespace: gateway-conformance-infra
    spec:
      rules:
      - matches:
        - path:
            type: PathPrefix
            value: /percent-mirror
      - matches:
        - path:
            type: PathPrefix
            value: /percent-mirror-fraction
"""


@pytest.mark.parametrize(
    ("path", "rule_index"),
    [
        ("/percent-mirror", 0),
        ("/percent-mirror/", 0),
        ("/percent-mirror/x", 0),
        ("/percent-mirror/x/y?z=1", 0),
        ("/percent-mirror?q=1", 0),
        ("/percent-mirror-fraction", 1),
        ("/percent-mirror-fraction/x", 1),
        ("/percent-mirrorx", None),
        ("/percent-mirror-fractionx", None),
        ("/percent", None),
        ("/", None),
        ("/other/percent-mirror", None),
    ],
)
def test_path_prefix_segment_boundaries(path: str, rule_index: int | None) -> None:
    pol = policy(CONFORMANCE_PATHS)
    want = None if rule_index is None else f"gateway-conformance-infra/request-percentage-mirror/{rule_index}"
    assert matched(pol, req(path)) == want


def test_path_prefix_order_in_file_does_not_matter() -> None:
    pol = policy(route("r", rule(m("/percent-mirror-fraction")), rule(m("/percent-mirror"))))
    assert matched(pol, req("/percent-mirror-fraction")) == "default/r/0"
    assert matched(pol, req("/percent-mirror")) == "default/r/1"


@pytest.mark.parametrize(("path", "ok"), [("/api", True), ("/api/", True), ("/api/v1", True), ("/apiv1", False), ("/ap", False)])
def test_path_prefix_with_trailing_slash(path: str, ok: bool) -> None:
    pol = one_rule(m("/api/"))
    assert (matched(pol, req(path)) == "default/r/0") is ok


@pytest.mark.parametrize("path", ["/", "/x", "/a/b/c", "/?q=1", "/percent-mirror-fraction"])
def test_root_prefix_and_no_matches_match_everything(path: str) -> None:
    assert matched(one_rule(m("/")), req(path)) == "default/r/0"
    assert matched(one_rule(), req(path)) == "default/r/0"  # a rule with no matches is PathPrefix /
    assert matched(one_rule({}), req(path)) == "default/r/0"  # a match with no path is PathPrefix /


@pytest.mark.parametrize(
    ("path", "ok"), [("/foo", True), ("/foo?x=1", True), ("/foo/", False), ("/foo/bar", False), ("/fo", False), ("/FOO", False)]
)
def test_exact_path(path: str, ok: bool) -> None:
    assert (matched(one_rule(m("/foo", "Exact")), req(path)) is not None) is ok


@pytest.mark.parametrize(
    ("path", "ok"),
    [("/abc", True), ("/a1c", True), ("/abc?x=1", True), ("/abcd", False), ("/x/abc", False), ("/ab", False)],
)
def test_regex_path_full_match(path: str, ok: bool) -> None:
    assert (matched(one_rule(m("/a.c", "RegularExpression")), req(path)) is not None) is ok


def test_regex_path_ignores_query() -> None:
    pol = one_rule(m("/items/[0-9]+", "RegularExpression"))
    assert matched(pol, req("/items/42?x=y")) == "default/r/0"
    assert matched(pol, req("/items/42x")) is None


def test_path_is_not_decoded() -> None:
    pol = one_rule(m("/a b", "Exact"))
    assert matched(pol, req("/a%20b")) is None
    pol = one_rule(m("/a%20b", "Exact"))
    assert matched(pol, req("/a%20b")) == "default/r/0"


# --------------------------------------------------------------------------
# Headers, query parameters, method.


def test_header_exact_name_case_insensitive_value_case_sensitive() -> None:
    pol = one_rule(m(headers={"X-Env": "Canary"}))
    assert matched(pol, req(x_env="Canary")) == "default/r/0"
    assert matched(pol, req(x_env="canary")) is None
    assert matched(pol, req(x_env="Canary2")) is None
    assert matched(pol, req()) is None


def test_header_regex_full_match() -> None:
    pol = one_rule(m(headers={"X-Version": "v[0-9]+"}, regex=True))
    assert matched(pol, req(x_version="v12")) == "default/r/0"
    assert matched(pol, req(x_version="v12-beta")) is None
    assert matched(pol, req(x_version="xv1")) is None
    assert matched(pol, req()) is None


def test_all_header_matches_must_hold() -> None:
    pol = one_rule(m(headers={"a": "1", "B": "2"}))
    assert matched(pol, req(a="1", b="2")) == "default/r/0"
    assert matched(pol, req(a="1")) is None
    assert matched(pol, req(a="1", b="3")) is None


def test_header_raw_bytes() -> None:
    pol = one_rule(m(headers={"x-name": "café"}))
    assert matched(pol, req(x_name="café".encode())) == "default/r/0"
    assert matched(pol, req(x_name=b"caf\xe9")) is None


def test_duplicate_header_names_later_ignored() -> None:
    doc = route("r", {"matches": [{"headers": [{"name": "X-A", "value": "1"}, {"name": "x-a", "value": "2"}]}]})
    pol = policy(doc)
    assert matched(pol, req(x_a="1")) == "default/r/0"
    assert matched(pol, req(x_a="2")) is None


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        # Envoy 1.40 compares query parameters raw, not percent-decoded.
        ("/?q=a%20b", False),
        ("/?q=a b", True),
        ("/?x=1&q=a b&q=zzz", True),
        ("/?q=zzz&q=a b", False),  # first occurrence counts
        ("/?Q=a b", False),  # names are case-sensitive
        ("/?qq=a b", False),
        ("/", False),
        ("/?q=a b c", False),
    ],
)
def test_query_param_exact(path: str, ok: bool) -> None:
    pol = one_rule(m(query={"q": "a b"}))
    assert (matched(pol, req(path)) is not None) is ok


def test_query_param_encoded_value_matches_only_encoded() -> None:
    pol = one_rule(m(query={"q": "a%20b"}))
    assert matched(pol, req("/?q=a%20b")) == "default/r/0"
    assert matched(pol, req("/?q=a b")) is None


def test_query_param_regex_on_raw_name_and_value() -> None:
    pol = one_rule(m(query={"uid": "x.*"}, regex=True))
    assert matched(pol, req("/?uid=xyz")) == "default/r/0"
    assert matched(pol, req("/?uid=%78yz")) is None
    assert matched(pol, req("/?%75id=xyz")) is None


def test_query_params_ignore_fragment() -> None:
    pol = one_rule(m(query={"q": "1"}))
    assert matched(pol, req("/?q=1#frag")) == "default/r/0"
    assert matched(pol, req("/?x=0#q=1")) is None


@pytest.mark.parametrize(("method", "ok"), [("POST", True), ("GET", False), ("post", False), ("PUT", False)])
def test_method(method: str, ok: bool) -> None:
    pol = one_rule(m("/api", method="POST"))
    assert (matched(pol, req("/api", method=method)) is not None) is ok


def test_all_conditions_of_one_match_and_any_match_of_a_rule() -> None:
    pol = policy(route("r", rule(m("/a", method="POST", headers={"x": "1"}, query={"q": "1"}), m("/b", "Exact"))))
    assert matched(pol, req("/a/z?q=1", method="POST", x="1")) == "default/r/0"
    assert matched(pol, req("/a/z?q=1", method="GET", x="1")) is None
    assert matched(pol, req("/a/z?q=2", method="POST", x="1")) is None
    assert matched(pol, req("/a/z?q=1", method="POST")) is None
    assert matched(pol, req("/b")) == "default/r/0"


# --------------------------------------------------------------------------
# Hostnames.


def hosts_policy() -> Policy:
    return policy(
        route("exact", rule(m("/api")), hostnames=["foo.example.com"]),
        route("wild", rule(m("/")), hostnames=["*.example.com"]),
        route("deeper", rule(m("/")), hostnames=["*.b.example.com"]),
        route("all", rule(m("/"))),
    )


@pytest.mark.parametrize(
    ("host", "path", "want"),
    [
        ("foo.example.com", "/api", "default/exact/0"),
        ("foo.example.com", "/api/x", "default/exact/0"),
        ("FOO.Example.COM", "/api", "default/exact/0"),
        ("foo.example.com:8080", "/api", "default/exact/0"),
        ("Foo.Example.Com:443", "/api", "default/exact/0"),
        ("foo.example.com", "/other", None),  # no fallback to the wildcard or the catch-all
        ("bar.example.com", "/other", "default/wild/0"),
        ("a.bar.example.com", "/x", "default/wild/0"),  # one or more labels
        ("BAR.example.com:80", "/x", "default/wild/0"),
        ("x.b.example.com", "/x", "default/deeper/0"),  # longer wildcard wins
        ("x.y.b.example.com", "/x", "default/deeper/0"),
        ("b.example.com", "/x", "default/wild/0"),
        ("example.com", "/x", "default/all/0"),  # *.example.com never matches the bare domain
        ("badexample.com", "/x", "default/all/0"),
        ("other.test", "/x", "default/all/0"),
        ("", "/x", "default/all/0"),
    ],
)
def test_hostname_specificity(host: str, path: str, want: str | None) -> None:
    assert matched(hosts_policy(), req(path, host=host)) == want


def test_host_header_used_without_authority() -> None:
    pol = hosts_policy()
    assert matched(pol, {":path": b"/api", ":method": b"GET", "host": b"foo.example.com"}) == "default/exact/0"


def test_without_catch_all_unknown_host_matches_nothing() -> None:
    pol = policy(route("exact", rule(m("/")), hostnames=["foo.example.com"]), route("wild", rule(), hostnames=["*.example.com"]))
    assert matched(pol, req("/", host="example.com")) is None
    assert matched(pol, req("/", host="foo.example.org")) is None
    assert matched(pol, req("/", host="x.example.com")) == "default/wild/0"


def test_route_with_several_hostnames() -> None:
    pol = policy(route("multi", rule(), hostnames=["a.example", "b.example", "*.c.example"]), route("all", rule(m("/x"))))
    for host in ("a.example", "b.example", "z.c.example"):
        assert matched(pol, req("/", host=host)) == "default/multi/0"
    assert matched(pol, req("/x", host="c.example")) == "default/all/0"
    assert matched(pol, req("/", host="c.example")) is None


def test_same_hostname_in_two_routes_shares_one_vhost() -> None:
    pol = policy(route("a", rule(m("/a")), hostnames=["h.example"]), route("b", rule(m("/b")), hostnames=["h.example"]))
    assert matched(pol, req("/a", host="h.example")) == "default/a/0"
    assert matched(pol, req("/b", host="h.example")) == "default/b/0"


def test_ipv6_authority() -> None:
    pol = policy(route("all", rule()))
    assert matched(pol, req("/", host="[::1]:8080")) == "default/all/0"


# --------------------------------------------------------------------------
# Precedence among rules that match (Gateway API HTTPRoute spec).


def test_exact_over_prefix_even_when_prefix_route_is_older() -> None:
    pol = policy(
        route("a-prefix", rule(m("/foo")), created="2020-01-01T00:00:00Z"),
        route("b-exact", rule(m("/foo", "Exact")), created="2024-01-01T00:00:00Z"),
    )
    assert matched(pol, req("/foo")) == "default/b-exact/0"
    assert matched(pol, req("/foo/x")) == "default/a-prefix/0"


def test_exact_over_longer_prefix_within_a_route() -> None:
    pol = policy(route("r", rule(m("/foo/bar/baz")), rule(m("/foo/bar/baz", "Exact"))))
    assert matched(pol, req("/foo/bar/baz")) == "default/r/1"


def test_longer_prefix_first() -> None:
    pol = policy(route("r", rule(m("/")), rule(m("/api")), rule(m("/api/v1"))))
    assert matched(pol, req("/api/v1/users")) == "default/r/2"
    assert matched(pol, req("/api/v1")) == "default/r/2"
    assert matched(pol, req("/api/v2")) == "default/r/1"
    assert matched(pol, req("/api")) == "default/r/1"
    assert matched(pol, req("/apiv1")) == "default/r/0"
    assert matched(pol, req("/")) == "default/r/0"


def test_longer_prefix_across_routes_beats_age_and_name() -> None:
    pol = policy(
        route("aaa", rule(m("/api")), created="2000-01-01T00:00:00Z"),
        route("zzz", rule(m("/api/v1")), created="2024-01-01T00:00:00Z"),
    )
    assert matched(pol, req("/api/v1/x")) == "default/zzz/0"


def test_method_match_after_path() -> None:
    pol = policy(route("r", rule(m("/api")), rule(m("/api", method="POST"))))
    assert matched(pol, req("/api", method="POST")) == "default/r/1"
    assert matched(pol, req("/api", method="GET")) == "default/r/0"
    # A longer prefix outranks a method match.
    pol = policy(route("r", rule(m("/", method="POST")), rule(m("/api"))))
    assert matched(pol, req("/api/x", method="POST")) == "default/r/1"
    assert matched(pol, req("/other", method="POST")) == "default/r/0"


def test_more_header_matches_first() -> None:
    pol = policy(route("r", rule(m("/", headers={"a": "1"})), rule(m("/", headers={"a": "1", "b": "2"}))))
    assert matched(pol, req(a="1", b="2")) == "default/r/1"
    assert matched(pol, req(a="1")) == "default/r/0"
    # A method match outranks header matches.
    pol = policy(route("r", rule(m("/", headers={"a": "1", "b": "2"})), rule(m("/", method="GET"))))
    assert matched(pol, req(a="1", b="2")) == "default/r/1"
    # A longer prefix outranks header matches.
    pol = policy(route("r", rule(m("/", headers={"a": "1", "b": "2"})), rule(m("/x"))))
    assert matched(pol, req("/x", a="1", b="2")) == "default/r/1"


def test_more_query_matches_first() -> None:
    pol = policy(route("r", rule(m("/", query={"a": "1"})), rule(m("/", query={"a": "1", "b": "2"}))))
    assert matched(pol, req("/?a=1&b=2")) == "default/r/1"
    assert matched(pol, req("/?a=1")) == "default/r/0"
    # Header matches outrank query matches.
    pol = policy(route("r", rule(m("/", query={"a": "1", "b": "2"})), rule(m("/", headers={"h": "1"}))))
    assert matched(pol, req("/?a=1&b=2", h="1")) == "default/r/1"


def test_oldest_route_wins_ties() -> None:
    pol = policy(
        route("aaa-new", rule(m("/x")), created="2024-06-01T00:00:00Z"),
        route("zzz-old", rule(m("/x")), created="2023-06-01T00:00:00Z"),
    )
    assert matched(pol, req("/x")) == "default/zzz-old/0"


def test_oldest_route_wins_ties_same_day_seconds() -> None:
    pol = policy(
        route("aaa", rule(), created="2024-06-01T10:00:01Z"),
        route("bbb", rule(), created="2024-06-01T10:00:00Z"),
    )
    assert matched(pol, req("/")) == "default/bbb/0"


def test_oldest_route_wins_with_unquoted_yaml_timestamps() -> None:
    pol = policy(
        f"""
        apiVersion: {API}
        kind: HTTPRoute
        metadata:
          name: aaa
          creationTimestamp: 2024-06-01T10:00:01Z
        spec:
          rules: [{{}}]
        """,
        f"""
        apiVersion: {API}
        kind: HTTPRoute
        metadata:
          name: bbb
          creationTimestamp: 2024-06-01T10:00:00Z
        spec:
          rules: [{{}}]
        """,
    )
    assert matched(pol, req("/")) == "default/bbb/0"


def test_oldest_route_wins_quoted_and_unquoted_timestamps_mixed() -> None:
    """One manifest from `kubectl get -o yaml` (quoted), one hand-written (unquoted):
    the older route must still win. bbb is older by two hours."""
    pol = policy(
        f"""
        apiVersion: {API}
        kind: HTTPRoute
        metadata:
          name: aaa
          creationTimestamp: 2024-06-01T05:00:00Z
        spec:
          rules: [{{}}]
        """,
        f"""
        apiVersion: {API}
        kind: HTTPRoute
        metadata:
          name: bbb
          creationTimestamp: "2024-06-01T03:00:00Z"
        spec:
          rules: [{{}}]
        """,
    )
    assert matched(pol, req("/")) == "default/bbb/0"


def test_oldest_route_wins_timestamps_with_offsets() -> None:
    """RFC 3339 offsets: 00:30+01:00 is 23:30Z the previous day, older than 00:00Z."""
    pol = policy(
        route("aaa", rule(), created="2024-06-01T00:00:00Z"),
        route("bbb", rule(), created="2024-06-01T00:30:00+01:00"),
    )
    assert matched(pol, req("/")) == "default/bbb/0"


def test_oldest_route_wins_fractional_seconds() -> None:
    """10:00:00.5Z is half a second after 10:00:00Z: bbb is older."""
    pol = policy(
        route("aaa", rule(), created="2024-06-01T10:00:00.5Z"),
        route("bbb", rule(), created="2024-06-01T10:00:00Z"),
    )
    assert matched(pol, req("/")) == "default/bbb/0"


def test_alphabetical_namespace_name_breaks_remaining_ties() -> None:
    pol = policy(route("bbb", rule(m("/x"))), route("aaa", rule(m("/x"))))
    assert matched(pol, req("/x")) == "default/aaa/0"
    pol = policy(route("aaa", rule(m("/x")), namespace="beta"), route("zzz", rule(m("/x")), namespace="alpha"))
    assert matched(pol, req("/x")) == "alpha/zzz/0"
    same_age = "2024-01-01T00:00:00Z"
    pol = policy(route("b", rule(), created=same_age), route("a", rule(), created=same_age))
    assert matched(pol, req("/")) == "default/a/0"


def test_rule_order_breaks_ties_within_a_route() -> None:
    pol = policy(route("r", rule(m("/x")), rule(m("/x")), rule(m("/x"))))
    assert matched(pol, req("/x")) == "default/r/0"
    pol = policy(route("r", rule(m("/y"), m("/x")), rule(m("/x"))))
    assert matched(pol, req("/x")) == "default/r/0"


def test_more_specific_match_within_a_rule_decides_its_rank() -> None:
    # Rule 1's second match (/api/v1) outranks rule 0's /api for /api/v1 requests.
    pol = policy(route("r", rule(m("/api")), rule(m("/other"), m("/api/v1"))))
    assert matched(pol, req("/api/v1/x")) == "default/r/1"
    assert matched(pol, req("/api/x")) == "default/r/0"


def test_precedence_is_independent_of_document_order() -> None:
    docs = [
        route("p", rule(m("/")), created="2020-01-01T00:00:00Z"),
        route("q", rule(m("/api")), created="2021-01-01T00:00:00Z"),
        route("r", rule(m("/api", method="POST"))),
        route("s", rule(m("/api", "Exact"))),
    ]
    cases = {
        ("/api", "GET"): "default/s/0",
        ("/api/x", "POST"): "default/r/0",
        ("/api/x", "GET"): "default/q/0",
        ("/z", "GET"): "default/p/0",
    }
    for order in (docs, docs[::-1], [docs[2], docs[0], docs[3], docs[1]]):
        pol = policy(*order)
        for (path, method), want in cases.items():
            assert matched(pol, req(path, method=method)) == want


# --------------------------------------------------------------------------
# The plan's trace through the matched rule.


def test_decide_uses_the_matched_rules_mirrors() -> None:
    pol = policy(route("r", rule(m("/none")), rule(m("/all"), mirrors=(("shadow", 100),)), rule(m("/zero"), mirrors=(("shadow", 0),))))
    d = Plan(pol).trace(req("/all", x_request_id="abc"))
    assert d.rule is not None and d.rule.id == "default/r/1"
    assert [(t.target.backend, t.outcome) for t in d.targets] == [("shadow", Outcome.MIRRORED)]
    assert d.key == b"abc" and d.u == key_hash(b"", b"abc")
    assert [t.outcome for t in Plan(pol).trace(req("/zero", x_request_id="abc")).targets] == [Outcome.SKIPPED]
    none = Plan(pol).trace(req("/none", x_request_id="abc"))
    assert none.rule is not None and none.targets == () and none.sampled == ()
    unmatched = Plan(pol).trace(req("/elsewhere", x_request_id="abc"))
    assert unmatched.rule is None and unmatched.targets == ()


def test_decide_no_key() -> None:
    pol = policy(route("r", rule(mirrors=(("a", 100), ("b", 50)))))
    d = Plan(pol).trace(req("/"))
    assert [t.outcome for t in d.targets] == [Outcome.NO_KEY, Outcome.NO_KEY]
    assert d.sampled == ()
    assert [t.outcome for t in Plan(pol).trace(req("/", x_request_id="")).targets] == [Outcome.NO_KEY, Outcome.NO_KEY]


def test_decide_follows_the_key_chain_and_salt() -> None:
    pol = policy(route("r", rule(mirrors=(("a", 42),))), MIRROR_KEY="cookie:user,header:x-request-id", MIRROR_SALT="v2")
    d = Plan(pol).trace(req("/", cookie="user=alice", x_request_id="zzz"))
    assert d.key == b"alice" and d.u == 2539909752279064467 == key_hash(b"v2", b"alice")
    assert d.targets[0].outcome is Outcome.MIRRORED


def test_decide_matches_design_vectors_at_42_percent() -> None:
    pol = policy(route("r", rule(mirrors=(("a", 42),))))
    assert Plan(pol).trace(req("/", x_request_id="user-123")).targets[0].outcome is Outcome.SKIPPED
    assert Plan(pol).trace(req("/", x_request_id="alice")).targets[0].outcome is Outcome.MIRRORED


def test_targets_of_one_rule_are_nested() -> None:
    pol = policy(route("r", rule(mirrors=(("ten", 10), ("five", 5)))))
    ten = five = 0
    for i in range(3000):
        d = Plan(pol).trace(req("/", x_request_id=f"req-{i}"))
        outcome = {t.target.backend: t.outcome for t in d.targets}
        assert [t.target.slot for t in d.targets] == [0, 1]
        if outcome["five"] is Outcome.MIRRORED:
            assert outcome["ten"] is Outcome.MIRRORED
            five += 1
        ten += outcome["ten"] is Outcome.MIRRORED
        assert d.sampled == tuple(t.target for t in d.targets if t.outcome is Outcome.MIRRORED)
    assert 0 < five < ten < 3000


def test_simple_mode_policy_matches_everything() -> None:
    pol = build_policy(Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_FRACTION": "5/1000"}))
    for host, path in (("a.example", "/"), ("", "/x/y?z=1"), ("b", "/percent-mirror")):
        d = Plan(pol).trace(req(path, host=host, x_request_id="k"))
        assert d.rule is not None and d.rule.id == "simple"
        assert d.targets[0].target.fraction == Fraction(5, 1000)


def test_repeated_header_matches_if_any_value_matches() -> None:
    from extproc.core.matching import RequestView

    pol = one_rule(m(headers={"x-env": "canary"}))
    headers = req("/")
    headers["x-env"] = b"prod"
    assert pol.match(headers) is None
    assert pol.match(headers, {"x-env": [b"prod", b"canary"]}) is not None
    assert RequestView(headers, {"x-env": [b"prod", b"canary"]}).header_values("x-env") == [b"prod", b"canary"]


def test_host_header_match_reads_authority() -> None:
    pol = one_rule(m(headers={"Host": "h.example"}))
    assert matched(pol, {":authority": b"h.example", ":path": b"/"}) == "default/r/0"
    assert matched(pol, {":authority": b"other.example", ":path": b"/"}) is None


@pytest.mark.parametrize(
    ("pattern", "value", "ok"),
    [
        ("[[:alpha:]]+", b"abc", True),  # POSIX class: RE2 yes, Python re no
        ("a{,3}", b"a{,3}", True),  # RE2 reads this literally
        ("a{,3}", b"aa", False),
        ("\\++", b"++", True),
    ],
)
def test_regex_dialect_is_re2(pattern: str, value: bytes, ok: bool) -> None:
    pol = one_rule(m(headers={"x-a": pattern}, regex=True))
    assert (matched(pol, {":path": b"/", "x-a": value}) is not None) is ok
