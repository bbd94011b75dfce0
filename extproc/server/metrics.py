"""Prometheus metrics, one registry per server so tests can run several.

Every label value known in advance is exported from the start, at 0: error
kinds, reload results, and each rule's targets with every outcome (when the
policy is compiled), so a dashboard or an alert sees a series before the
first event, not only after it.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, gc_collector, platform_collector, process_collector

from .. import __version__
from ..core.policy import Outcome


class ErrorKind(StrEnum):
    """Errors handled without breaking a stream."""

    DECISION = "decision"  # the decision raised: answered "no mirror"
    UNKNOWN_MESSAGE = "unknown_message"  # a ProcessingRequest kind this contract does not know
    MALFORMED_MESSAGE = "malformed_message"  # not a ProcessingRequest at all: the stream ends with INTERNAL
    PROTOCOL = "protocol"  # an HTTP/2 connection error (http2 transport): that connection only


class ReloadResult(StrEnum):
    OK = "ok"  # a new policy is in force
    INVALID = "invalid"  # refused; the previous policy stays
    UNCHANGED = "unchanged"  # same content (SIGHUP, or an event that changed nothing)
    NEEDS_ENVOY_CONFIG = "needs_envoy_config"  # changes routes, matches or targets: regenerate Envoy's config


def _listed(values: type[StrEnum]) -> str:
    return ", ".join(v.value for v in values)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # CPU, memory, open files and the Python runtime, as every Prometheus client exports them.
        process_collector.ProcessCollector(registry=r)
        platform_collector.PlatformCollector(registry=r)
        gc_collector.GCCollector(registry=r)
        self.build_info = Gauge(
            "mirror_sampler_build_info",
            "Always 1: the version, the ext_proc transport and the configuration mode (simple or routes) of this sampler",
            ["version", "transport", "mode", "python"],
            registry=r,
        )
        self._decisions = Counter(
            "mirror_sampler_decisions",
            f"Mirror decisions by rule, target backend and outcome ({_listed(Outcome)})",
            ["rule", "target", "outcome"],
            registry=r,
        )
        self.streams = Counter("mirror_sampler_streams_started", "ext_proc streams opened by Envoy", registry=r)
        self.streams_done = Counter("mirror_sampler_streams_finished", "ext_proc streams that ended", registry=r)
        self.errors = Counter(
            "mirror_sampler_errors", f"Errors handled without breaking a stream, by kind ({_listed(ErrorKind)})", ["kind"], registry=r
        )
        self.reloads = Counter(
            "mirror_sampler_reloads", f"Configuration reloads by result ({_listed(ReloadResult)})", ["result"], registry=r
        )
        for kind in ErrorKind:
            self.errors.labels(kind.value)
        for result in ReloadResult:
            self.reloads.labels(result.value)
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

    def set_build(self, transport: str, mode: str) -> None:
        self.build_info.labels(__version__, transport, mode, platform.python_version()).set(1)

    def error(self, kind: ErrorKind | str) -> None:
        self.errors.labels(str(kind)).inc()

    def reload(self, result: ReloadResult) -> None:
        self.reloads.labels(result.value).inc()

    def decision_counter(self, rule: str, target: str, outcome: str) -> Callable[[], None]:
        """The bound ``inc`` of one label set: the hot path resolves labels once per policy."""
        key = (rule, target, str(outcome))
        inc = self._children.get(key)
        if inc is None:
            inc = self._children[key] = self._decisions.labels(*key).inc
        return inc
