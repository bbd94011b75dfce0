"""Prometheus metrics, one registry per server so tests can run several."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._decisions = Counter(
            "mirror_sampler_decisions",
            "Mirror decisions by rule, target backend and outcome (mirrored, skipped, no_key)",
            ["rule", "target", "outcome"],
            registry=r,
        )
        self.streams = Counter("mirror_sampler_streams_started", "ext_proc streams opened by Envoy", registry=r)
        self.streams_done = Counter("mirror_sampler_streams_finished", "ext_proc streams that ended", registry=r)
        self.errors = Counter("mirror_sampler_errors", "Errors handled without breaking a stream, by kind", ["kind"], registry=r)
        self.reloads = Counter("mirror_sampler_reloads", "Configuration reloads by result (ok, invalid, unchanged)", ["result"], registry=r)
        self.policy_rules = Gauge("mirror_sampler_policy_rules", "Rules in the policy in force", registry=r)
        self.policy_generation = Gauge("mirror_sampler_policy_generation", "Policies loaded since start (1 = the initial one)", registry=r)
        # A stalled event loop answers nothing: Envoy's message_timeout then
        # lets requests through unmirrored. These make that visible here too.
        self.loop_lag = Histogram(
            "mirror_sampler_event_loop_lag_seconds",
            "How late the event loop ran a timer: time the sampler could not answer",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0),
            registry=r,
        )
        self.stalls = Counter(
            "mirror_sampler_event_loop_stalls",
            "Times the event loop was late by more than Envoy's default message_timeout (200 ms)",
            registry=r,
        )
        # labels() costs a dict lookup plus a lock per call; children are cached.
        self._children: dict[tuple[str, str, str], Callable[[], None]] = {}

    def decision_counter(self, rule: str, target: str, outcome: str) -> Callable[[], None]:
        """The bound ``inc`` of one label set: the hot path resolves labels once per policy."""
        key = (rule, target, outcome)
        inc = self._children.get(key)
        if inc is None:
            inc = self._children[key] = self._decisions.labels(rule, target, outcome).inc
        return inc

    def decision(self, rule: str, target: str, outcome: str) -> None:
        self.decision_counter(rule, target, outcome)()
