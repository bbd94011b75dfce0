"""Inline mode's live routes: a changed HTTPRoute file becomes new Envoy
routes through filesystem RDS, without restarting Envoy.

Only the configuration file itself is watched (other files in its folder,
such as logs, cause nothing), and a rejection is reported only when Envoy's
RDS counted one.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import watchfiles

from ..config.build import build_policy
from ..config.errors import ConfigError
from ..config.settings import Settings
from ..core.policy import Policy
from ..envoy.lua import unsupported
from ..envoy.render import ROUTE_CONFIG_NAME, Topology, backend_names, route_discovery, to_yaml
from ..server.store import content_digest, read_manifest, touches
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


class RouteReloader:
    """Watches ``settings.config``; each valid change is written as new routes."""

    def __init__(
        self,
        settings: Settings,
        routes_file: Path,
        envoy: EnvoyProcess,
        topology: Callable[[], Topology],
        policy: Policy,
        judged: bytes,
        discovery: Discovery = route_discovery,
        refused: Callable[[Policy], list[str]] = unsupported,
    ) -> None:
        """``policy``: the one in force; ``judged``: the content_digest of the
        file text it was built from (a later edit must not pass for it);
        ``discovery`` and ``refused``: the engine's routes and what it cannot do."""
        self.discovery = discovery
        self.refused = refused
        self.settings = settings
        self.routes_file = routes_file
        self.envoy = envoy
        self.topology = topology
        self.policy = policy
        # Each content of the file is judged once: an editor's save may come
        # as several events, and the same content must not be reported twice.
        self._judged = judged
        self.stop_event = threading.Event()
        # How each change ended: reloaded, invalid, unchanged, new_backends,
        # rejected_by_envoy, unconfirmed (what `up` printed, countable by tests).
        self.outcomes: collections.Counter[str] = collections.Counter()

    def start(self) -> None:
        threading.Thread(target=self._watch, name="route-watcher", daemon=True).start()

    def stop(self) -> None:
        self.stop_event.set()

    def reloads(self) -> int:
        return self.envoy.stat(RDS_STAT + "config_reload")

    def _watch(self) -> None:
        config = Path(self.settings.config)
        for changes in watchfiles.watch(config.parent, stop_event=self.stop_event, debounce=200, step=50, recursive=False):
            if not touches(changes, config):
                continue
            try:
                self.reload()
            except Exception as e:  # keep watching whatever happened
                print(f"mirror-sampler up: reloading routes failed, previous routes stay: {e!r}", file=sys.stderr)

    def reload(self) -> None:
        try:
            text = read_manifest(self.settings)
            digest = content_digest(text)
            if digest == self._judged:
                return
            self._judged = digest
            policy = build_policy(self.settings, text)
            if self.refused(policy):
                raise ConfigError(self.refused(policy))
        except ConfigError as e:
            self.outcomes["invalid"] += 1
            print("mirror-sampler up: configuration change rejected, previous routes stay:", *e.problems, sep="\n  ", file=sys.stderr)
            return
        if set(backend_names(policy)) != set(backend_names(self.policy)):
            self.outcomes["new_backends"] += 1
            print("mirror-sampler up: the change names other backends; restart to add their clusters", file=sys.stderr)
            return
        before = self.envoy.stat(RDS_STAT + "update_rejected"), self.reloads()
        previous, self.policy = self.policy, policy
        if not write_routes(self.routes_file, policy, self.topology(), self.discovery):
            self.outcomes["unchanged"] += 1
            print("mirror-sampler up: the change does not alter Envoy's routes; nothing to reload", flush=True)
            return
        deadline = time.monotonic() + 10
        while True:
            rejected, reloads = self.envoy.stat(RDS_STAT + "update_rejected"), self.reloads()
            if reloads > before[1]:
                self.outcomes["reloaded"] += 1
                print("mirror-sampler up: routes reloaded", flush=True)
                return
            if rejected > before[0]:
                self.policy = previous
                self.outcomes["rejected_by_envoy"] += 1
                print("mirror-sampler up: Envoy rejected the new routes; previous routes stay (see the envoy log)", file=sys.stderr)
                return
            if time.monotonic() > deadline:
                # Neither counter moved: say so, without claiming a rejection.
                self.outcomes["unconfirmed"] += 1
                print("mirror-sampler up: Envoy has not reported the new routes yet (see the envoy log)", file=sys.stderr)
                return
            time.sleep(0.05)
