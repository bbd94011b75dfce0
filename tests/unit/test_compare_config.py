"""The compare settings, read strictly (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.compare.config import CompareConfig, parse_compare
from extproc.compare.differ import DEFAULT_IGNORED_HEADERS
from extproc.compare.paths import Pattern
from extproc.config.errors import ConfigError

MIRRORS = {"shop/web/0": ("candidate", "secondary")}


def problems(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_compare(data, "f.yaml", MIRRORS)
    return e.value.problems


def test_a_full_section_is_read() -> None:
    config = parse_compare(
        {
            "rules": [
                {
                    "rule": "shop/web/0",
                    "secondary": "secondary",
                    "ignore": ["body.**.ts", "header.etag"],
                    "ignoreHeaders": ["X-Trace"],
                    "tolerance": 0.01,
                    "margin": 0.1,
                }
            ],
            "bodyLimit": 1024,
            "storeValues": True,
            "privateHeaders": ["X-Token"],
            "shadowTimeout": "5s",
            "retention": {"maxComparisons": 10, "maxAge": "2h", "maxPending": 5, "joinTimeout": "10s"},
        },
        "f.yaml",
        MIRRORS,
    )
    rule = config.rule("shop/web/0")
    assert rule.targets == ("candidate", "secondary"), "the rule's mirrors by default"
    assert rule.secondary == "secondary" and rule.margin == 0.1
    assert rule.diff_rules.ignored == (Pattern.of("body.**.ts"), Pattern.of("header.etag"))
    assert rule.diff_rules.ignored_headers == DEFAULT_IGNORED_HEADERS | {"x-trace"}
    assert rule.diff_rules.tolerance == 0.01
    assert (config.body_limit, config.store_values, config.private_headers) == (1024, True, frozenset({"x-token"}))
    assert (config.retention.max_comparisons, config.retention.max_age_s, config.retention.max_pending) == (10, 7200.0, 5)
    assert config.retention.join_timeout_s == 10.0 and config.shadow_timeout_s == 5.0


def test_nothing_configured_compares_nothing() -> None:
    assert parse_compare(None, "f.yaml") == CompareConfig(only_listed=True)  # lists no rule: judges none


def test_unknown_fields_get_a_did_you_mean() -> None:
    assert problems({"rules": [{"rule": "shop/web/0", "secundary": "secondary"}], "retension": {}}) == [
        "f.yaml: compare.retension: unknown field; did you mean retention?",
        "f.yaml: compare.rules[0].secundary: unknown field; did you mean secondary?",
    ]


def test_rules_and_targets_must_exist() -> None:
    assert (
        problems({"rules": [{"rule": "shop/web/1"}]})[0]
        == "f.yaml: compare.rules[0].rule: no rule 'shop/web/1' mirrors anything; did you mean shop/web/0?"
    )
    assert problems({"rules": [{"rule": "shop/web/0", "targets": ["candidat"]}]}) == [
        "f.yaml: compare.rules[0].targets: 'candidat' is not a mirror target of shop/web/0; did you mean candidate?"
    ]
    assert problems({"rules": [{"rule": "shop/web/0", "targets": ["candidate"], "secondary": "secondary"}]}) == [
        "f.yaml: compare.rules[0].secondary: 'secondary' is not one of the compared targets"
    ]
    assert problems({"rules": [{"rule": "shop/web/0"}, {"rule": "shop/web/0"}]}) == [
        "f.yaml: compare.rules[1].rule: 'shop/web/0' is listed twice"
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"bodyLimit": 0}, "compare.bodyLimit: must be a whole number from 1 to 1000000000000, got 0"),
        ({"bodyLimit": 1048577}, "compare.bodyLimit: at most 1048576 bytes (a body travels base64 in one access log entry), got 1048577"),
        ({"storeValues": "yes"}, "compare.storeValues: must be true or false, got 'yes'"),
        ({"retention": {"maxAge": "7 days"}}, "compare.retention.maxAge: must be a duration such as 30s, 10m, 12h or 7d, got '7 days'"),
        ({"shadowTimeout": "²s"}, "compare.shadowTimeout: must be a duration such as 30s, 10m, 12h or 7d, got '²s'"),
        ({"rules": [{"rule": "shop/web/0", "margin": 2}]}, "compare.rules[0].margin: must be between 0 and 1, got 2"),
        (
            {"rules": [{"rule": "shop/web/0", "ignore": ["cookie.a"]}]},
            "compare.rules[0].ignore[0]: 'cookie.a': must start with status, header or body",
        ),
        ({"rules": "all"}, "compare.rules: must be a list"),
        # NaN passes every comparison: a NaN margin made every difference noise.
        ({"rules": [{"rule": "shop/web/0", "margin": float("nan")}]}, "compare.rules[0].margin: must be between 0 and 1, got nan"),
        ({"rules": [{"rule": "shop/web/0", "tolerance": float("nan")}]}, "compare.rules[0].tolerance: must be a number >= 0, got nan"),
        ({"rules": [{"rule": "shop/web/0", "tolerance": float("inf")}]}, "compare.rules[0].tolerance: must be a number >= 0, got inf"),
        # Past SQLite's integers, every sweep failed.
        (
            {"retention": {"maxComparisons": 10**19}},
            "compare.retention.maxComparisons: must be a whole number from 1 to 1000000000000, got 10000000000000000000",
        ),
        ({"retention": {"maxAge": "99999999999d"}}, "compare.retention.maxAge: must be from 1ms (0.001s) to 3650d, got '99999999999d'"),
        # Envoy's timeout 0 is no timeout at all.
        ({"shadowTimeout": "0.0001s"}, "compare.shadowTimeout: must be from 1ms (0.001s) to 3650d, got '0.0001s'"),
        (
            {"shadowTimeout": "40s"},
            "compare.retention.joinTimeout: must be longer than shadowTimeout (40s):"
            " a silent shadow's 504 must arrive before the join gives up",
        ),
    ],
)
def test_bad_values_name_their_field(data: dict[str, Any], message: str) -> None:
    assert problems(data) == [f"f.yaml: {message}"]
