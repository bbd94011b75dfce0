"""Configuration: settings from environment and flags, HTTPRoute manifests with
GEP-3171 fractions, and validation that names every bad field at once."""

from __future__ import annotations

import contextlib
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from extproc.config.build import build_policy
from extproc.config.errors import ConfigError
from extproc.config.settings import OPTIONS, Settings
from extproc.convert import ConvertError
from extproc.convert.envoy import convert_envoy
from extproc.convert.kubernetes import load_documents
from extproc.core.keys import DEFAULT_KEY_CHAIN, KeyKind, KeySource
from extproc.core.plan import Plan
from extproc.core.policy import BackendRef, Policy
from extproc.core.sampling import Fraction
from tests.support.manifests import API, dump, httproute, mirror, routes_and_problems

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SRC = "routes.yaml"


def problems_of(env: dict[str, str], overrides: dict[str, str | None] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        Settings.load(env, overrides)
    assert str(e.value) == "\n".join(e.value.problems)
    return e.value.problems


# --------------------------------------------------------------------------
# Settings.


def test_defaults() -> None:
    s = Settings.load({"MIRROR_BACKEND": "shadow"})
    assert s.listen == "0.0.0.0:50051"
    assert s.config == ""
    assert s.backend == "shadow"
    assert s.percent is None and s.fraction is None
    assert s.primary == "backend"
    assert s.key == DEFAULT_KEY_CHAIN == (KeySource(KeyKind.HEADER, "x-request-id"),)
    assert s.salt == ""
    assert s.slot_prefix == "x-mirror-cluster-"
    assert s.slots == 2
    assert s.marker_header == "x-mirror-rule"
    assert s.metrics_listen == "0.0.0.0:9464"
    assert s.log_level == "info"
    assert s.log_format == "auto"
    assert s.shutdown_grace == 10.0
    pol = build_policy(s)
    assert pol.slot_names == ("x-mirror-cluster-0", "x-mirror-cluster-1")
    (target,) = pol.rules[0].mirrors
    assert (target.backend, target.fraction, target.slot) == ("shadow", Fraction(100, 100), 0)
    assert pol.rules[0].backends == (BackendRef("backend"),)


def test_every_option_has_env_and_flag() -> None:
    names = {o.name for o in OPTIONS}
    assert {
        "listen",
        "config",
        "backend",
        "percent",
        "fraction",
        "key",
        "salt",
        "slots",
        "metrics_listen",
        "log_level",
        "log_format",
        "shutdown_grace",
    } <= names
    for o in OPTIONS:
        assert o.env.startswith("MIRROR_") and o.flag and o.flag.startswith("--")
    assert len({o.env for o in OPTIONS}) == len(OPTIONS) == len({o.flag for o in OPTIONS})


ENV_CASES: list[tuple[str, str, str, Any]] = [
    ("MIRROR_LISTEN", "127.0.0.1:6000", "listen", "127.0.0.1:6000"),
    ("MIRROR_LISTEN", "[::]:50051", "listen", "[::]:50051"),
    ("MIRROR_PERCENT", "42", "percent", 42),
    ("MIRROR_PERCENT", "0", "percent", 0),
    ("MIRROR_PERCENT", "100", "percent", 100),
    ("MIRROR_FRACTION", "5/1000", "fraction", Fraction(5, 1000)),
    ("MIRROR_FRACTION", "0/1", "fraction", Fraction(0, 1)),
    ("MIRROR_FRACTION", "3/3", "fraction", Fraction(3, 3)),
    ("MIRROR_PRIMARY", "web", "primary", "web"),
    (
        "MIRROR_KEY",
        "header:X-User, cookie:session,query:uid,traceparent",
        "key",
        (
            KeySource(KeyKind.HEADER, "x-user"),
            KeySource(KeyKind.COOKIE, "session"),
            KeySource(KeyKind.QUERY, "uid"),
            KeySource(KeyKind.TRACEPARENT),
        ),
    ),
    ("MIRROR_SALT", "v2", "salt", "v2"),
    ("MIRROR_SLOT_PREFIX", "X-Shadow-", "slot_prefix", "x-shadow-"),
    ("MIRROR_SLOTS", "1", "slots", 1),
    ("MIRROR_SLOTS", "8", "slots", 8),
    ("MIRROR_MARKER_HEADER", "X-Mirrored-By", "marker_header", "x-mirrored-by"),
    ("MIRROR_METRICS_LISTEN", "off", "metrics_listen", ""),
    ("MIRROR_METRICS_LISTEN", "OFF", "metrics_listen", ""),
    ("MIRROR_METRICS_LISTEN", "none", "metrics_listen", ""),
    ("MIRROR_METRICS_LISTEN", "127.0.0.1:9999", "metrics_listen", "127.0.0.1:9999"),
    ("MIRROR_LOG_LEVEL", "debug", "log_level", "debug"),
    ("MIRROR_LOG_LEVEL", "WARNING", "log_level", "warning"),
    ("MIRROR_LOG_LEVEL", "error", "log_level", "error"),
    ("MIRROR_LOG_FORMAT", "json", "log_format", "json"),
    ("MIRROR_LOG_FORMAT", "console", "log_format", "console"),
    ("MIRROR_SHUTDOWN_GRACE", "2.5", "shutdown_grace", 2.5),
    ("MIRROR_SHUTDOWN_GRACE", "0", "shutdown_grace", 0.0),
]


@pytest.mark.parametrize(("env", "value", "field", "expected"), ENV_CASES)
def test_env_parsed(env: str, value: str, field: str, expected: Any) -> None:
    s = Settings.load({"MIRROR_BACKEND": "shadow", env: value})
    assert getattr(s, field) == expected


@pytest.mark.parametrize(("env", "value", "field", "expected"), ENV_CASES)
def test_flag_parsed_and_beats_env(env: str, value: str, field: str, expected: Any) -> None:
    opt = next(o for o in OPTIONS if o.env == env)
    other = {
        "MIRROR_PERCENT": "7",
        "MIRROR_FRACTION": "7/9",
        "MIRROR_SLOTS": "3",
        "MIRROR_METRICS_LISTEN": "1.2.3.4:5",
        "MIRROR_LISTEN": "1.2.3.4:5",
        "MIRROR_KEY": "traceparent",
        "MIRROR_LOG_LEVEL": "info",
        "MIRROR_LOG_FORMAT": "auto",
        "MIRROR_SHUTDOWN_GRACE": "9",
    }.get(env, "from-env")
    if env in ("MIRROR_SLOT_PREFIX", "MIRROR_MARKER_HEADER"):
        other = "x-from-env"
    s = Settings.load({"MIRROR_BACKEND": "shadow", env: other}, {opt.name: value})
    assert getattr(s, field) == expected


def test_config_from_env_and_flag() -> None:
    assert Settings.load({"MIRROR_CONFIG": "/etc/routes.yaml"}).config == "/etc/routes.yaml"
    assert Settings.load({"MIRROR_CONFIG": "/etc/a.yaml"}, {"config": "/etc/b.yaml"}).config == "/etc/b.yaml"
    assert Settings.load({}, {"config": "/etc/b.yaml"}).config == "/etc/b.yaml"
    assert Settings.load({"MIRROR_BACKEND": "a"}, {"backend": "b"}).backend == "b"


def test_none_override_falls_back_to_env() -> None:
    s = Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_SLOTS": "4"}, {"slots": None})
    assert s.slots == 4


def test_empty_percent_and_fraction_mean_unset() -> None:
    s = Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "", "MIRROR_FRACTION": ""})
    assert s.percent is None and s.fraction is None


ENV_ERRORS = [
    ("MIRROR_LISTEN", "nohost", "HOST:PORT"),
    ("MIRROR_LISTEN", "localhost:99999", "0..65535"),
    ("MIRROR_LISTEN", "localhost:http", "HOST:PORT"),
    ("MIRROR_PERCENT", "101", "0..100"),
    ("MIRROR_PERCENT", "-1", "0..100"),
    ("MIRROR_PERCENT", "4.5", "0..100"),
    ("MIRROR_PERCENT", "half", "0..100"),
    ("MIRROR_FRACTION", "5", "NUMERATOR/DENOMINATOR"),
    ("MIRROR_FRACTION", "a/b", "NUMERATOR/DENOMINATOR"),
    ("MIRROR_FRACTION", "0.5", "NUMERATOR/DENOMINATOR"),
    ("MIRROR_FRACTION", "5/0", "denominator must be >= 1"),
    ("MIRROR_FRACTION", "-1/5", "numerator must be >= 0"),
    ("MIRROR_FRACTION", "6/5", "numerator must be <= denominator"),
    ("MIRROR_KEY", "bogus", "header:NAME"),
    ("MIRROR_KEY", "header:", "name"),
    ("MIRROR_KEY", ",", "header:x-request-id"),
    ("MIRROR_KEY", "header:a,header:A", "twice"),
    ("MIRROR_SLOT_PREFIX", "x-envoy-mirror-", "not x-envoy-*"),
    ("MIRROR_SLOT_PREFIX", "bad prefix", "header name"),
    ("MIRROR_SLOT_PREFIX", ":path", "header name"),
    ("MIRROR_MARKER_HEADER", "host", "header name"),
    ("MIRROR_SLOTS", "0", "1..8"),
    ("MIRROR_SLOTS", "9", "1..8"),
    ("MIRROR_SLOTS", "two", "1..8"),
    ("MIRROR_METRICS_LISTEN", "nope", "HOST:PORT"),
    ("MIRROR_LOG_LEVEL", "loud", "debug, info, warning, error"),
    ("MIRROR_LOG_FORMAT", "xml", "auto, json, console"),
    ("MIRROR_SHUTDOWN_GRACE", "-1", "0..3600"),
    ("MIRROR_SHUTDOWN_GRACE", "4000", "0..3600"),
    ("MIRROR_SHUTDOWN_GRACE", "nan", "0..3600"),
    ("MIRROR_SHUTDOWN_GRACE", "soon", "seconds"),
]


@pytest.mark.parametrize(("env", "value", "allowed"), ENV_ERRORS)
def test_env_error_names_variable_and_allowed(env: str, value: str, allowed: str) -> None:
    (problem,) = problems_of({"MIRROR_BACKEND": "shadow", env: value})
    assert problem.startswith(f"{env}: ")
    assert allowed in problem


@pytest.mark.parametrize(("env", "value", "allowed"), ENV_ERRORS)
def test_flag_error_names_flag(env: str, value: str, allowed: str) -> None:
    opt = next(o for o in OPTIONS if o.env == env)
    (problem,) = problems_of({"MIRROR_BACKEND": "shadow"}, {opt.name: value})
    assert problem.startswith(f"{opt.flag}: ")
    assert allowed in problem


def test_all_setting_errors_reported_at_once() -> None:
    problems = problems_of(
        {"MIRROR_BACKEND": "shadow", "MIRROR_SLOTS": "0", "MIRROR_LOG_LEVEL": "loud", "MIRROR_PERCENT": "200"}, {"listen": "bad"}
    )
    assert len(problems) == 4
    assert {p.split(":")[0] for p in problems} == {"MIRROR_SLOTS", "MIRROR_LOG_LEVEL", "MIRROR_PERCENT", "--listen"}


def test_every_worker_metrics_port_must_exist() -> None:
    """Worker i serves metrics on MIRROR_METRICS_LISTEN's port + i: the last one
    must be a port, checked with the settings, not when worker 1 fails to start."""
    (p,) = problems_of({"MIRROR_BACKEND": "shadow", "MIRROR_WORKERS": "2", "MIRROR_METRICS_LISTEN": "127.0.0.1:65535"})
    assert p.startswith("MIRROR_METRICS_LISTEN: ") and "MIRROR_WORKERS=2" in p and "at most 65534" in p
    (p,) = problems_of({"MIRROR_BACKEND": "shadow"}, {"workers": "64", "metrics_listen": "[::1]:65500"})
    assert p.startswith("MIRROR_METRICS_LISTEN: ") and "at most 65472" in p
    for env in (
        {"MIRROR_WORKERS": "2", "MIRROR_METRICS_LISTEN": "127.0.0.1:65534"},
        {"MIRROR_WORKERS": "64", "MIRROR_METRICS_LISTEN": "127.0.0.1:0"},  # 0: any free port, each worker its own
        {"MIRROR_WORKERS": "64", "MIRROR_METRICS_LISTEN": "off"},
        {"MIRROR_WORKERS": "1", "MIRROR_METRICS_LISTEN": "127.0.0.1:65535"},
    ):
        assert Settings.load({"MIRROR_BACKEND": "shadow", **env}).workers == int(env["MIRROR_WORKERS"])


def test_mode_backend_and_config() -> None:
    (p,) = problems_of({"MIRROR_BACKEND": "shadow", "MIRROR_CONFIG": "routes.yaml"})
    assert "MIRROR_BACKEND" in p and "MIRROR_CONFIG" in p
    (p,) = problems_of({"MIRROR_BACKEND": "shadow"}, {"config": "routes.yaml"})
    assert "MIRROR_BACKEND" in p and "MIRROR_CONFIG" in p


@pytest.mark.parametrize("env", [{"MIRROR_PERCENT": "5"}, {"MIRROR_FRACTION": "1/2"}])
def test_mode_simple_settings_with_config(env: dict[str, str]) -> None:
    (p,) = problems_of({"MIRROR_CONFIG": "routes.yaml", **env})
    assert next(iter(env)) in p and "MIRROR_CONFIG" in p


@pytest.mark.parametrize("env", [{"MIRROR_PERCENT": "5"}, {"MIRROR_FRACTION": "1/2"}, {"MIRROR_PERCENT": "5", "MIRROR_FRACTION": "1/2"}])
def test_mode_percent_without_backend(env: dict[str, str]) -> None:
    (p,) = problems_of(env)
    assert "MIRROR_BACKEND" in p
    for k in env:
        assert k in p


def test_mode_nothing_set() -> None:
    (p,) = problems_of({})
    assert "MIRROR_BACKEND" in p and "MIRROR_CONFIG" in p
    (p,) = problems_of({"MIRROR_SALT": "x", "MIRROR_KEY": "traceparent"})
    assert "nothing to mirror" in p


def test_mode_backend_equals_primary() -> None:
    (p,) = problems_of({"MIRROR_BACKEND": "web", "MIRROR_PRIMARY": "web"})
    assert "MIRROR_BACKEND" in p and "MIRROR_PRIMARY" in p


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, Fraction(100, 100)),
        ({"MIRROR_PERCENT": "42"}, Fraction(42, 100)),
        ({"MIRROR_PERCENT": "0"}, Fraction(0, 100)),
        ({"MIRROR_FRACTION": "5/1000"}, Fraction(5, 1000)),
        ({"MIRROR_FRACTION": "0/7"}, Fraction(0, 7)),
        ({"MIRROR_PERCENT": "42", "MIRROR_FRACTION": "5/1000"}, Fraction(5, 1000)),  # fraction wins
    ],
)
def test_simple_mode_fraction(env: dict[str, str], expected: Fraction) -> None:
    pol = build_policy(Settings.load({"MIRROR_BACKEND": "shadow", **env}))
    assert pol.rules[0].mirrors[0].fraction == expected


def test_simple_mode_policy_carries_global_settings() -> None:
    s = Settings.load(
        {
            "MIRROR_BACKEND": "shadow",
            "MIRROR_PRIMARY": "web",
            "MIRROR_KEY": "cookie:sid",
            "MIRROR_SALT": "v2",
            "MIRROR_SLOT_PREFIX": "x-shadow-",
            "MIRROR_SLOTS": "3",
            "MIRROR_MARKER_HEADER": "x-by",
        }
    )
    pol = build_policy(s)
    assert pol.key_chain == (KeySource(KeyKind.COOKIE, "sid"),)
    assert pol.salt == b"v2"
    assert pol.slot_names == ("x-shadow-0", "x-shadow-1", "x-shadow-2")
    assert pol.slot_headers.marker == "x-by"
    assert pol.rules[0].backends == (BackendRef("web"),)
    d = Plan(pol).trace({":path": b"/", ":authority": b"h", "cookie": b"sid=alice"})
    assert d.key == b"alice" and d.u == 2539909752279064467


def test_route_mode_needs_manifest_text() -> None:
    with pytest.raises(ConfigError) as e:
        build_policy(Settings.load({"MIRROR_CONFIG": "routes.yaml"}))
    assert "MIRROR_CONFIG" in e.value.problems[0]


# --------------------------------------------------------------------------
# HTTPRoute manifests.


def doc(
    *rules: dict[str, Any], name: str = "web", namespace: str | None = "team-a", api: str = API, hostnames: list[str] | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {"parentRefs": [{"name": "gw"}]}
    if hostnames is not None:
        spec["hostnames"] = hostnames
    return httproute(*rules, name=name, namespace=namespace, api=api, **spec)


def mrule(*filters: dict[str, Any], backend: str = "web") -> dict[str, Any]:
    return {"backendRefs": [{"name": backend, "port": 8080}], "filters": list(filters)}


def parse(*docs: dict[str, Any] | str, slots: int = 2) -> tuple[list[Any], list[str]]:
    return routes_and_problems(dump(*docs), SRC, slots)


def only_fraction(**fields: Any) -> Fraction:
    routes, problems = parse(doc(mrule(mirror(**fields))))
    assert problems == []
    fraction: Fraction = routes[0].rules[0].mirrors[0].fraction
    return fraction


def only_problem(*docs: dict[str, Any] | str, slots: int = 2) -> str:
    _, problems = parse(*docs, slots=slots)
    assert len(problems) == 1, problems
    return problems[0]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, Fraction(100, 100)),  # neither: 100%
        ({"percent": 42}, Fraction(42, 100)),
        ({"percent": 0}, Fraction(0, 100)),
        ({"percent": 100}, Fraction(100, 100)),
        ({"fraction": {"numerator": 5, "denominator": 1000}}, Fraction(5, 1000)),
        ({"fraction": {"numerator": 5}}, Fraction(5, 100)),  # denominator defaults to 100
        ({"fraction": {"numerator": 0, "denominator": 1}}, Fraction(0, 1)),
        ({"fraction": {"numerator": 7, "denominator": 7}}, Fraction(7, 7)),
        ({"percent": None}, Fraction(100, 100)),
        ({"fraction": None, "percent": 20}, Fraction(20, 100)),
    ],
)
def test_gep3171_fraction_semantics(fields: dict[str, Any], expected: Fraction) -> None:
    assert only_fraction(**fields) == expected


FIELD = "spec.rules[0].filters[0].requestMirror"

FRACTION_ERRORS = [
    ({"percent": -1}, f"{FIELD}.percent", "0..100"),
    ({"percent": 101}, f"{FIELD}.percent", "0..100"),
    ({"percent": "50"}, f"{FIELD}.percent", "0..100"),
    ({"percent": 50.5}, f"{FIELD}.percent", "0..100"),
    ({"percent": True}, f"{FIELD}.percent", "0..100"),
    ({"percent": False}, f"{FIELD}.percent", "0..100"),
    ({"fraction": {"numerator": 1, "denominator": 0}}, f"{FIELD}.fraction.denominator", ">= 1"),
    ({"fraction": {"numerator": 0, "denominator": -5}}, f"{FIELD}.fraction.denominator", ">= 1"),
    ({"fraction": {"numerator": 1, "denominator": "10"}}, f"{FIELD}.fraction.denominator", ">= 1"),
    ({"fraction": {"numerator": 1, "denominator": True}}, f"{FIELD}.fraction.denominator", ">= 1"),
    ({"fraction": {"numerator": -1, "denominator": 10}}, f"{FIELD}.fraction.numerator", ">= 0"),
    ({"fraction": {"numerator": 1.5, "denominator": 10}}, f"{FIELD}.fraction.numerator", ">= 0"),
    ({"fraction": {"numerator": "5", "denominator": 10}}, f"{FIELD}.fraction.numerator", ">= 0"),
    ({"fraction": {"numerator": 11, "denominator": 10}}, f"{FIELD}.fraction", "numerator must be <= denominator"),
    # The CRD (not the GEP's draft): numerator has no default; both fields together are refused.
    ({"fraction": {"denominator": 50}}, f"{FIELD}.fraction.numerator", "is required"),
    ({"fraction": {"denominator": 1000}}, f"{FIELD}.fraction.numerator", "is required"),
    ({"fraction": {}}, f"{FIELD}.fraction.numerator", "is required"),
    (
        {"fraction": {"numerator": 5, "denominator": 1000}, "percent": 42},
        FIELD,
        "Only one of percent or fraction may be specified in HTTPRequestMirrorFilter",
    ),
    ({"percent": 42, "fraction": {"numerator": 1, "denominator": 3}}, FIELD, "Only one of percent or fraction may be specified"),
    ({"fraction": {"numerator": 1, "denominator": 10, "percent": 5}}, f"{FIELD}.fraction.percent", "unknown field"),
    ({"fraction": {"numerator": 1, "denominator": 10, "Denominator": 5}}, f"{FIELD}.fraction.Denominator", "unknown field"),
    ({"fraction": 5}, f"{FIELD}.fraction", "mapping"),
    ({"fraction": "5/1000"}, f"{FIELD}.fraction", "mapping"),
    ({"fraction": [5, 1000]}, f"{FIELD}.fraction", "mapping"),
]


@pytest.mark.parametrize(("fields", "path", "allowed"), FRACTION_ERRORS)
def test_fraction_validation_names_manifest_route_and_field(fields: dict[str, Any], path: str, allowed: str) -> None:
    problem = only_problem(doc(mrule(mirror(**fields))))
    assert problem.startswith(f"{SRC} (document 1): HTTPRoute team-a/web: {path}: "), problem
    assert allowed in problem


def test_fraction_error_in_later_rule_and_filter_has_exact_path() -> None:
    d = doc(mrule(mirror("a")), mrule(mirror("a"), mirror("b", percent=200)))
    problem = only_problem(d)
    assert "spec.rules[1].filters[1].requestMirror.percent" in problem
    assert "team-a/web" in problem and SRC in problem


def test_default_namespace_in_problem() -> None:
    problem = only_problem(doc(mrule(mirror(percent=-3)), namespace=None))
    assert "HTTPRoute default/web:" in problem


def test_invalid_route_is_not_loaded() -> None:
    routes, problems = parse(doc(mrule(mirror(percent=101))), doc(mrule(mirror()), name="ok"))
    assert [r.name for r in routes] == ["ok"]
    assert len(problems) == 1
    with pytest.raises(ConfigError) as e:
        build_policy(Settings.load({"MIRROR_CONFIG": SRC}), dump(doc(mrule(mirror(percent=101))), doc(mrule(mirror()), name="ok")))
    assert e.value.problems == problems


def test_two_bad_fields_two_problems() -> None:
    d = doc(mrule(mirror("a", percent=101), mirror("b", fraction={"numerator": 1, "denominator": 0})))
    routes, problems = parse(d)
    assert routes == []
    assert len(problems) == 2
    assert any(f"{FIELD}.percent" in p for p in problems)
    assert any("spec.rules[0].filters[1].requestMirror.fraction.denominator" in p for p in problems)


def test_errors_across_rules_and_documents_all_reported() -> None:
    d1 = doc(mrule(mirror(percent=-1)), mrule(mirror(fraction={"numerator": 2, "denominator": 1})))
    d2 = doc(mrule(mirror(percent="x")), name="other")
    routes, problems = parse(d1, d2)
    assert routes == [] and len(problems) == 3
    assert any("(document 1)" in p and "spec.rules[0]" in p for p in problems)
    assert any("(document 1)" in p and "spec.rules[1]" in p for p in problems)
    assert any("(document 2)" in p and "team-a/other" in p for p in problems)


def test_numerator_and_denominator_both_bad_two_problems() -> None:
    routes, problems = parse(doc(mrule(mirror(fraction={"numerator": -1, "denominator": 0}))))
    assert routes == [] and len(problems) == 2
    assert any(".fraction.numerator" in p for p in problems) and any(".fraction.denominator" in p for p in problems)


def test_bad_percent_and_bad_fraction_in_one_mirror_three_problems() -> None:
    """Both fields are invalid, and may not be given together; reporting only the
    first hides the others until the next deploy."""
    routes, problems = parse(doc(mrule(mirror(percent=101, fraction={"numerator": 1, "denominator": 0}))))
    assert routes == [] and len(problems) == 3, problems
    assert any(f"{FIELD}: Only one of percent or fraction" in p for p in problems)
    assert any(f"{FIELD}.percent" in p for p in problems)
    assert any(f"{FIELD}.fraction.denominator" in p for p in problems)


def test_same_backend_twice_in_one_rule() -> None:
    problem = only_problem(doc(mrule(mirror("shadow", percent=10), mirror("shadow", percent=20))))
    assert "team-a/web/0" in problem
    assert "spec.rules[0].filters[1]" in problem
    assert "'shadow'" in problem


def test_same_backend_in_two_rules_is_fine() -> None:
    routes, problems = parse(doc(mrule(mirror("shadow")), mrule(mirror("shadow"))))
    assert problems == [] and len(routes[0].rules) == 2


def test_two_different_backends_in_one_rule_get_slots_in_order() -> None:
    routes, problems = parse(doc(mrule(mirror("b", percent=35), mirror("a", percent=50))))
    assert problems == []
    assert [(t.backend, t.slot, t.fraction) for t in routes[0].rules[0].mirrors] == [("b", 0, Fraction(35)), ("a", 1, Fraction(50))]


def test_more_mirrors_than_slots() -> None:
    d = doc(mrule(mirror("a"), mirror("b"), mirror("c")))
    problem = only_problem(d)
    assert "spec.rules[0].filters" in problem and "team-a/web/0" in problem and "3 mirrors" in problem
    assert "MIRROR_SLOTS" in problem
    routes, problems = parse(d, slots=3)
    assert problems == [] and len(routes[0].rules[0].mirrors) == 3
    with pytest.raises(ConfigError):
        build_policy(Settings.load({"MIRROR_CONFIG": SRC}), dump(d))
    pol = build_policy(Settings.load({"MIRROR_CONFIG": SRC, "MIRROR_SLOTS": "3"}), dump(d))
    assert len(pol.rules[0].mirrors) == 3


def test_mirror_to_own_primary_backend() -> None:
    problem = only_problem(doc(mrule(mirror("web"), backend="web")))
    assert "spec.rules[0].backendRefs[0]" in problem and "'web'" in problem


def test_invalid_yaml_names_line() -> None:
    text = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: x\n spec: {\n"
    routes, problems = routes_and_problems(text, SRC)
    assert routes == []
    (p,) = problems
    assert p.startswith(f"{SRC}: not valid YAML at line 5")
    (p,) = routes_and_problems("a: [1, 2\nb: 3\n", SRC)[1]
    assert "line 2" in p


def test_one_message_for_invalid_yaml_in_manifests_envoy_files_and_converter_input(tmp_path: Path) -> None:
    """The strict parser, ``convert envoy``'s reader and the Kubernetes
    converters' reader say the same thing about the same broken text."""
    text = "a: [1, 2\nb: 3\n"
    (from_manifests,) = routes_and_problems(text, SRC)[1]
    path = tmp_path / SRC
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConvertError) as from_envoy:
        convert_envoy([path])
    with pytest.raises(ConvertError) as from_kubernetes:
        load_documents(text, SRC)
    assert from_manifests.startswith(f"{SRC}: not valid YAML at line 2, column 2: ")
    assert from_kubernetes.value.problems == [from_manifests]
    assert from_envoy.value.problems == [from_manifests.replace(SRC, str(path), 1)]


def test_a_convert_error_is_a_config_error() -> None:
    """One hierarchy: whatever reports a ConfigError (the CLI: exit code 2)
    reports a ConvertError alike."""
    with pytest.raises(ConfigError) as e:
        load_documents("- [", SRC)
    assert isinstance(e.value, ConvertError)
    assert str(e.value) == "\n".join(e.value.problems)


@pytest.mark.parametrize("api", ["gateway.networking.k8s.io/v1alpha2", "v1", None, "gateway.networking.k8s.io/v2"])
def test_wrong_api_version(api: str | None) -> None:
    d = doc(mrule(mirror()))
    if api is None:
        del d["apiVersion"]
    else:
        d["apiVersion"] = api
    problem = only_problem(d)
    assert problem.startswith(f"{SRC} (document 1): apiVersion:")
    assert "gateway.networking.k8s.io/v1" in problem and "gateway.networking.k8s.io/v1beta1" in problem


def test_v1beta1_accepted() -> None:
    routes, problems = parse(doc(mrule(mirror()), api="gateway.networking.k8s.io/v1beta1"))
    assert problems == [] and len(routes) == 1


def test_duplicate_route() -> None:
    routes, problems = parse(doc(mrule(mirror())), doc(mrule(mirror("x"))))
    assert len(routes) == 1
    (p,) = problems
    assert "(document 2)" in p and "team-a/web" in p and "already defined" in p and "(document 1)" in p
    # Same name, other namespace: a different route.
    routes, problems = parse(doc(mrule(mirror())), doc(mrule(mirror()), namespace="team-b"))
    assert problems == [] and len(routes) == 2


def test_other_kinds_skipped() -> None:
    others = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "shadow"}, "spec": {"ports": [{"port": 80}]}},
        {"apiVersion": API, "kind": "Gateway", "metadata": {"name": "gw"}, "spec": {"listeners": []}},
        {"apiVersion": API, "kind": "GRPCRoute", "metadata": {"name": "g"}, "spec": {"rules": "not even valid"}},
    ]
    routes, problems = parse(others[0], doc(mrule(mirror())), others[1], others[2])
    assert problems == [] and [r.id for r in routes] == ["team-a/web"]
    # Empty documents are skipped too.
    routes, problems = routes_and_problems("---\n---\n" + dump(doc(mrule(mirror()))) + "---\n", SRC)
    assert problems == [] and len(routes) == 1


@pytest.mark.parametrize("text", ["", "---\n", "# only a comment\n", "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n"])
def test_no_httproute(text: str) -> None:
    routes, problems = routes_and_problems(text, SRC)
    assert routes == []
    (p,) = problems
    assert p.startswith(f"{SRC}: no HTTPRoute")


def test_non_mapping_document() -> None:
    problem = only_problem("- a\n- b\n", doc(mrule(mirror())))
    assert "(document 1)" in problem and "mapping" in problem


@pytest.mark.parametrize(
    ("rule", "path", "text"),
    [
        ({"filters": [{"type": "Bogus"}]}, "spec.rules[0].filters[0].type", "RequestMirror"),
        (
            {"filters": [{"type": "RequestMirror", "requestMirror": {"percent": 5}}]},
            "spec.rules[0].filters[0].requestMirror.backendRef",
            "required",
        ),
        (
            {"filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"port": 80}}}]},
            "spec.rules[0].filters[0].requestMirror.backendRef.name",
            "required",
        ),
        ({"matches": [{"path": {"type": "Prefix", "value": "/"}}]}, "spec.rules[0].matches[0].path.type", "PathPrefix"),
        ({"matches": [{"path": {"type": "PathPrefix", "value": "api"}}]}, "spec.rules[0].matches[0].path.value", "'/'"),
        (
            {"matches": [{"path": {"type": "RegularExpression", "value": "(unclosed"}}]},
            "spec.rules[0].matches[0].path.value",
            "regular expression",
        ),
        ({"matches": [{"headers": [{"name": "bad name", "value": "x"}]}]}, "spec.rules[0].matches[0].headers[0].name", "header name"),
        (
            {"matches": [{"headers": [{"name": "x", "value": "[", "type": "RegularExpression"}]}]},
            "spec.rules[0].matches[0].headers[0].value",
            "regular expression",
        ),
        ({"matches": [{"headers": [{"name": "x", "value": "v", "type": "Prefix"}]}]}, "spec.rules[0].matches[0].headers[0].type", "Exact"),
        ({"matches": [{"queryParams": [{"name": "q", "value": 5}]}]}, "spec.rules[0].matches[0].queryParams[0].value", "string"),
        ({"matches": [{"method": "FETCH"}]}, "spec.rules[0].matches[0].method", "GET"),
        ({"matches": "all"}, "spec.rules[0].matches", "list"),
        ({"backendRefs": [{"name": "web", "weight": -1}]}, "spec.rules[0].backendRefs[0].weight", "0..1000000"),
        ({"backendRefs": [{"name": "web", "port": 70000}]}, "spec.rules[0].backendRefs[0].port", "1..65535"),
    ],
)
def test_other_field_validation(rule: dict[str, Any], path: str, text: str) -> None:
    problem = only_problem(doc(rule))
    assert f"HTTPRoute team-a/web: {path}: " in problem, problem
    assert text in problem


def test_request_mirror_missing() -> None:
    routes, problems = parse(doc({"filters": [{"type": "RequestMirror"}]}))
    assert routes == []
    assert "HTTPRoute team-a/web: spec.rules[0].filters[0].requestMirror: is required" in problems[0]


@pytest.mark.parametrize(
    ("meta_or_spec", "path"),
    [
        ({"metadata": {"namespace": "x"}}, "metadata.name"),
        ({"metadata": {"name": "web", "namespace": "Bad_NS"}}, "metadata.namespace"),
        ({"spec": {"hostnames": ["Upper.Example"]}}, "spec.hostnames[0]"),
        ({"spec": {"hostnames": ["a..b"]}}, "spec.hostnames[0]"),
        ({"spec": {"hostnames": "one.example"}}, "spec.hostnames"),
        ({"spec": None}, "spec"),
    ],
)
def test_metadata_and_spec_validation(meta_or_spec: dict[str, Any], path: str) -> None:
    d = doc(mrule(mirror()))
    for k, v in meta_or_spec.items():
        if isinstance(v, dict) and k == "spec":
            d["spec"].update(v)
        elif v is None:
            del d[k]
        else:
            d[k] = v
    problem = only_problem(d)
    assert f": {path}: " in problem, problem


def test_header_modifier_parsed() -> None:
    flt = {
        "type": "RequestHeaderModifier",
        "requestHeaderModifier": {"set": [{"name": "X-Set", "value": "1"}], "add": [{"name": "X-Add", "value": "2"}], "remove": ["X-Rm"]},
    }
    routes, problems = parse(doc(mrule(flt, mirror())))
    assert problems == []
    hm = routes[0].rules[0].header_modifier
    assert hm is not None and hm.set == (("X-Set", "1"),) and hm.add == (("X-Add", "2"),) and hm.remove == ("X-Rm",)
    assert routes[0].rules[0].mirrors[0].slot == 0


def test_ignored_filter_types_accepted() -> None:
    modifier = {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"set": [{"name": "x-a", "value": "1"}]}}
    routes, problems = parse(doc(mrule({"type": "URLRewrite", "urlRewrite": {}}, modifier, mirror())))
    assert problems == [] and len(routes[0].rules[0].mirrors) == 1


def test_ignored_filter_type_needs_its_configuration_field() -> None:
    """The CRD: filter.responseHeaderModifier must be specified for ResponseHeaderModifier filter.type."""
    problem = only_problem(doc(mrule({"type": "ResponseHeaderModifier"}, mirror())))
    assert "HTTPRoute team-a/web: spec.rules[0].filters[0].responseHeaderModifier: is required" in problem


def test_route_fields() -> None:
    d = doc(mrule(mirror()), hostnames=["a.example", "*.b.example", "a.example"])
    d["metadata"]["creationTimestamp"] = "2024-01-01T00:00:00Z"
    d["spec"]["rules"][0]["backendRefs"] = [{"name": "web", "port": 8080, "weight": 3}, {"name": "web2"}]
    (r,), problems = parse(d)
    assert problems == []
    assert (r.namespace, r.name, r.id) == ("team-a", "web", "team-a/web")
    assert r.hostnames == ("a.example", "*.b.example")
    assert r.creation_timestamp == "2024-01-01T00:00:00.000000Z"
    assert r.rules[0].id == "team-a/web/0"
    assert r.rules[0].backends == (BackendRef("web", 8080, 3), BackendRef("web2", None, 1))


def test_route_without_rules_matches_everything() -> None:
    d = doc()
    del d["spec"]["rules"]
    (r,), problems = parse(d)
    assert problems == [] and len(r.rules) == 1 and r.rules[0].mirrors == ()


# --------------------------------------------------------------------------
# Robustness: garbage never raises, it comes back as problems.


def check_no_raise(text: str) -> None:
    routes, problems = routes_and_problems(text, SRC)
    assert isinstance(routes, list) and isinstance(problems, list)
    assert all(isinstance(p, str) and p for p in problems)
    assert routes or problems
    if not problems:
        pol = Policy(tuple(routes), DEFAULT_KEY_CHAIN)
        for headers in (
            {":path": b"/", ":authority": b"a.example", "x-request-id": b"k"},
            {":path": b"/a/b?q=1", ":authority": b"x.example:80", ":method": b"POST", "x": b"v", "x-h": b"v"},
        ):
            Plan(pol).trace(headers)


@pytest.mark.parametrize("text", ["a: 2024-13-45", "- 2023-02-29"])
def test_impossible_yaml_timestamps_never_raise(text: str) -> None:
    """PyYAML's timestamp constructor raises ValueError (not YAMLError) for impossible dates."""
    check_no_raise(text)


@FAST
@given(text=st.text(max_size=300))
@example(text="{[")
@example(text="\t- x")
@example(text="a: !!python/object:os.system ls")
@example(text="a: !!binary 'zz'")
@example(text="&a [*a]")
def test_garbage_text_never_raises(text: str) -> None:
    check_no_raise(text)


VOCAB = st.sampled_from(
    [
        "apiVersion",
        "kind",
        "metadata",
        "name",
        "namespace",
        "spec",
        "rules",
        "matches",
        "path",
        "type",
        "value",
        "headers",
        "queryParams",
        "method",
        "filters",
        "requestMirror",
        "backendRef",
        "backendRefs",
        "percent",
        "fraction",
        "numerator",
        "denominator",
        "hostnames",
        "weight",
        "port",
        "requestHeaderModifier",
        "set",
        "add",
        "remove",
        "creationTimestamp",
    ]
)
LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "Exact",
            "PathPrefix",
            "RegularExpression",
            "RequestMirror",
            "RequestHeaderModifier",
            "/",
            "/a",
            "GET",
            "web",
            "*.example.com",
            "example.com",
            "HTTPRoute",
            API,
            "(",
            "[a-z]+",
            "a{4294967296}",
        ]
    ),
)
VALUE = st.recursive(
    LEAF,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(VOCAB | st.text(max_size=5), children, max_size=5)),
    max_leaves=30,
)


@FAST
@given(metadata=VALUE, spec=VALUE)
def test_garbage_route_structures_never_raise(metadata: Any, spec: Any) -> None:
    d = {"apiVersion": API, "kind": "HTTPRoute", "metadata": metadata, "spec": spec}
    check_no_raise(yaml.safe_dump(d))


@FAST
@given(rules=st.lists(VALUE, max_size=3), name=st.sampled_from(["web", "x", None, 5]))
def test_garbage_rules_never_raise(rules: list[Any], name: Any) -> None:
    d = {"apiVersion": API, "kind": "HTTPRoute", "metadata": {"name": name}, "spec": {"rules": rules}}
    check_no_raise(yaml.safe_dump(d))


@FAST
@given(
    mirror_fields=st.dictionaries(st.sampled_from(["percent", "fraction", "backendRef", "other"]), VALUE, max_size=3),
    fraction=st.dictionaries(st.sampled_from(["numerator", "denominator", "x"]), LEAF, max_size=3),
)
def test_garbage_mirror_filters_never_raise(mirror_fields: dict[str, Any], fraction: dict[str, Any]) -> None:
    rm = {"backendRef": {"name": "shadow"}, **mirror_fields}
    rm.setdefault("fraction", fraction)
    d = doc({"filters": [{"type": "RequestMirror", "requestMirror": rm}]})
    check_no_raise(yaml.safe_dump(d))


def test_invalid_yaml_timestamp_is_a_problem() -> None:
    """PyYAML raises ValueError (not YAMLError) for timestamps like 2024-13-45."""
    text = textwrap.dedent(f"""\
        apiVersion: {API}
        kind: HTTPRoute
        metadata:
          name: web
          creationTimestamp: 2024-13-45
        spec:
          rules: [{{}}]
    """)
    routes, problems = routes_and_problems(text, SRC)
    assert routes == [] and len(problems) == 1
    assert problems[0].startswith(f"{SRC} (document 1): HTTPRoute default/web: metadata.creationTimestamp: ")


@pytest.mark.parametrize("value", ["yesterday", "2024-06-01T25:00:00Z", 5])
def test_bad_creation_timestamp_is_a_problem(value: object) -> None:
    d = doc(mrule(mirror()))
    d["metadata"]["creationTimestamp"] = value
    problem = only_problem(d)
    assert "HTTPRoute team-a/web: metadata.creationTimestamp: " in problem


def test_regex_too_large_repeat_is_a_problem() -> None:
    """RE2 refuses repeat counts over 1000 (Envoy too); the field is named."""
    problem = only_problem(doc({"matches": [{"path": {"type": "RegularExpression", "value": "/a{1001}"}}]}))
    assert "spec.rules[0].matches[0].path.value" in problem
    problem = only_problem(doc({"matches": [{"headers": [{"name": "x", "value": "a{1001}", "type": "RegularExpression"}]}]}))
    assert "spec.rules[0].matches[0].headers[0].value" in problem


@pytest.mark.parametrize(
    "match",
    [
        {"path": {"type": "RegularExpression", "value": "/\ud800"}},
        {"path": {"type": "Exact", "value": "/\ud800"}},
        {"path": {"type": "PathPrefix", "value": "/\ud800"}},
        {"headers": [{"name": "x", "value": "\udcff"}]},
        {"queryParams": [{"name": "q", "value": "\udcff"}]},
    ],
)
def test_lone_surrogates_are_problems_not_crashes(match: dict[str, Any]) -> None:
    """YAML escapes ("\\ud800") yield strings that cannot be encoded as UTF-8 bytes;
    the manifest must be refused at load, not crash at load or on each request."""
    d = doc({"matches": [match]})
    text = yaml.safe_dump(d, allow_unicode=False)  # writes the escape, as a user would
    check_no_raise(text)


# --------------------------------------------------------------------------
# Environment fuzzing: any value of any variable is a ConfigError naming it, or valid.

env_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            "",
            " ",
            "0",
            "-1",
            "1e9",
            "nan",
            "inf",
            "5/0",
            "0/0",
            "101",
            "a:b",
            ":",
            "::1:80",
            "header:",
            "cookie:a=b",
            "traceparent,traceparent",
        ]
    ),
)


@FAST
@given(values=st.dictionaries(st.sampled_from([o.env for o in OPTIONS]), env_text, max_size=6))
def test_any_environment_is_valid_or_a_config_error_naming_a_variable(values: dict[str, str]) -> None:
    environ = {"MIRROR_BACKEND": "shadow", **values}
    try:
        s = Settings.load(environ)
    except ConfigError as e:
        assert e.problems
        names = {o.env for o in OPTIONS} | {o.flag for o in OPTIONS if o.flag}
        for problem in e.problems:
            assert any(n in problem for n in names), problem
        return
    # Valid settings build a policy (or a ConfigError for the file), nothing else.
    with contextlib.suppress(ConfigError):
        build_policy(s, "" if s.config else None)


# --------------------------------------------------------------------------
# What Envoy would refuse, or what would defeat the sampler, is refused up front.


@pytest.mark.parametrize(
    ("rule", "field", "words"),
    [
        ({"matches": [{"path": {"type": "PathPrefix", "value": "/a?b"}}]}, "matches[0].path.value", "'?'"),
        ({"matches": [{"path": {"type": "Exact", "value": "/a#b"}}]}, "matches[0].path.value", "'#'"),
        ({"matches": [{"headers": [{"name": "x", "value": "a\nb"}]}]}, "matches[0].headers[0].value", "control"),
        ({"backendRefs": [{"name": "Web Server"}]}, "backendRefs[0].name", "DNS-1123"),
        ({"backendRefs": [{"name": "mirror-sampler"}]}, "backendRefs[0].name", "sampler's own Envoy cluster"),
        (
            {
                "backendRefs": [{"name": "web"}],
                "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-a", "value": "a\r\nb"}]}}],
            },
            "filters[0].requestHeaderModifier.set[0].value",
            "control",
        ),
    ],
)
def test_envoy_refusals_are_config_problems(rule: dict[str, Any], field: str, words: str) -> None:
    problem = only_problem(doc(rule))
    assert f"spec.rules[0].{field}" in problem and words in problem


def test_route_name_must_be_a_dns_name() -> None:
    problem = only_problem(doc(mrule(mirror()), name="bad\nname"))
    assert "metadata.name" in problem and "DNS-1123" in problem


def test_one_backend_at_two_ports_is_refused() -> None:
    text = dump(doc(mrule(mirror("shadow")), {"backendRefs": [{"name": "web", "port": 9090}]}))
    with pytest.raises(ConfigError) as e:
        build_policy(Settings.load({"MIRROR_CONFIG": "r.yaml"}), text)
    assert any("backend 'web' at port 9090" in p and "team-a/web/0" in p for p in e.value.problems)


def test_header_modifier_may_not_touch_slot_or_marker_headers() -> None:
    modifier = {
        "type": "RequestHeaderModifier",
        "requestHeaderModifier": {"set": [{"name": "X-Mirror-Cluster-0", "value": "shadow"}], "remove": ["x-mirror-rule"]},
    }
    text = dump(doc(mrule(mirror(), modifier)))
    with pytest.raises(ConfigError) as e:
        build_policy(Settings.load({"MIRROR_CONFIG": "r.yaml"}), text)
    assert len([p for p in e.value.problems if "the sampler owns" in p]) == 2


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"MIRROR_MARKER_HEADER": "x-mirror-cluster-1"}, "MIRROR_MARKER_HEADER"),
        ({"MIRROR_MARKER_HEADER": "x-request-id"}, "MIRROR_MARKER_HEADER"),
        ({"MIRROR_KEY": "header:x-mirror-cluster-0,header:x-request-id"}, "MIRROR_KEY"),
        ({"MIRROR_KEY": "header:x-mirror-rule"}, "MIRROR_KEY"),
        ({"MIRROR_BACKEND": "Shadow Copy"}, "MIRROR_BACKEND"),
        ({"MIRROR_PRIMARY": "mirror-sampler"}, "MIRROR_PRIMARY"),
    ],
)
def test_self_defeating_settings_are_refused(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as e:
        Settings.load({"MIRROR_BACKEND": "shadow", **env})
    assert any(p.startswith(variable) for p in e.value.problems), e.value.problems


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("metadata: {labels: &a [*a]}", "aliases"),
        ("a: &x 1\nb: *x\n", "aliases"),
        ("[" * 5000, "nested too deeply"),
    ],
)
def test_yaml_aliases_and_deep_nesting_are_problems(text: str, words: str) -> None:
    routes, problems = parse(text)
    assert routes == [] and len(problems) == 1 and words in problems[0]


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_timestamp_out_of_range_after_offset(stamp: str) -> None:
    d = doc(mrule(mirror()))
    d["metadata"]["creationTimestamp"] = stamp
    problem = only_problem(d)
    assert "metadata.creationTimestamp" in problem and "out of range" in problem


def test_mirrors_of_a_rule_without_a_live_backend_are_never_decided() -> None:
    text = dump(doc({"filters": [mirror()]}))
    policy = build_policy(Settings.load({"MIRROR_CONFIG": "r.yaml"}), text)
    (rule,) = policy.rules
    assert rule.mirrors == ()
    assert Plan(policy).trace({":path": b"/", "x-request-id": b"alice"}).sampled == ()
