"""The generated Lua decides exactly as the Python sampler does.

Runs the scripts under LuaJIT 2.1 (lupa's bundled LuaJIT, the same major
version as Envoy's) with fake Envoy header maps and handles.
"""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.config.build import build_policy
from extproc.config.settings import Settings
from extproc.core.keys import extract_key, parse_key_chain
from extproc.core.matching import Match
from extproc.core.plan import Plan
from extproc.core.policy import BackendRef, MirrorTarget, Policy, Route, Rule
from extproc.core.sampling import Fraction, decide, key_hash
from extproc.core.slots import SlotHeaders
from extproc.envoy.lua import LIBRARY, lua_string, rule_script
from tests.support.paths import CONFORMANCE

luajit21 = pytest.importorskip("lupa.luajit21", reason="lupa (LuaJIT) is a test dependency; make test installs it")

FAKES = r"""
function fake_headers(t)
  return {
    getNumValues = function(self, name) local v = t[name]; return v and #v or 0 end,
    getAtIndex = function(self, name, i) local v = t[name]; return v and v[i + 1] end,
    replace = function(self, name, value) t[name] = {value} end,
    remove = function(self, name) t[name] = nil end,
  }
end

function fake_handle(t)
  local h = {headers_ = fake_headers(t), cleared = false}
  function h:headers() return self.headers_ end
  function h:clearRouteCache() self.cleared = true end
  return h
end

function hash_all(keys, salt)
  local out = {}
  for i, k in ipairs(keys) do
    out[i] = tostring(MIRROR_SAMPLER.key_hash(salt .. "\0", k))
  end
  return out
end
"""


def runtime(script: str = LIBRARY) -> Any:
    rt = luajit21.LuaRuntime(encoding=None, unpack_returned_tuples=True)
    assert b"LuaJIT 2.1" in rt.eval("jit.version")
    rt.execute(script)
    rt.execute(FAKES)
    return rt


def lua_table(rt: Any, headers: dict[str, list[bytes]]) -> Any:
    return rt.table_from({k.encode(): rt.table_from(v) for k, v in headers.items()})


def u64(lua_text: bytes) -> int:
    return int(lua_text.decode().removesuffix("ULL"))


def parity_keys() -> list[bytes]:
    rng = random.Random(20261122)
    keys = [b"", *(bytes([b]) for b in range(256))]
    keys += [rng.randbytes(n) for n in range(65) for _ in range(20)]  # every length 0..64
    keys += [rng.randbytes(rng.choice((1000, 2048, 4095, 4096, 5000))) for _ in range(50)]
    keys += ["é-ü-中文-🙂".encode(), b"\xff\xfe\x80\x00", b"\x00" * 17]
    keys += [f"user-{i}".encode() for i in range(100_000 - len(keys))]
    return keys


def test_hash_parity_on_100k_keys() -> None:
    rt = runtime()
    keys = parity_keys()
    assert len(keys) >= 100_000
    for salt in (b"", b"v2", b"\x00\xff salt"):
        got = rt.globals().hash_all(rt.table_from(keys), salt)
        assert [u64(got[i + 1]) for i in range(len(keys))] == [key_hash(salt, k) for k in keys], salt


def test_design_vectors_in_lua() -> None:
    rt = runtime()
    h = rt.eval("MIRROR_SAMPLER.murmur3_h1")
    tostr = rt.eval("tostring")
    assert u64(tostr(h(b"\x00user-123"))) == 17646487862988728035
    assert u64(tostr(h(b"\x00alice"))) == 3287336622105459802
    assert u64(tostr(h(b"v2\x00alice"))) == 2539909752279064467


def test_lua_string_round_trips_every_byte() -> None:
    rt = runtime()
    data = bytes(range(256)) * 2
    assert rt.eval(lua_string(data)) == data


CHAIN = parse_key_chain("header:x-user,cookie:session,query:uid,traceparent,header:x-request-id")

header_value = st.one_of(st.binary(max_size=12), st.sampled_from([b"", b" ", b"abc", b"\xff"]))
cookie_value = st.lists(
    st.one_of(
        st.sampled_from([b"session=abc", b"session=", b" session = x ; a=b", b"xsession=1", b"a=b; session=\xff\xfe", b"session"]),
        st.binary(max_size=20),
    ),
    max_size=3,
)
path_value = st.one_of(
    st.sampled_from([b"/", b"/p?uid=7", b"/p?a=1&uid=&uid=2", b"/p?uid", b"/p?uid=1#frag", b"/p?x=1&uid=%41"]),
    st.binary(max_size=30).map(lambda b: b"/" + b),
)
trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
traceparent_value = st.one_of(
    st.sampled_from(
        [
            f"00-{trace_id}-00f067aa0ba902b7-01".encode(),
            f" 00-{trace_id}-00f067aa0ba902b7-01 ".encode(),
            f"00-{trace_id}-00f067aa0ba902b7-01-x".encode(),
            f"cc-{trace_id}-00f067aa0ba902b7-01-x".encode(),
            f"ff-{trace_id}-00f067aa0ba902b7-01".encode(),
            f"00-{'0' * 32}-00f067aa0ba902b7-01".encode(),
            f"00-{trace_id}-{'0' * 16}-01".encode(),
            f"00-{trace_id.upper()}-00f067aa0ba902b7-01".encode(),
        ]
    ),
    st.binary(max_size=60),
)


@settings(max_examples=400, deadline=None)
@given(
    user=st.one_of(st.none(), st.lists(header_value, min_size=1, max_size=2)),
    cookies=cookie_value,
    path=path_value,
    traceparent=st.one_of(st.none(), traceparent_value),
    request_id=st.one_of(st.none(), header_value),
)
def test_key_extraction_parity_for_every_source(
    user: list[bytes] | None, cookies: list[bytes], path: bytes, traceparent: bytes | None, request_id: bytes | None
) -> None:
    headers: dict[str, list[bytes]] = {":path": [path]}
    if user is not None:
        headers["x-user"] = user
    if cookies:
        headers["cookie"] = cookies
    if traceparent is not None:
        headers["traceparent"] = [traceparent]
    if request_id is not None:
        headers["x-request-id"] = [request_id]
    # The service's view: first value of each header, cookie headers joined.
    flat = {k: (b"; ".join(v) if k == "cookie" else v[0]) for k, v in headers.items()}
    expected = extract_key(CHAIN, flat)
    rt = RT
    chain = rt.eval("{" + ", ".join(f"{{{lua_string(s.kind.value.encode())}, {lua_string(s.name.encode())}}}" for s in CHAIN) + "}")
    got = rt.eval("function(h, c) return MIRROR_SAMPLER.extract_key(fake_headers(h), c) end")(lua_table(rt, headers), chain)
    got_key = got[0] if isinstance(got, tuple) else got
    assert got_key == (None if expected is None else expected[1])


RT = runtime()


def conformance_policy(**env: str) -> Policy:
    return build_policy(Settings.load({"MIRROR_CONFIG": str(CONFORMANCE), **env}), CONFORMANCE.read_text())


@pytest.mark.parametrize("env", [{}, {"MIRROR_SALT": "v2", "MIRROR_KEY": "cookie:session,header:x-request-id"}])
def test_each_rule_script_decides_like_the_policy(env: dict[str, str]) -> None:
    policy = conformance_policy(**env)
    paths = {
        "gateway-conformance-infra/request-percentage-mirror/0": b"/percent-mirror",
        "gateway-conformance-infra/request-percentage-mirror/1": b"/percent-mirror-fraction",
        "gateway-conformance-infra/request-percentage-mirror/2": b"/percent-multi-mirror-and-modify-headers",
    }
    keys = [b""] + [f"user-{i}".encode() for i in range(2000)] + [os.urandom(9) for _ in range(200)]
    plan = Plan(policy)
    for rule in policy.rules:
        rt = runtime(rule_script(policy, rule))
        on_request = rt.globals().envoy_on_request
        sampled_total = 0
        for key in keys:
            headers = {":path": [paths[rule.id]], "x-request-id": [key]}
            handle = rt.globals().fake_handle(lua_table(rt, headers))
            on_request(handle)
            flat = {k: v[0] for k, v in headers.items()}
            decision = plan.trace(flat)
            assert decision.rule == rule
            want = {policy.slot_names[t.slot]: t.backend.encode() for t in decision.sampled}
            table = handle.headers_
            got = {
                slot: table.getAtIndex(table, slot.encode(), 0)
                for slot in policy.slot_names
                if table.getNumValues(table, slot.encode()) > 0
            }
            assert got == want, (rule.id, key)
            assert bool(handle.cleared) == bool(want)
            sampled_total += bool(want)
        assert 0 < sampled_total < len(keys)


def test_a_hundred_percent_target_needs_a_key_but_nothing_else() -> None:
    policy = build_policy(Settings.load({"MIRROR_BACKEND": "shadow"}))
    (rule,) = policy.rules
    rt = runtime(rule_script(policy, rule))
    for key, mirrored in ((b"x", True), (b"", False)):
        handle = rt.globals().fake_handle(lua_table(rt, {":path": [b"/"], "x-request-id": [key]}))
        rt.globals().envoy_on_request(handle)
        assert (handle.headers_.getNumValues(handle.headers_, b"x-mirror-cluster-0") == 1) is mirrored


def test_threshold_boundary_is_strict() -> None:
    """u < threshold, never <=: a target whose threshold equals u skips it."""
    rt = RT
    u = key_hash(b"", b"alice")
    decide = rt.eval(
        "function(h, t) local out = MIRROR_SAMPLER.decide(fake_headers(h), {{'header', 'x-request-id'}}, '\\0', t); return #out end"
    )
    headers = lua_table(rt, {"x-request-id": [b"alice"]})
    for threshold, mirrored in ((u, 0), (u + 1, 1), (u - 1, 0)):
        targets = rt.eval(f"{{{{'x-mirror-cluster-0', 'shadow', 0x{threshold:016x}ULL}}}}")
        assert decide(headers, targets) == mirrored, threshold


def test_variant_script_strips_forged_slot_and_marker_headers_and_rematches() -> None:
    policy = build_policy(Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "0"}))
    (rule,) = policy.rules
    rt = runtime(rule_script(policy, rule, variant=True))
    forged = {
        ":path": [b"/"],
        "x-request-id": [b"alice"],
        "x-mirror-cluster-0": [b"shadow"],
        "x-mirror-cluster-1": [b"x"],
        "x-mirror-rule": [b"f"],
    }
    handle = rt.globals().fake_handle(lua_table(rt, forged))
    rt.globals().envoy_on_request(handle)
    table = handle.headers_
    for name in (b"x-mirror-cluster-0", b"x-mirror-cluster-1", b"x-mirror-rule"):
        assert table.getNumValues(table, name) == 0
    assert handle.cleared  # the route picked with the forged header is dropped


def test_plain_script_drops_forged_slots_only_when_it_rematches() -> None:
    """On the plain route a forged slot is harmless while the route stays (it
    is removed upstream); when a real slot is set and the route re-matches,
    the forged ones must go first or they would join the variant."""
    manifest = CONFORMANCE.read_text()
    policy = build_policy(Settings.load({"MIRROR_CONFIG": str(CONFORMANCE)}), manifest)
    rule = policy.rules[2]  # infra-backend-v2 at 35%, infra-backend-v3 at 50%
    rt = runtime(rule_script(policy, rule))
    users = [f"user-{i}".encode() for i in range(1000)]
    only_v3 = next(k for k in users if not decide(b"", k, Fraction(35)) and decide(b"", k, Fraction(50)))
    neither = next(k for k in users if not decide(b"", k, Fraction(50)))
    for key, rematch in ((only_v3, True), (neither, False)):
        headers = {
            ":path": [b"/percent-multi-mirror-and-modify-headers"],
            "x-request-id": [key],
            "x-mirror-cluster-0": [b"infra-backend-v2"],
        }
        handle = rt.globals().fake_handle(lua_table(rt, headers))
        rt.globals().envoy_on_request(handle)
        table = handle.headers_
        slot0 = table.getAtIndex(table, b"x-mirror-cluster-0", 0)
        assert bool(handle.cleared) is rematch
        # Re-matching: the forged slot 0 is gone. Staying on the plain route:
        # left for the route's request_headers_to_remove.
        assert slot0 == (None if rematch else b"infra-backend-v2")


SaltedTarget = tuple[str, Fraction, bytes | None]
SALTED_TARGETS: list[list[SaltedTarget]] = [
    # The policy's salt for some, one salt shared by two targets, an empty
    # salt of its own, a 100% and a 0% target.
    [("a", Fraction(35), None), ("b", Fraction(50), b"b"), ("c", Fraction(50), b"b"), ("d", Fraction(100), b"\x00\xff\n\"'\\")],
    [("a", Fraction(1, 3), b""), ("b", Fraction(2, 3), None), ("c", Fraction(0), b"c"), ("d", Fraction(99), b"x" * 40)],
    # No target uses the policy's salt.
    [("a", Fraction(35), b"one"), ("b", Fraction(50), b"two")],
]


@pytest.mark.parametrize("targets", SALTED_TARGETS)
@pytest.mark.parametrize("policy_salt", [b"", b"v2", b"\x00s\xff"])
def test_rule_script_with_target_salts_decides_like_the_policy(targets: list[SaltedTarget], policy_salt: bytes) -> None:
    """Per-target salts: each target's slot is set exactly when the plan's
    trace mirrors it, over many keys (every length around the 16-byte block and
    8-byte word edges, random bytes, non-UTF-8)."""
    mirrors = tuple(MirrorTarget(b, f, i, salt=s) for i, (b, f, s) in enumerate(targets))
    rule = Rule("ns/r/0", (Match(),), mirrors, (BackendRef("web"),))
    policy = Policy(
        (Route("ns", "r", (), (rule,)),),
        parse_key_chain("header:x-request-id"),
        salt=policy_salt,
        slot_headers=SlotHeaders(count=len(mirrors)),
    )
    rt = runtime(rule_script(policy, rule))
    on_request = rt.globals().envoy_on_request
    plan = Plan(policy)
    rng = random.Random(len(targets) * 31 + len(policy_salt))
    keys = [f"user-{i}".encode() for i in range(1500)] + [rng.randbytes(n) for n in range(1, 41) for _ in range(10)]
    keys += [b"\xff\xfe", "中文".encode()]
    per_target = [0] * len(mirrors)
    for key in keys:
        headers = {":path": [b"/"], "x-request-id": [key]}
        handle = rt.globals().fake_handle(lua_table(rt, headers))
        on_request(handle)
        decision = plan.trace({":path": b"/", "x-request-id": key})
        want = {policy.slot_names[t.slot]: t.backend.encode() for t in decision.sampled}
        table = handle.headers_
        got = {
            slot: table.getAtIndex(table, slot.encode(), 0) for slot in policy.slot_names if table.getNumValues(table, slot.encode()) > 0
        }
        assert got == want, (key, policy_salt)
        for t in decision.sampled:
            per_target[t.slot] += 1
    # The run saw both outcomes wherever the fraction allows them.
    for (_, fraction, _), n in zip(targets, per_target, strict=True):
        assert n == len(keys) if fraction.numerator == fraction.denominator else (n == 0 if fraction.numerator == 0 else 0 < n < len(keys))


def test_lua_decide_hashes_each_target_with_its_own_prefix() -> None:
    """MIRROR_SAMPLER.decide reads t[4] as the target's own salt..'\\0': its
    comparison uses that u; the others use the shared prefix's."""
    rt = RT
    decide_lua = rt.eval(
        "function(h, t) local out = MIRROR_SAMPLER.decide(fake_headers(h), {{'header', 'x-request-id'}}, 'p\\0', t);"
        " local names = {}; for i, x in ipairs(out) do names[i] = x[2] end; return table.concat(names, ',') end"
    )
    for key in (f"k{i}".encode() for i in range(300)):
        own, shared = key_hash(b"own", key), key_hash(b"p", key)
        # Thresholds right at each u: mirrored iff the target uses the other u and it is smaller.
        targets = rt.eval(
            "{"
            f"{{'s0', 'shared', 0x{shared + 1:016x}ULL}}, "
            f"{{'s1', 'own', 0x{own + 1:016x}ULL, {lua_string(b'own' + bytes(1))}}}, "
            f"{{'s2', 'own-at-shared', 0x{shared:016x}ULL, {lua_string(b'own' + bytes(1))}}}"
            "}"
        )
        want = ["shared", "own"] + (["own-at-shared"] if own < shared else [])
        assert decide_lua(lua_table(rt, {"x-request-id": [key]}), targets) == ",".join(want).encode()
