"""Where the policy in force lives: loaded at start, swapped on reload.

A reload builds the new policy completely before swapping one reference, so
streams see either the old policy or the new one, never a mix; an invalid
file leaves the old one. The store is the judge of the configuration source
(``config.source``): each distinct content is judged once (an invalid edit is
logged and counted once, however many events it causes), one reload at a
time, the last content read in force.
"""

from __future__ import annotations

import structlog

from ..config.build import build_policy
from ..config.settings import Settings
from ..config.source import ConfigSource, read_manifest
from ..core.plan import Plan
from ..core.policy import Policy
from .metrics import Metrics, ReloadResult


class PolicyStore:
    def __init__(self, settings: Settings, metrics: Metrics, log: structlog.typing.FilteringBoundLogger) -> None:
        self.settings = settings
        self.metrics = metrics
        self.log = log
        text = read_manifest(settings)
        self._plan = self._compile(build_policy(settings, text))
        self.source = ConfigSource(settings, self, built_from=text)
        metrics.policy_generation.set(1)
        metrics.policy_rules.set(len(self.policy.rules))

    @property
    def policy(self) -> Policy:
        return self._plan.policy

    def plan(self) -> Plan:
        """The compiled policy in force: what each new stream decides with."""
        return self._plan

    def _compile(self, policy: Policy) -> Plan:
        # Compiled here, in the reload thread (or at start), not on the event
        # loop by the first stream: a policy's decision series exist (at 0)
        # from the moment it is in force.
        return Plan(policy, self.metrics)

    def reload(self, reason: str, quiet: bool = False) -> None:
        """Re-read the file (``ConfigSource.reload``). Never raises: whatever
        goes wrong, the policy in force stays."""
        self.source.reload(reason, quiet)

    # -- the source's judge ------------------------------------------------

    def judge(self, text: str | None, reason: str) -> None:
        policy = build_policy(self.settings, text)
        if policy.envoy_shape() != self.policy.envoy_shape():
            # Envoy's variant routes were generated for the old rules: new
            # rules, matches or mirror targets would be decided but never
            # mirrored (or mirrored under the wrong rule) until Envoy's
            # configuration is regenerated. Fractions, keys and salt are free.
            self.metrics.reload(ReloadResult.NEEDS_ENVOY_CONFIG)
            self.log.error(
                "reload_rejected",
                reason=reason,
                problems=[
                    "the change alters routes, matches or mirror targets, not only fractions, keys or salt: "
                    "regenerate Envoy's configuration (mirror-sampler envoy-config) and restart the sampler with it"
                ],
                kept="previous policy",
            )
            return
        self._plan = self._compile(policy)
        self.metrics.reload(ReloadResult.OK)
        self.metrics.policy_generation.inc()
        self.metrics.policy_rules.set(len(policy.rules))
        self.log.info("reloaded", reason=reason, rules=len(policy.rules))

    def unchanged(self, reason: str) -> None:
        self.metrics.reload(ReloadResult.UNCHANGED)

    def rejected(self, reason: str, problems: list[str]) -> None:
        self.metrics.reload(ReloadResult.INVALID)
        self.log.error("reload_rejected", reason=reason, problems=problems, kept="previous policy")

    def failed(self, reason: str, error: Exception) -> None:
        self.metrics.reload(ReloadResult.INVALID)
        self.log.exception("reload_failed", reason=reason, error=repr(error), kept="previous policy")

    def folder_changed(self, files: list[str], concerns_config: bool) -> None:
        # Debug: which events the watcher saw, and whether they concern the file.
        self.log.debug("config_folder_changed", files=files, concerns_config=concerns_config)
