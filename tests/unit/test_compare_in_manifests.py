"""spec.compare in the sampler's own file: read by the one compare parser,
refused like any other field when invalid, ignored for the decision (pure)."""

from __future__ import annotations

import textwrap

import pytest

from extproc.compare.cli import parse_config_text
from extproc.compare.config import CompareConfig, RuleCompare, parse_compare
from extproc.config.build import build_policy
from extproc.config.errors import ConfigError
from extproc.config.manifests import parse_manifests
from extproc.config.settings import Settings
from extproc.config.summary import summarize

ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop, namespace: default}
spec:
  rules:
  - backendRefs: [{name: primary, port: 8080}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: candidate, port: 8081}, percent: 50}
    - type: RequestMirror
      requestMirror: {backendRef: {name: secondary, port: 8082}, percent: 50}
"""


def sampler_doc(spec: str) -> str:
    return "apiVersion: mirror-sampler.io/v1alpha1\nkind: MirrorSampler\nmetadata: {name: shop}\nspec:\n" + textwrap.indent(spec, "  ")


COMPARE = "compare:\n  rules:\n  - {rule: default/shop/0, secondary: secondary, ignore: [body.ts]}\n"


def with_compare(compare: str = COMPARE, mirroring: str = "") -> str:
    # The MirrorSampler document first: its rules are checked against routes defined after it.
    return sampler_doc(mirroring + compare) + "---\n" + ROUTE


def test_spec_compare_is_read_by_the_compare_parser_and_needs_no_mirroring() -> None:
    parsed = parse_manifests(with_compare(), "routes.yaml")
    assert parsed.problems == [] and parsed.enabled
    assert parsed.compare == parse_compare(
        {"rules": [{"rule": "default/shop/0", "secondary": "secondary", "ignore": ["body.ts"]}]},
        "x",
        {"default/shop/0": ("candidate", "secondary")},
    )
    rule = parsed.compare.rule("default/shop/0")
    assert rule.targets == ("candidate", "secondary"), "targets default to the rule's mirrors in the same file"


def test_the_kill_switch_and_compare_share_the_document() -> None:
    parsed = parse_manifests(with_compare(mirroring="mirroring: Disabled\n"), "routes.yaml")
    assert parsed.problems == [] and not parsed.enabled
    assert parsed.compare is not None and list(parsed.compare.rules) == ["default/shop/0"]


def test_a_file_without_compare_has_none() -> None:
    assert parse_manifests(ROUTE, "routes.yaml").compare is None


@pytest.mark.parametrize(
    ("compare", "problem"),
    [
        (
            "compare:\n  rulez: []\n",
            "routes.yaml (document 1): spec.compare.rulez: unknown field; did you mean rules?",
        ),
        (
            "compare:\n  rules:\n  - {rule: default/shop/1}\n",
            "routes.yaml (document 1): spec.compare.rules[0].rule: no rule 'default/shop/1' mirrors anything; did you mean default/shop/0?",
        ),
        (
            "compare:\n  rules:\n  - {rule: default/shop/0, targets: [candidat]}\n",
            "routes.yaml (document 1): spec.compare.rules[0].targets: 'candidat' is not a mirror target of default/shop/0; "
            "did you mean candidate?",
        ),
        (
            "compare:\n  bodyLimit: 0\n",
            "routes.yaml (document 1): spec.compare.bodyLimit: must be a whole number from 1 to 1000000000000, got 0",
        ),
        (
            "compare: [1]\n",
            "routes.yaml (document 1): spec.compare: must be a mapping, got list",
        ),
    ],
)
def test_an_invalid_compare_is_refused_by_the_sampler_with_its_field(compare: str, problem: str) -> None:
    text = with_compare(compare)
    assert parse_manifests(text, "routes.yaml").problems == [problem]
    with pytest.raises(ConfigError) as e:
        build_policy(Settings.load({"MIRROR_CONFIG": "routes.yaml"}), text)
    assert e.value.problems == [problem], "the sampler refuses it like any other field"


def test_a_sampler_document_with_neither_mirroring_nor_compare_is_refused() -> None:
    problems = parse_manifests(sampler_doc("{}\n") + "---\n" + ROUTE, "routes.yaml").problems
    assert problems == [
        "routes.yaml (document 1): spec.mirroring: must be Enabled or Disabled (optional in a document with spec.compare), got None"
    ]


def test_compare_given_twice_is_refused() -> None:
    text = with_compare() + "---\n" + sampler_doc(COMPARE)
    assert parse_manifests(text, "routes.yaml").problems == [
        "routes.yaml (document 3): spec.compare: given again (first in routes.yaml (document 1)); one MirrorSampler document carries it"
    ]


def test_the_decision_does_not_depend_on_compare() -> None:
    settings = Settings.load({"MIRROR_CONFIG": "routes.yaml"})
    with_it, without = build_policy(settings, with_compare()), build_policy(settings, ROUTE)
    assert with_it.rules == without.rules and with_it.enabled and without.enabled


def test_check_config_summary_shows_the_compare_settings() -> None:
    text = with_compare(
        "compare:\n  bodyLimit: 1024\n  privateHeaders: [X-Key]\n  rules:\n"
        "  - {rule: default/shop/0, targets: [candidate], ignore: [body.**.ts], ignoreHeaders: [x-by], tolerance: 0.5}\n"
    )
    settings = Settings.load({"MIRROR_CONFIG": "routes.yaml"})
    parsed = parse_manifests(text, "routes.yaml")
    summary = summarize(build_policy(settings, text), parsed.skipped, parsed.compare)
    assert summary.endswith(
        textwrap.dedent("""\
        compare: 1 rule(s) (the sampler does not act on it: envoy-config adds the capture points, `compare capture` judges; docs/compare.md)
          bodyLimit 1024 bytes, shadowTimeout 15s, joinTimeout 30s, values stored: no (paths only)
          retention: 100000 comparisons, 604800s, 10000 pending
          private headers: x-key
          rule default/shop/0: targets candidate; no secondary (every difference is real); margin 0.05
            ignore: body.**.ts
            ignore headers (beyond the defaults): x-by
            numbers equal within 0.5
        """)
    )
    assert "compare:" not in summarize(build_policy(settings, ROUTE), ())


# compare's own --config file: the same strict YAML as the sampler's


def test_the_observer_reads_compare_from_the_routes_file_itself() -> None:
    config = parse_config_text(with_compare(), "routes.yaml")
    assert config == parse_manifests(with_compare(), "routes.yaml").compare
    with pytest.raises(ConfigError) as e:
        parse_config_text(with_compare("compare:\n  rules:\n  - {rule: default/shop/1}\n"), "routes.yaml")
    assert "spec.compare.rules[0].rule: no rule 'default/shop/1' mirrors anything" in e.value.problems[0]


def test_a_file_of_its_own_reads_a_sampler_document_or_a_bare_mapping() -> None:
    expected = CompareConfig(rules={"r/x/0": RuleCompare(targets=("b",))}, only_listed=True)
    assert parse_config_text(sampler_doc("compare:\n  rules: [{rule: r/x/0, targets: [b]}]\n"), "c.yaml") == expected
    assert parse_config_text("compare:\n  rules: [{rule: r/x/0, targets: [b]}]\n", "c.yaml") == expected


@pytest.mark.parametrize(
    ("text", "problems"),
    [
        (
            "compare:\n  bodyLimit: 10\n  bodyLimit: 20\n",
            ["c.yaml (document 1): compare.bodyLimit: duplicate key 'bodyLimit' at line 3 (first at line 2)"],
        ),
        (
            sampler_doc("compare:\n  rules: []\n  rules: []\n"),
            ["c.yaml (document 1): spec.compare.rules: duplicate key 'rules' at line 7 (first at line 6)"],
        ),
        ("compare:\n  rules: [\n", ["c.yaml: not valid YAML at line 3, column 1: expected the node content, but found '<stream end>'"]),
        (
            sampler_doc("compare: {}\nmirorring: Enabled\n"),
            ["c.yaml (document 1): spec.mirorring: unknown field; did you mean mirroring?"],
        ),
        (
            "compare: {}\ncomapre: {}\n",
            ["c.yaml (document 1): comapre: unknown field; a compare settings document has only compare"],
        ),
        ("kind: Service\n", ["--config c.yaml: no MirrorSampler document with spec.compare, and no compare: mapping"]),
    ],
)
def test_a_file_of_its_own_is_read_as_strictly_as_the_sampler_reads(text: str, problems: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config_text(text, "c.yaml")
    assert e.value.problems == problems


def test_the_routes_file_is_read_with_the_samplers_slot_count() -> None:
    three = with_compare().replace(
        "      requestMirror: {backendRef: {name: secondary, port: 8082}, percent: 50}\n",
        "      requestMirror: {backendRef: {name: secondary, port: 8082}, percent: 50}\n"
        "    - type: RequestMirror\n      requestMirror: {backendRef: {name: third, port: 8083}, percent: 50}\n",
    )
    with pytest.raises(ConfigError) as e:
        parse_config_text(three, "routes.yaml")
    assert "has 3 mirrors but only 2 slot headers (raise MIRROR_SLOTS)" in e.value.problems[0]
    assert parse_config_text(three, "routes.yaml", slots=3).rule("default/shop/0").targets == ("candidate", "secondary", "third")
