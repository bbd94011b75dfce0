"""The comparison's Prometheus counters: results per rule, target and result,
differing fields with bounded cardinality."""

from __future__ import annotations

from prometheus_client import generate_latest

from extproc.compare.judge import Comparison
from extproc.compare.metrics import OTHER_FIELD, CompareMetrics
from extproc.compare.noise import Result


def comparison(target: str, result: Result, paths: tuple[str, ...]) -> Comparison:
    return Comparison("r", target, "id", result, "GET", "/", 200, 200, 3.0, 40.0, tuple({"path": p} for p in paths), 0.0)


def sample(metrics: CompareMetrics, name: str, labels: dict[str, str]) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_results_fields_and_latency_are_counted() -> None:
    metrics = CompareMetrics()
    metrics.compared(comparison("candidate", Result.DIFFERS, ("body.v",)))
    metrics.compared(comparison("candidate", Result.DIFFERS, ("body.v", "status")))
    metrics.compared(comparison("secondary", Result.NOISE_ONLY, ("body.ts",)))
    assert sample(metrics, "mirror_sampler_compared_total", {"rule": "r", "target": "candidate", "result": "differs"}) == 2
    assert sample(metrics, "mirror_sampler_compare_differing_fields_total", {"rule": "r", "target": "candidate", "path": "body.v"}) == 2
    assert sample(metrics, "mirror_sampler_compare_latency_seconds_count", {"rule": "r", "target": "candidate", "side": "shadow"}) == 2
    assert b"mirror_sampler_compare_dropped_total" in generate_latest(metrics.registry)


def test_field_paths_beyond_the_bound_are_counted_as_other() -> None:
    metrics = CompareMetrics(max_field_series=3)
    for i in range(10):
        metrics.compared(comparison("candidate", Result.DIFFERS, (f"body.users.u{i}",)))
    text = generate_latest(metrics.registry).decode()
    assert text.count("mirror_sampler_compare_differing_fields_total{") == 4
    assert sample(metrics, "mirror_sampler_compare_differing_fields_total", {"rule": "r", "target": "candidate", "path": OTHER_FIELD}) == 7
    assert (
        sample(metrics, "mirror_sampler_compare_differing_fields_total", {"rule": "r", "target": "candidate", "path": "body.users.u1"}) == 1
    )


def test_every_configured_series_exists_from_the_start() -> None:
    from extproc.compare.config import CompareConfig, RuleCompare

    metrics = CompareMetrics()
    metrics.declare(CompareConfig(rules={"r": RuleCompare(targets=("c", "s"))}))
    text = generate_latest(metrics.registry).decode()
    for result in Result:
        for target in ("c", "s"):
            assert f'mirror_sampler_compared_total{{result="{result.value}",rule="r",target="{target}"}} 0.0' in text
    assert 'mirror_sampler_compare_dropped_total{reason="queue_full"} 0.0' in text


def test_a_series_is_exported_once_counted_and_counts_on() -> None:
    """The series a comparison counts are made on first use (kept for the
    next): none before, and later comparisons add to the same one."""
    metrics = CompareMetrics()
    assert "mirror_sampler_compared_total{" not in generate_latest(metrics.registry).decode()
    metrics.compared(comparison("candidate", Result.SAME, ()))
    text = generate_latest(metrics.registry).decode()
    assert text.count("mirror_sampler_compared_total{") == 1, "no other result of the target appears"
    assert text.count("mirror_sampler_compare_latency_seconds_count{") == 2
    for _ in range(4):
        metrics.compared(comparison("candidate", Result.SAME, ()))
    metrics.compared(comparison("other", Result.DIFFERS, ("body.v",)))
    assert sample(metrics, "mirror_sampler_compared_total", {"rule": "r", "target": "candidate", "result": "same"}) == 5
    assert sample(metrics, "mirror_sampler_compared_total", {"rule": "r", "target": "other", "result": "differs"}) == 1
    assert sample(metrics, "mirror_sampler_compare_latency_seconds_count", {"rule": "r", "target": "candidate", "side": "primary"}) == 5
    assert sample(metrics, "mirror_sampler_compare_latency_seconds_sum", {"rule": "r", "target": "other", "side": "shadow"}) == 0.04
