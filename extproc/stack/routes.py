"""`up`'s live routes: a changed HTTPRoute file becomes new Envoy routes
through filesystem RDS, without restarting Envoy, whichever engine decides
(with the sampler, its processes are then restarted on the file: a running
sampler refuses an edit of the routes it was started with, as it must where
Envoy's routes are deployed apart from it).

The route reloader is the judge of the configuration source
(``config.source``), driven by a watch thread: each content of the file is
judged once, other files in its folder cause nothing, and a rejection is
reported only when Envoy's RDS counted one. The policy it puts in force is the
stack's (what `up`'s live view shows), not a copy.

With spec.compare, the internal listener's routes (which rules and targets
compare, the shadow's timeout, the capture bound in their metadata) are a
second routes file: written, and seen in force, before the main routes that
send copies to them. What the listeners carry themselves (the private
headers) and the observer that a comparison started by an edit would need
are not changed live: such an edit is refused with a word that a restart
applies it.
"""

from __future__ import annotations

import collections
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..compare.config import CompareConfig
from ..compare.envoy import CAPTURE_LISTENER, CAPTURE_STAT_PREFIX, capture_discovery, compare_in_force, envoy_restart_reason
from ..config.build import parse, policy_from
from ..config.errors import ConfigError
from ..config.settings import Settings
from ..config.source import ConfigSource
from ..core.policy import Policy
from ..envoy.render import ROUTE_CONFIG_NAME, Topology, backend_names, route_discovery, to_yaml
from ..watch import WatchThread
from .envoy import EnvoyProcess

RDS_STAT = f"http.ingress_http.rds.{ROUTE_CONFIG_NAME}."
CAPTURE_RDS_STAT = f"http.{CAPTURE_STAT_PREFIX}.rds.{CAPTURE_LISTENER}."


# The routes file of an in-process engine (Lua: render.route_discovery; the module: envoy.module).
Discovery = Callable[[Policy, Topology], dict[str, Any]]


def write_routes(target: Path, policy: Policy, topology: Topology, discovery: Discovery = route_discovery) -> bool:
    """Write the routes if they differ from the file's; False if they do not."""
    return write_discovery(target, discovery(policy, topology))


def write_capture_routes(target: Path, compare: CompareConfig, policy: Policy) -> bool:
    """Write the internal listener's routes if they differ from the file's; False if they do not."""
    return write_discovery(target, capture_discovery(compare, policy.slot_headers.marker))


def write_discovery(target: Path, discovery: dict[str, Any]) -> bool:
    """Write a filesystem RDS file if it differs from what is there; False if it
    does not. Atomically: Envoy reloads when a file is moved into the directory."""
    text = to_yaml(discovery)
    if target.exists() and target.read_text() == text:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent.parent / f"{target.name}.{target.parent.name}.new"
    staging.write_text(text)
    os.replace(staging, target)
    return True


class ReloadableStack(Protocol):
    """What the reloader needs of the stack: its policy in force, which it
    replaces, its engine's routes and refusals, and what follows a reload."""

    policy: Policy
    envoy: EnvoyProcess | None
    # What Envoy compares (its capture points); None when it was started without.
    compare: CompareConfig | None

    def topology(self) -> Topology: ...

    def routes_file(self) -> Path: ...

    def capture_routes_file(self) -> Path: ...

    def routes_reloaded(self) -> None: ...

    def discovery(self) -> Discovery: ...

    def refused(self, policy: Policy) -> list[str]: ...


class RouteReloader:
    """Watches ``settings.config``; each valid change is written as new routes."""

    def __init__(self, settings: Settings, stack: ReloadableStack, built_from: str | None) -> None:
        """``built_from``: the file text the stack's policy was built from."""
        self.settings = settings
        self.stack = stack
        self.source = ConfigSource(settings, self, built_from)
        self.watcher = WatchThread(self.source, name="route-watcher")
        # How each change ended: reloaded, invalid, unchanged, new_backends, compare_restart,
        # rejected_by_envoy, unconfirmed, failed (what `up` printed, countable by tests).
        self.outcomes: collections.Counter[str] = collections.Counter()

    def start(self) -> None:
        self.watcher.start()

    def stop(self) -> None:
        self.watcher.stop()

    def envoy(self) -> EnvoyProcess:
        assert self.stack.envoy is not None, "routes are reloaded only once Envoy runs"
        return self.stack.envoy

    def reloads(self) -> int:
        return self.envoy().stat(RDS_STAT + "config_reload")

    # -- the source's judge ------------------------------------------------

    def unchanged(self, reason: str) -> None:
        pass  # the same content again: nothing to say

    def rejected(self, reason: str, problems: list[str]) -> None:
        self.outcomes["invalid"] += 1
        print("mirror-sampler up: configuration change rejected, previous routes stay:", *problems, sep="\n  ", file=sys.stderr)

    def failed(self, reason: str, error: Exception) -> None:
        self.outcomes["failed"] += 1
        print(f"mirror-sampler up: reloading routes failed, previous routes stay: {error!r}", file=sys.stderr)

    def judge(self, text: str | None, reason: str) -> None:
        parsed = parse(self.settings, text)
        policy = policy_from(self.settings, parsed)
        refused = self.stack.refused(policy)
        if refused:
            raise ConfigError(refused)
        if set(backend_names(policy)) != set(backend_names(self.stack.policy)):
            self.outcomes["new_backends"] += 1
            print("mirror-sampler up: the change names other backends; restart to add their clusters", file=sys.stderr)
            return
        edited = parsed.compare if parsed is not None else None
        restart = envoy_restart_reason(self.stack.compare, edited)
        if restart:
            self.outcomes["compare_restart"] += 1
            print(f"mirror-sampler up: {restart}; restart to apply it (the observer already does)", file=sys.stderr)
            return
        compare = compare_in_force(self.stack.compare, edited)
        compared = None
        if compare is not None and compare != self.stack.compare:
            # First: the main routes may send copies to rules and targets only these routes know.
            capture_file = self.stack.capture_routes_file()
            compared = self._write_and_await(CAPTURE_RDS_STAT, lambda: write_capture_routes(capture_file, compare, policy))
            if compared not in (None, "reloaded"):
                self._report(compared, "compare routes")
                return
            self.stack.compare = compare
        stack = self.stack
        outcome = self._write_and_await(RDS_STAT, lambda: write_routes(stack.routes_file(), policy, stack.topology(), stack.discovery()))
        if outcome is None:
            self.stack.policy = policy
            if compared == "reloaded":
                self._report(compared, "compare routes")
                return
            self.outcomes["unchanged"] += 1
            print("mirror-sampler up: the change does not alter Envoy's routes; nothing to reload", flush=True)
            return
        if outcome != "rejected_by_envoy":
            # Unconfirmed too: the routes file is written, Envoy serves it once it reads it.
            self.stack.policy = policy
        if outcome == "reloaded":
            self.stack.routes_reloaded()
        self._report(outcome, "routes")

    def _write_and_await(self, stats: str, write: Callable[[], bool], timeout_s: float = 10) -> str | None:
        """How Envoy took a routes file ``write`` wrote: reloaded, rejected_by_envoy,
        or unconfirmed (neither of its RDS counters under ``stats`` moved within
        ``timeout_s``); None when ``write`` found the file as it would write it."""
        envoy = self.envoy()
        rejected, reloaded = envoy.stat(stats + "update_rejected"), envoy.stat(stats + "config_reload")
        if not write():
            return None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if envoy.stat(stats + "config_reload") > reloaded:
                return "reloaded"
            if envoy.stat(stats + "update_rejected") > rejected:
                return "rejected_by_envoy"
            time.sleep(0.05)
        return "unconfirmed"

    def _report(self, outcome: str, what: str) -> None:
        self.outcomes[outcome] += 1
        if outcome == "reloaded":
            print(f"mirror-sampler up: {what} reloaded", flush=True)
        elif outcome == "rejected_by_envoy":
            print(f"mirror-sampler up: Envoy rejected the new {what}; previous {what} stay (see the envoy log)", file=sys.stderr)
        else:
            # Without claiming a rejection: the file is written, Envoy serves it once it reads it.
            print(f"mirror-sampler up: Envoy has not reported the new {what} yet (see the envoy log)", file=sys.stderr)
