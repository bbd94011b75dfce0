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
"""

from __future__ import annotations

import collections
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..config.build import build_policy
from ..config.errors import ConfigError
from ..config.settings import Settings
from ..config.source import ConfigSource
from ..core.policy import Policy
from ..envoy.render import ROUTE_CONFIG_NAME, Topology, backend_names, route_discovery, to_yaml
from ..watch import WatchThread
from .envoy import EnvoyProcess

RDS_STAT = f"http.ingress_http.rds.{ROUTE_CONFIG_NAME}."


# The routes file of an in-process engine (Lua: render.route_discovery; the module: envoy.module).
Discovery = Callable[[Policy, Topology], dict[str, Any]]


def write_routes(target: Path, policy: Policy, topology: Topology, discovery: Discovery = route_discovery) -> bool:
    """Write the routes if they differ from the file's; False if they do not.
    Atomically: Envoy reloads when a file is moved into the directory."""
    text = to_yaml(discovery(policy, topology))
    if target.exists() and target.read_text() == text:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent.parent / f"{target.name}.new"
    staging.write_text(text)
    os.replace(staging, target)
    return True


class ReloadableStack(Protocol):
    """What the reloader needs of the stack: its policy in force, which it
    replaces, its engine's routes and refusals, and what follows a reload."""

    policy: Policy
    envoy: EnvoyProcess | None

    def topology(self) -> Topology: ...

    def routes_file(self) -> Path: ...

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
        # How each change ended: reloaded, invalid, unchanged, new_backends,
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
        policy = build_policy(self.settings, text)
        refused = self.stack.refused(policy)
        if refused:
            raise ConfigError(refused)
        if set(backend_names(policy)) != set(backend_names(self.stack.policy)):
            self.outcomes["new_backends"] += 1
            print("mirror-sampler up: the change names other backends; restart to add their clusters", file=sys.stderr)
            return
        envoy = self.envoy()
        before = envoy.stat(RDS_STAT + "update_rejected"), self.reloads()
        if not write_routes(self.stack.routes_file(), policy, self.stack.topology(), self.stack.discovery()):
            self.stack.policy = policy
            self.outcomes["unchanged"] += 1
            print("mirror-sampler up: the change does not alter Envoy's routes; nothing to reload", flush=True)
            return
        deadline = time.monotonic() + 10
        while True:
            rejected, reloads = envoy.stat(RDS_STAT + "update_rejected"), self.reloads()
            if reloads > before[1]:
                self.stack.policy = policy
                self.stack.routes_reloaded()
                self.outcomes["reloaded"] += 1
                print("mirror-sampler up: routes reloaded", flush=True)
                return
            if rejected > before[0]:
                self.outcomes["rejected_by_envoy"] += 1
                print("mirror-sampler up: Envoy rejected the new routes; previous routes stay (see the envoy log)", file=sys.stderr)
                return
            if time.monotonic() > deadline:
                # Neither counter moved: say so, without claiming a rejection
                # (the routes file is written: Envoy serves it once it reads it).
                self.stack.policy = policy
                self.outcomes["unconfirmed"] += 1
                print("mirror-sampler up: Envoy has not reported the new routes yet (see the envoy log)", file=sys.stderr)
                return
            time.sleep(0.05)
