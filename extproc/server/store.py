"""Where the policy in force lives: loaded at start, swapped on reload.

The only module that reads the configuration file. A reload builds the new
policy completely before swapping one reference, so streams see either the
old policy or the new one, never a mix; an invalid file leaves the old one.
Each distinct content of the file is judged once: an invalid edit is logged
and counted once, however many events it causes, and writes to other files
in the folder cause nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable
from pathlib import Path

import structlog
import watchfiles

from ..config.build import build_policy
from ..config.errors import ConfigError
from ..config.settings import Settings
from ..core.plan import Plan
from ..core.policy import Policy
from .metrics import Metrics, ReloadResult


def read_manifest(settings: Settings) -> str | None:
    if not settings.config:
        return None
    try:
        return Path(settings.config).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"MIRROR_CONFIG: cannot read {settings.config}: {e}"]) from None


def load_policy(settings: Settings) -> Policy:
    """The policy these settings describe; ConfigError lists every problem."""
    return build_policy(settings, read_manifest(settings))


class PolicyStore:
    def __init__(self, settings: Settings, metrics: Metrics, log: structlog.typing.FilteringBoundLogger) -> None:
        self.settings = settings
        self.metrics = metrics
        self.log = log
        text = read_manifest(settings)
        self._plan = self._compile(build_policy(settings, text))
        # The content last judged (in force, rejected, or needing new Envoy
        # configuration): the same content is not judged, logged or counted again.
        self._judged = content_digest(text)
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

    def reload(self, reason: str, quiet: bool = False) -> bool:
        """Re-read the file; True if a new policy is now in force. Never
        raises: whatever goes wrong, the policy in force stays."""
        try:
            text = read_manifest(self.settings)
            digest = content_digest(text)
            if digest == self._judged:
                if not quiet:
                    self.metrics.reload(ReloadResult.UNCHANGED)
                return False
            self._judged = digest
            policy = build_policy(self.settings, text)
        except ConfigError as e:
            self.metrics.reload(ReloadResult.INVALID)
            self.log.error("reload_rejected", reason=reason, problems=e.problems, kept="previous policy")
            return False
        except Exception as e:  # a bug must not end reloading, nor the server
            self.metrics.reload(ReloadResult.INVALID)
            self.log.exception("reload_failed", reason=reason, error=repr(e), kept="previous policy")
            return False
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
            return False
        self._plan = self._compile(policy)
        self.metrics.reload(ReloadResult.OK)
        self.metrics.policy_generation.inc()
        self.metrics.policy_rules.set(len(policy.rules))
        self.log.info("reloaded", reason=reason, rules=len(policy.rules))
        return True

    async def reload_in_thread(self, reason: str, quiet: bool = False) -> bool:
        """Parsing a large file must not stall the streams on the event loop."""
        return await asyncio.to_thread(self.reload, reason, quiet)

    async def watch(self, stop: asyncio.Event) -> None:
        """Reload when the file changes. Watches the directory, because editors
        and Kubernetes ConfigMaps replace files rather than write them, and
        keeps only the events that touch the file (``touches``)."""
        if not self.settings.config:
            return
        config = Path(self.settings.config).absolute()
        started = False
        async for changes in watchfiles.awatch(
            config.parent, stop_event=stop, debounce=200, step=50, recursive=False, yield_on_timeout=True, rust_timeout=200
        ):
            if not started:
                started = True
                # An edit between the start-up read and now would be missed.
                await self.reload_in_thread("watch started", quiet=True)
            if not changes:
                continue
            relevant = touches(changes, config)
            # Debug: which events the watcher saw, and whether they concern the file.
            self.log.debug("config_folder_changed", files=sorted({Path(p).name for _, p in changes}), concerns_config=relevant)
            if relevant:
                await self.reload_in_thread("file changed")


def touches(changes: Iterable[tuple[object, str]], config: Path) -> bool:
    """Whether watchfiles ``changes`` in the config file's folder concern the
    file: the file itself (written, or replaced by an editor's rename), or a
    Kubernetes ConfigMap's atomic swap of its ``..data`` symlink, through which
    the (unresolved) path points at the new content."""
    name = config.name
    for _, path in changes:
        changed = Path(path).name
        if changed == name or changed.startswith("..data"):
            return True
    return False


def content_digest(text: str | None) -> bytes:
    """What identifies one content of the configuration file (judged once each)."""
    return hashlib.sha256((text or "").encode()).digest()
