"""Protecting the shadow: the kill switch and the per-route method filter,
decided alike by the plan's trace (explain), its serving answer and the
inline Lua."""

from __future__ import annotations

import pytest

from extproc.config.build import build_policy
from extproc.config.errors import ConfigError
from extproc.config.manifests import parse_manifests
from extproc.config.settings import Settings
from extproc.core.plan import Plan
from extproc.core.policy import Outcome
from extproc.server.metrics import Metrics
from extproc.wire import ProcessingResponse

ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: r
  annotations: {annotations}
spec:
  rules:
  - filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{name: shadow}}}}}}]
    backendRefs: [{{name: web}}]
"""
SWITCH = """\
---
apiVersion: mirror-sampler.io/v1alpha1
kind: MirrorSampler
spec: {{mirroring: {mirroring}}}
"""


def policy(annotations: str = "{}", mirroring: str | None = None, **env: str):  # type: ignore[no-untyped-def]
    text = ROUTE.format(annotations=annotations) + (SWITCH.format(mirroring=mirroring) if mirroring else "")
    return build_policy(Settings.load({"MIRROR_CONFIG": "r.yaml", **env}), text)


def request(method: str = "GET", key: bytes = b"k") -> dict[str, bytes]:
    return {":path": b"/", ":method": method.encode(), "x-request-id": key}


def outcomes(p, headers: dict[str, bytes]) -> list[Outcome]:  # type: ignore[no-untyped-def]
    return [t.outcome for t in Plan(p).trace(headers).targets]


def plan_answer(p, headers: dict[str, bytes]) -> tuple[bool, Metrics]:  # type: ignore[no-untyped-def]
    """The servicer's compiled answer: was a slot header set? And its metrics."""
    metrics = Metrics()
    answer = ProcessingResponse.FromString(Plan(p, metrics).answer(headers))
    return bool(answer.request_headers.response.header_mutation.set_headers), metrics


def test_method_annotation_limits_mirroring_to_listed_methods() -> None:
    p = policy('{"mirror-sampler.io/methods": "GET, head"}')
    assert outcomes(p, request("GET")) == [Outcome.MIRRORED]
    assert outcomes(p, request("HEAD")) == [Outcome.MIRRORED]
    assert outcomes(p, request("POST")) == [Outcome.METHOD]
    assert plan_answer(p, request("POST"))[0] is False
    assert plan_answer(p, request("GET"))[0] is True
    metrics = plan_answer(p, request("DELETE"))[1]
    assert (
        metrics.registry.get_sample_value(
            "mirror_sampler_decisions_total", {"rule": "default/r/0", "target": "shadow", "outcome": "method"}
        )
        == 1
    )


def test_bad_method_annotation_names_the_field() -> None:
    with pytest.raises(ConfigError) as e:
        policy('{"mirror-sampler.io/methods": "GET,FETCH"}')
    assert any("metadata.annotations.mirror-sampler.io/methods" in p and "FETCH" in p for p in e.value.problems)


def test_simple_mode_methods_from_the_environment() -> None:
    p = build_policy(Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_METHODS": "GET"}))
    assert outcomes(p, request("PUT")) == [Outcome.METHOD]
    with pytest.raises(ConfigError) as e:
        Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_METHODS": "GET,YEET"})
    assert e.value.problems[0].startswith("MIRROR_METHODS")


@pytest.mark.parametrize("how", ["file", "environment"])
def test_kill_switch_stops_every_mirror(how: str) -> None:
    p = policy(mirroring="Disabled") if how == "file" else policy(MIRROR_KILL_SWITCH="on")
    assert not p.enabled
    assert outcomes(p, request()) == [Outcome.DISABLED]
    sampled, metrics = plan_answer(p, request())
    assert sampled is False
    assert (
        metrics.registry.get_sample_value(
            "mirror_sampler_decisions_total", {"rule": "default/r/0", "target": "shadow", "outcome": "disabled"}
        )
        == 1
    )


def test_switch_document_enabled_and_its_errors() -> None:
    assert policy(mirroring="Enabled").enabled
    problems = parse_manifests(ROUTE.format(annotations="{}") + SWITCH.format(mirroring="Maybe"), "r.yaml").problems
    assert problems and "spec.mirroring" in problems[0] and "Enabled or Disabled" in problems[0]


def test_kill_switch_and_methods_do_not_need_new_envoy_routes() -> None:
    """A live reload may flip them: Envoy's routes do not depend on them."""
    assert policy().envoy_shape() == policy('{"mirror-sampler.io/methods": "GET"}', mirroring="Disabled").envoy_shape()


def test_inline_script_honours_methods_and_the_kill_switch() -> None:
    lupa = pytest.importorskip("lupa.luajit21")
    from extproc.envoy.lua import rule_script

    def mirrored(p, method: str) -> bool:  # type: ignore[no-untyped-def]
        (rule,) = p.rules
        rt = lupa.LuaRuntime(encoding=None)
        rt.execute(rule_script(p, rule))
        rt.execute(
            "function run(m) local t = {[':path'] = {'/'}, [':method'] = {m}, ['x-request-id'] = {'k'}}"
            " local h = {getAtIndex = function(self, n, i) local v = t[n]; return v and v[i + 1] end,"
            " getNumValues = function(self, n) local v = t[n]; return v and #v or 0 end,"
            " replace = function(self, n, v) t[n] = {v} end, remove = function(self, n) t[n] = nil end}"
            " envoy_on_request({headers = function() return h end, clearRouteCache = function() end})"
            " return t['x-mirror-cluster-0'] ~= nil end"
        )
        return bool(rt.globals().run(method.encode()))

    limited = policy('{"mirror-sampler.io/methods": "GET"}')
    assert mirrored(limited, "GET") and not mirrored(limited, "POST")
    assert not mirrored(policy(mirroring="Disabled"), "GET")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_cap_token_bucket() -> None:
    from extproc.core.plan import RateCap

    clock = FakeClock()
    cap = RateCap(2.0, clock)
    assert [cap.take() for _ in range(3)] == [True, True, False]  # a second's worth, then none
    clock.now += 0.5
    assert [cap.take() for _ in range(2)] == [True, False]  # refills at 2/s
    clock.now += 10
    assert [cap.take() for _ in range(3)] == [True, True, False]  # never more than a second's worth


def test_rate_cap_from_annotation_counts_capped() -> None:
    p = policy('{"mirror-sampler.io/max-mirrors-per-second": "3"}')
    assert p.rules[0].max_mirrors_per_second == 3.0
    metrics = Metrics()
    plan = Plan(p, metrics)
    answers = [ProcessingResponse.FromString(plan.answer(request(key=f"k{i}".encode()))) for i in range(10)]
    mirrored = sum(bool(a.request_headers.response.header_mutation.set_headers) for a in answers)
    # 100% sampled, but only the bucket's 3 go out within this instant.
    assert mirrored == 3
    labels = {"rule": "default/r/0", "target": "shadow"}
    assert metrics.registry.get_sample_value("mirror_sampler_decisions_total", {**labels, "outcome": "capped"}) == 7
    assert metrics.registry.get_sample_value("mirror_sampler_decisions_total", {**labels, "outcome": "mirrored"}) == 3


def test_rate_cap_environment_default_and_errors() -> None:
    p = policy(MIRROR_MAX_MIRRORS_PER_SECOND="50")
    assert p.rules[0].max_mirrors_per_second == 50.0
    assert (
        policy('{"mirror-sampler.io/max-mirrors-per-second": "5"}', MIRROR_MAX_MIRRORS_PER_SECOND="50").rules[0].max_mirrors_per_second
        == 5.0
    )
    with pytest.raises(ConfigError) as e:
        policy('{"mirror-sampler.io/max-mirrors-per-second": "-1"}')
    assert "metadata.annotations.mirror-sampler.io/max-mirrors-per-second" in e.value.problems[0]
    with pytest.raises(ConfigError) as e:
        Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_MAX_MIRRORS_PER_SECOND": "lots"})
    assert e.value.problems[0].startswith("MIRROR_MAX_MIRRORS_PER_SECOND")
    # Below one mirror in 11.6 days the dynamic module's bucket interval overflowed, and its cap was off.
    with pytest.raises(ConfigError) as e:
        policy('{"mirror-sampler.io/max-mirrors-per-second": "1e-11"}')
    assert "0.000001 <= rate" in e.value.problems[0]
    assert policy('{"mirror-sampler.io/max-mirrors-per-second": "0.000001"}').rules[0].max_mirrors_per_second == 0.000001


def test_rate_cap_is_refused_inline() -> None:
    from extproc.envoy.lua import unsupported

    assert unsupported(policy()) == []
    (problem,) = unsupported(policy('{"mirror-sampler.io/max-mirrors-per-second": "5"}'))
    assert "default/r/0" in problem and "--inline" in problem
