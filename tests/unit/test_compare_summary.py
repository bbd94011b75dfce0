"""The report's figures and its text (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from extproc.compare.config import CompareConfig, RuleCompare
from extproc.compare.judge import Comparison
from extproc.compare.noise import Result
from extproc.compare.report import render_show, render_text
from extproc.compare.summary import percentile, summarize

RULE = "shop/web/0"
CONFIG = CompareConfig(rules={RULE: RuleCompare(targets=("candidate", "secondary"), secondary="secondary", margin=0.05)})


def row(
    rid: str, target: str, result: Result, paths: tuple[str, ...] = (), statuses: tuple[int, int] = (200, 200), ms: float = 1.0
) -> Comparison:
    fields = tuple({"path": p} for p in paths)
    return Comparison(RULE, target, rid, result, "GET", "/x", statuses[0], statuses[1], 1.0, ms, fields, 0.0)


def rows() -> list[Comparison]:
    out = []
    for i in range(20):
        rid = f"r{i}"
        out.append(row(rid, "secondary", Result.NOISE_ONLY, ("body.ts",) + (("body.flaky",) if i < 4 else ())))
        paths = ("body.ts",) + (("body.v",) if i % 2 else ()) + (("body.flaky",) if i < 5 else ())
        status = (200, 500) if i == 3 else (200, 200)
        out.append(row(rid, "candidate", Result.DIFFERS if i % 2 else Result.NOISE_ONLY, paths, status, ms=float(10 + i)))
    out.append(row("lost", "candidate", Result.SHADOW_MISSING, statuses=(200, 0)))
    return out


def test_fields_carry_their_rate_their_noise_rate_and_verdict() -> None:
    [candidate, secondary] = summarize(rows(), CONFIG)
    assert (candidate.target, secondary.target, secondary.is_secondary) == ("candidate", "secondary", True)
    assert candidate.compared == 20, "a missing shadow is not a compared pair"
    assert candidate.results == {"differs": 10, "noise_only": 10, "shadow_missing": 1}
    assert candidate.matched_share == 0.5 and candidate.identical_share == 0.0
    fields = {f.path: (f.count, f.rate, f.noise_rate, f.real) for f in candidate.fields}
    assert fields == {
        "body.v": (10, 0.5, 0.0, True),
        "body.ts": (20, 1.0, 1.0, False),
        "body.flaky": (5, 0.25, 0.2, False),  # 0.25 is not above 0.2 + 0.05
    }
    assert next(f.path for f in candidate.fields) == "body.v", "real fields first"
    assert candidate.fields[0].examples == ("r1", "r3", "r5")
    assert candidate.status_pairs[0] == (200, 200, 19)
    assert candidate.latency_ms["shadow"] == {"p50": 19.0, "p90": 27.0, "p99": 29.0}
    assert all(not f.real for f in secondary.fields)


def test_the_text_report_names_everything_a_reader_needs() -> None:
    text = render_text(summarize(rows(), CONFIG))
    assert "shop/web/0 -> candidate" in text and "matched 50.0%" in text
    assert "body.v" in text and "REAL" in text and "r1, r3, r5" in text
    assert "200->500 x1" in text
    assert render_text([]) == "nothing compared yet\n"


def test_show_marks_the_differing_fields_and_says_when_values_were_not_kept() -> None:
    text = render_show("r1", [row("r1", "candidate", Result.DIFFERS, ("body.v",))])
    assert "* body.v" in text and "(not stored)" in text
    assert "no comparison for request nope" in render_show("nope", [])


@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=50), st.integers(1, 100))
def test_a_percentile_is_one_of_the_values_with_enough_at_or_below_it(values: list[float], p: int) -> None:
    got = percentile(values, p)
    assert got in values
    assert sum(1 for v in values if v <= got) >= p / 100 * len(values)
