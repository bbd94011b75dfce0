"""Prometheus counters of the comparison (the observer's own registry)."""

from __future__ import annotations

from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram

from .config import CompareConfig
from .judge import Comparison
from .noise import Result

# Differing field paths exported per rule and target; beyond this, "other":
# a path made of user data (ids as keys) must not become a series each.
MAX_FIELD_SERIES = 50
OTHER_FIELD = "(other)"
# Why a capture was not compared: the writer's queue was full, the store
# failed, the access log entry had no proper tag (no capture namespace, no tag,
# a tag not ours), the gRPC message was not a StreamAccessLogsMessage (all its
# entries), the entry's capture fields were not what the capture filter
# writes (not base64, no request id or status), it waited past the bound of
# pending captures, or its rule is not one the --config file lists.
DROP_REASONS = (
    "queue_full",
    "store_failed",
    "bad_tag",
    "malformed_message",
    "malformed_entry",
    "pending_over_bound",
    "unlisted_rule",
    "unlisted_target",
)

_Series = TypeVar("_Series", Counter, Histogram)


def _labelled(made: dict[tuple[str, str, str], _Series], family: _Series, key: tuple[str, str, str]) -> _Series:
    """``family.labels(*key)``, made once and kept in ``made``."""
    series = made.get(key)
    if series is None:
        series = made[key] = family.labels(*key)
    return series


class CompareMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, max_field_series: int = MAX_FIELD_SERIES) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.results = Counter(
            "mirror_sampler_compared",
            "Mirrored requests compared, by rule, target and result (" + ", ".join(x.value for x in Result) + ")",
            ["rule", "target", "result"],
            registry=r,
        )
        self.fields = Counter(
            "mirror_sampler_compare_differing_fields",
            f"Differing fields of compared requests, by rule, target and field path (at most {max_field_series} paths, then {OTHER_FIELD})",
            ["rule", "target", "path"],
            registry=r,
        )
        self.latency = Histogram(
            "mirror_sampler_compare_latency_seconds",
            "Response latency seen by the capture filters, by rule, target and side (primary or shadow)",
            ["rule", "target", "side"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.drops = Counter("mirror_sampler_compare_dropped", "Captures dropped, by reason", ["reason"], registry=r)
        self.reloads = Counter(
            "mirror_sampler_compare_reloads", "Edits of the compare settings, by result (ok, invalid)", ["result"], registry=r
        )
        for result in ("ok", "invalid"):
            self.reloads.labels(result)
        self.connection_errors = Counter(
            "mirror_sampler_compare_connection_errors",
            "HTTP/2 connection errors and limits hit (that connection is closed, no other)",
            registry=r,
        )
        self.max_field_series = max_field_series
        self._paths: dict[tuple[str, str], set[str]] = {}
        # The labelled series each comparison counts, made on first use as
        # ``labels`` makes them (no series exported before): ``labels`` costs
        # about 1.2 µs a call (it checks and joins the label values), three
        # calls a comparison.
        self._results: dict[tuple[str, str, str], Counter] = {}
        self._latencies: dict[tuple[str, str, str], Histogram] = {}

    def declare(self, config: CompareConfig) -> None:
        """Every configured rule, target and result exported from the start, at 0."""
        for rule_id, rule in config.rules.items():
            for target in rule.targets:
                for result in Result:
                    self.results.labels(rule_id, target, result.value)
        for reason in DROP_REASONS:
            self.drops.labels(reason)

    def reload(self, result: str) -> None:
        self.reloads.labels(result).inc()

    def transport_error(self, kind: str) -> None:
        """The transport's ``on_error`` (its only kind: "protocol")."""
        self.connection_errors.inc()

    def dropped(self, reason: str, n: int = 1) -> None:
        self.drops.labels(reason).inc(n)

    def compared(self, c: Comparison) -> None:
        _labelled(self._results, self.results, (c.rule, c.target, c.result.value)).inc()
        known = self._paths.setdefault((c.rule, c.target), set())
        for field in c.fields:
            path = field["path"]
            if path not in known and len(known) >= self.max_field_series:
                path = OTHER_FIELD
            else:
                known.add(path)
            self.fields.labels(c.rule, c.target, path).inc()
        if c.primary_ms is not None:
            _labelled(self._latencies, self.latency, (c.rule, c.target, "primary")).observe(c.primary_ms / 1000)
        if c.shadow_ms is not None:
            _labelled(self._latencies, self.latency, (c.rule, c.target, "shadow")).observe(c.shadow_ms / 1000)


def read_counts(text: str) -> tuple[dict[tuple[str, str, str], float], dict[tuple[str, str, str], float]]:
    """The compared and differing-field counters from an observer's /metrics
    text: what ``summary.live_targets`` reads (keyed by rule, target, and the
    result or the field path)."""
    from prometheus_client.parser import text_string_to_metric_families

    results: dict[tuple[str, str, str], float] = {}
    fields: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "mirror_sampler_compared_total":
                results[(labels["rule"], labels["target"], labels["result"])] = sample.value
            elif sample.name == "mirror_sampler_compare_differing_fields_total":
                fields[(labels["rule"], labels["target"], labels["path"])] = sample.value
    return results, fields
