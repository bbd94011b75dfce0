"""`up`'s live comparison: figures from the observer's counters, the same as
the report's over the same comparisons, and the rows the view prints (pure)."""

from __future__ import annotations

import dataclasses
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest

from extproc.compare.config import CompareConfig, RuleCompare
from extproc.compare.judge import Comparison
from extproc.compare.metrics import CompareMetrics, read_counts
from extproc.compare.noise import Result
from extproc.compare.summary import FieldSummary, LiveTarget, live_targets, summarize
from extproc.stack.view import compare_rows

RULE = "shop/web/0"
CONFIG = CompareConfig(rules={RULE: RuleCompare(targets=("candidate", "secondary"), secondary="secondary", margin=0.1)})
ANSWERED = (Result.SAME, Result.DIFFERS, Result.NOISE_ONLY)


def comparison(target: str, result: Result, paths: tuple[str, ...] = (), rid: str = "r") -> Comparison:
    fields = tuple({"path": p} for p in paths) if result in ANSWERED else ()
    return Comparison(RULE, target, rid, result, "GET", "/", 200, 200, 1.0, 1.0, fields, 0.0)


def counted(comparisons: list[Comparison]) -> tuple[dict[tuple[str, str, str], float], dict[tuple[str, str, str], float]]:
    """What the observer's counters hold after these comparisons, read back from its /metrics text."""
    metrics = CompareMetrics()
    metrics.declare(CONFIG)
    for c in comparisons:
        metrics.compared(c)
    return read_counts(generate_latest(metrics.registry).decode())


def test_the_candidate_top_field_is_the_real_one_and_the_noise_is_shown() -> None:
    rows = (
        [comparison("candidate", Result.DIFFERS, ("body.version", "body.ts")) for _ in range(4)]
        + [comparison("candidate", Result.NOISE_ONLY, ("body.ts",)) for _ in range(6)]
        + [comparison("candidate", Result.SHADOW_ERROR)]
        + [comparison("secondary", Result.NOISE_ONLY, ("body.ts",)) for _ in range(10)]
    )
    by_target = {t.target: t for t in live_targets(CONFIG, *counted(rows))}
    candidate = by_target["candidate"]
    assert (candidate.compared, candidate.matched, candidate.unanswered, candidate.matched_share) == (10, 6, 1, 0.6)
    assert candidate.top_field == FieldSummary("body.version", 4, 0.4, 0.0, True, ()), "real first, though body.ts differs more"
    secondary = by_target["secondary"]
    assert secondary.is_secondary and secondary.top_field is not None and not secondary.top_field.real
    assert compare_rows(list(by_target.values())) == [
        "compared                     pairs   matched   missing  top differing field",
        "  candidate                     10     60.0%         1  body.version 40.0% (noise 0.0%)  [shop/web/0]",
        "  secondary (secondary)         10    100.0%         0  body.ts 100.0%  [shop/web/0]",
    ]


def test_targets_declared_but_not_yet_compared_show_dashes() -> None:
    live = live_targets(CONFIG, *counted([]))
    assert [(t.target, t.compared, t.matched_share, t.top_field) for t in live] == [
        ("candidate", 0, None, None),
        ("secondary", 0, None, None),
    ]
    assert compare_rows(live)[1].split() == ["candidate", "0", "-", "0", "-", "[shop/web/0]"]


PATHS = st.sampled_from(["status", "body.a", "body.b", "header.x"])
COMPARISONS = st.lists(
    st.builds(
        comparison,
        st.sampled_from(["candidate", "secondary"]),
        st.sampled_from(list(Result)),
        st.lists(PATHS, unique=True, max_size=3).map(tuple),
    ),
    max_size=40,
)


@given(COMPARISONS)
def test_the_live_figures_are_the_reports_over_the_same_comparisons(rows: list[Comparison]) -> None:
    rows = [dataclasses.replace(c, request_id=f"r{i}") for i, c in enumerate(rows)]
    live = {t.target: t for t in live_targets(CONFIG, *counted(rows))}
    for report in summarize(rows, CONFIG):
        shown: LiveTarget = live[report.target]
        assert shown.compared == report.compared
        assert shown.matched_share == report.matched_share
        expected_top = dataclasses.replace(report.fields[0], examples=()) if report.fields else None
        assert shown.top_field == expected_top
        assert shown.unanswered == sum(n for r, n in report.results.items() if Result(r) not in ANSWERED)
    assert Counter(c.target for c in rows).keys() <= live.keys()
