"""Where the policy in force lives: loaded at start, swapped on reload.

The only module that reads the configuration file. A reload builds the new
policy completely before swapping one reference, so streams see either the
old policy or the new one, never a mix; an invalid file leaves the old one.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import structlog
import watchfiles

from .config import ConfigError, Settings, build_policy
from .metrics import Metrics
from .policy import Policy
from .service import Responder


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
        self._responder = Responder(build_policy(settings, text))
        self._digest = _digest(text)
        metrics.policy_generation.set(1)
        metrics.policy_rules.set(len(self.policy.rules))

    @property
    def policy(self) -> Policy:
        return self._responder.policy

    def responder(self) -> Responder:
        return self._responder

    def reload(self, reason: str) -> bool:
        """Re-read the file; True if a new policy is now in force."""
        try:
            text = read_manifest(self.settings)
            digest = _digest(text)
            if digest == self._digest:
                self.metrics.reloads.labels("unchanged").inc()
                return False
            responder = Responder(build_policy(self.settings, text))
        except ConfigError as e:
            self.metrics.reloads.labels("invalid").inc()
            self.log.error("reload_rejected", reason=reason, problems=e.problems, kept="previous policy")
            return False
        self._responder = responder
        self._digest = digest
        self.metrics.reloads.labels("ok").inc()
        self.metrics.policy_generation.inc()
        self.metrics.policy_rules.set(len(responder.policy.rules))
        self.log.info("reloaded", reason=reason, rules=len(responder.policy.rules))
        return True

    async def watch(self, stop: asyncio.Event) -> None:
        """Reload when the file changes. Watches the directory, because editors
        and Kubernetes ConfigMaps replace files rather than write them."""
        if not self.settings.config:
            return
        directory = Path(self.settings.config).resolve().parent
        async for _ in watchfiles.awatch(directory, stop_event=stop, debounce=200, step=50, recursive=False):
            self.reload("file changed")


def _digest(text: str | None) -> bytes:
    return hashlib.sha256((text or "").encode()).digest()
