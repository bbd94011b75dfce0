"""`mirror-sampler up`: a real Envoy, the sampler and echo backends, on loopback.

The same LocalStack object drives the end-to-end tests, so what a user runs
with `make up` is what the tests prove. Envoy's configuration is rendered by
``envoy.render`` once the children have bound their ports.
"""

from __future__ import annotations

import itertools
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..compare.config import CompareConfig
from ..compare.envoy import add_capture_to_discovery, render_with_capture
from ..compare.summary import live_targets
from ..config.build import parse, policy_from
from ..config.errors import ConfigError
from ..config.settings import DEFAULT_INLINE, EnvoySettings, Settings, slot_environment
from ..config.source import read_manifest
from ..core.explain import request_headers
from ..core.keys import KeyKind
from ..core.matching import PathType
from ..core.plan import Plan
from ..core.policy import SAMPLER_CLUSTER, Policy
from ..envoy.lua import unsupported
from ..envoy.module import render_module
from ..envoy.module import route_discovery as module_route_discovery
from ..envoy.render import Address, Topology, backend_names, render, route_discovery
from ..module.support import module_for_installed_envoy
from ..server.ports import probe_free
from .backend import EchoProcess
from .children import Child, ChildFailed
from .envoy import EnvoyError, EnvoyProcess
from .observer import ObserverProcess
from .routes import Discovery, RouteReloader, write_capture_routes, write_routes
from .sampler import SamplerProcess
from .view import compare_rows, view_rows

DEFAULT_CONFIG = Path(__file__).parents[1] / "data" / "http-mirror.yaml"
LOOPBACK = "127.0.0.1"


class StackError(RuntimeError):
    """A part failed to start; the message names the part and the cause."""


def check_port_free(port: int, what: str) -> None:
    """A port is free when nothing listens on it or holds it. SO_REUSEADDR,
    as Envoy itself binds: a socket left in TIME-WAIT by a stopped `up` does
    not make the port busy."""
    if port == 0:
        return
    try:
        probe_free(LOOPBACK, port)
    except OSError as e:
        raise StackError(f"{what}: port {port} on {LOOPBACK} is not free ({e.strerror})") from None


@dataclass
class LocalStack:
    settings: Settings
    listener_port: int = 10000
    admin_port: int = 9901
    message_timeout_ms: int = 200
    sampler_count: int = 1
    log_dir: Path | None = None
    sampler_env: dict[str, str] = field(default_factory=dict)
    inline: bool = False
    # The in-process engine when inline: lua or module (settings.INLINE_ENGINES).
    engine: str = DEFAULT_INLINE
    # TLS from Envoy to the sampler (the sampler's side: MIRROR_TLS_* settings).
    sampler_ca: str = ""
    sampler_client_cert: str = ""
    sampler_client_key: str = ""
    # The policy in force: what `up` rendered, replaced by inline route reloads; the live view shows it.
    policy: Policy = field(init=False)
    module_path: str = field(init=False, default="")
    backends: dict[str, EchoProcess] = field(init=False, default_factory=dict)
    backend_ports: dict[str, int] = field(init=False, default_factory=dict)
    samplers: list[SamplerProcess | None] = field(init=False, default_factory=list)
    sampler_ports: list[int] = field(init=False, default_factory=list)
    envoy: EnvoyProcess | None = field(init=False, default=None)
    url: str = field(init=False, default="")
    admin_url: str = field(init=False, default="")
    reloader: RouteReloader | None = field(init=False, default=None)
    # spec.compare with rules: an observer, and Envoy rendered with the capture points.
    compare: CompareConfig | None = field(init=False, default=None)
    observer: ObserverProcess | None = field(init=False, default=None)

    @classmethod
    def from_settings(cls, settings: Settings, envoy: EnvoySettings, **kw: object) -> LocalStack:
        return cls(
            settings,
            envoy.listener_port,
            envoy.admin_port,
            envoy.message_timeout_ms,
            inline=bool(envoy.inline),
            engine=envoy.inline or DEFAULT_INLINE,
            sampler_ca=envoy.sampler_ca,
            sampler_client_cert=envoy.sampler_client_cert,
            sampler_client_key=envoy.sampler_client_key,
            **kw,  # type: ignore[arg-type]
        )

    def __post_init__(self) -> None:
        # Absolute: the children may run elsewhere, and reload must find it.
        if self.settings.config:
            self.settings = replace(self.settings, config=str(Path(self.settings.config).absolute()))
        text = read_manifest(self.settings)
        parsed = parse(self.settings, text)
        self.policy = policy_from(self.settings, parsed)
        if parsed is not None and parsed.compare is not None and parsed.compare.rules:
            self.compare = parsed.compare
        if self.inline and self.engine == "lua" and unsupported(self.policy):
            raise ConfigError(unsupported(self.policy))
        # Checked and built before anything starts: the Envoy version, the compiler.
        self.module_path = module_for_installed_envoy() if self.inline and self.engine == "module" else ""
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="mirror-sampler-up-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.config:
            # Started with Envoy; it judges edits against the text the policy was built from.
            # With the sampler too: a live edit may change the variant routes (a new target or
            # match), not only what the sampler decides, and the live view follows the policy.
            self.reloader = RouteReloader(self.settings, self, built_from=text)

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        try:
            check_port_free(self.listener_port, "--listener-port")
            check_port_free(self.admin_port, "--admin-port")
            for name in backend_names(self.policy):
                self._start_backend(name)
            # Inline, Envoy decides itself: no sampler process at all.
            for i in range(0 if self.inline else self.sampler_count):
                self.samplers.append(None)
                self.sampler_ports.append(0)
                self.start_sampler(i)
            if self.captures():
                self._start_observer()
            self._start_envoy()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Envoy first (no new traffic), then samplers, then backends."""
        if self.reloader is not None:
            self.reloader.stop()
        if self.envoy is not None:
            self.envoy.stop()
        for child in [self.observer, *self.samplers, *self.backends.values()]:
            if child is not None:
                child.stop()

    def children(self) -> dict[str, Child]:
        out: dict[str, Child] = {f"echo {n}": c for n, c in self.backends.items()}
        out.update({f"sampler {i}": c for i, c in enumerate(self.samplers) if c is not None})
        if self.observer is not None:
            out["observer"] = self.observer
        if self.envoy is not None and self.envoy.child is not None:
            out["envoy"] = self.envoy.child
        return out

    def _log(self, name: str) -> Path:
        assert self.log_dir is not None
        return self.log_dir / f"{name}.log"

    def _start_backend(self, name: str) -> None:
        try:
            echo = EchoProcess(name, host=LOOPBACK, log_path=self._log(f"echo-{name}"))
        except ChildFailed as e:
            raise StackError(str(e)) from None
        self.backends[name] = echo
        self.backend_ports[name] = echo.port

    def captures(self) -> bool:
        """Whether Envoy captures for spec.compare (with every engine)."""
        return self.compare is not None

    def _start_observer(self) -> None:
        assert self.log_dir is not None
        try:
            self.observer = ObserverProcess(
                self.settings.config,
                self.log_dir / "compare.db",
                routes=self.settings.config,
                env=slot_environment(self.settings.slot_headers),  # the sampler's slots: its routes read alike
                log_path=self._log("observer"),
            )
        except ChildFailed as e:
            raise StackError(str(e)) from None

    def start_sampler(self, index: int = 0, env: dict[str, str] | None = None) -> SamplerProcess:
        """(Re)start sampler ``index``; a restart reuses its port, which Envoy knows."""
        environ = {
            **self.settings.to_environ(),
            "MIRROR_LISTEN": f"{LOOPBACK}:{self.sampler_ports[index]}",
            "MIRROR_METRICS_LISTEN": f"{LOOPBACK}:0",
            # The "serving" line (info) is how the stack learns the ports.
            "MIRROR_LOG_LEVEL": "debug" if self.settings.log_level == "debug" else "info",
            **self.sampler_env,
            **(env or {}),
        }
        self.samplers[index] = None
        try:
            child = SamplerProcess(environ, name=f"sampler {index}", log_path=self._log(f"sampler-{index}"))
        except ChildFailed as e:
            raise StackError(str(e)) from None
        self.samplers[index] = child
        self.sampler_ports[index] = child.port
        return child

    def topology(self) -> Topology:
        return Topology(
            listener=Address(LOOPBACK, self.listener_port),
            admin=Address(LOOPBACK, self.admin_port),
            samplers=tuple(Address(LOOPBACK, p) for p in self.sampler_ports),
            backends={n: Address(LOOPBACK, p) for n, p in self.backend_ports.items()},
            message_timeout_ms=self.message_timeout_ms,
            inline=self.inline,
            rds_path=str(self.routes_file()) if self.reloader is not None else None,
            sampler_ca=self.sampler_ca,
            sampler_cert=self.sampler_client_cert,
            sampler_key=self.sampler_client_key,
        )

    def routes_file(self) -> Path:
        assert self.log_dir is not None
        return self.log_dir / "routes" / "routes.yaml"

    def capture_routes_file(self) -> Path:
        """The internal listener's routes (spec.compare), a directory of their own:
        Envoy reloads a file when any file is moved into its watched directory."""
        assert self.log_dir is not None
        return self.log_dir / "capture-routes" / "routes.yaml"

    def _start_envoy(self) -> None:
        assert self.log_dir is not None
        config = self._log("envoy").with_suffix(".yaml")
        if self.reloader is not None:
            write_routes(self.routes_file(), self.policy, self.topology(), self.discovery())
        if self.observer is not None and self.compare is not None:
            observers = [Address(LOOPBACK, self.observer.port)]
            module_path = self.module_path or None
            capture_rds_path = None
            if self.reloader is not None:
                write_capture_routes(self.capture_routes_file(), self.compare, self.policy)
                capture_rds_path = str(self.capture_routes_file())
            rendered = render_with_capture(
                self.policy, self.topology(), self.compare, observers, module_path=module_path, capture_rds_path=capture_rds_path
            )
            config.write_text(rendered)
        elif self.module_path:
            config.write_text(render_module(self.policy, self.topology(), self.module_path))
        else:
            config.write_text(render(self.policy, self.topology()))
        self.envoy = EnvoyProcess(config, self.log_dir)
        try:
            self.envoy.start()
            self.admin_url = self.envoy.admin_url
            self.url = f"http://{LOOPBACK}:{self.envoy.listener_port()}"
            self.wait_samplers_healthy()
        except EnvoyError as e:
            raise StackError(str(e)) from None
        if self.reloader is not None:
            self.reloader.start()

    def discovery(self) -> Discovery:
        """The routes file of the engine, with the capture points of the spec.compare
        in force when it is written (a live edit may change which rules compare)."""
        module_path = self.module_path
        engine: Discovery = (lambda policy, topology: module_route_discovery(policy, module_path)) if module_path else route_discovery

        def with_capture(policy: Policy, topology: Topology) -> dict[str, Any]:
            routes = engine(policy, topology)
            return add_capture_to_discovery(routes, self.compare) if self.compare is not None else routes

        return with_capture

    def routes_reloaded(self) -> None:
        """Envoy serves new routes: samplers restart on the file (they refuse a change of
        routes live), each on its port, so Envoy's cluster stays as it is. Envoy is seen to
        mark them down, then up again: a restart quicker than its health check would
        otherwise leave a stale verdict that fails requests open after the wait."""
        if self.inline:
            return
        print("mirror-sampler up: restarting the sampler on the new routes (requests meanwhile are not mirrored)", flush=True)
        running = [(i, s) for i, s in enumerate(self.samplers) if s is not None]
        for _, sampler in running:
            sampler.stop()
        deadline = time.monotonic() + 30
        self._wait_sampler_stat("membership_healthy", lambda healthy: healthy == 0, deadline, "the stopped samplers marked down by envoy")
        for index, _ in running:
            self.start_sampler(index)
        self.wait_samplers_healthy(deadline)
        # Healthy on the main thread may reach a busy worker later: one more passing check.
        passed = self.stat(f"cluster.{SAMPLER_CLUSTER}.health_check.success")
        self._wait_sampler_stat("health_check.success", lambda n: n > passed, deadline, "a second passing health check of the samplers")

    def refused(self, policy: Policy) -> list[str]:
        """What the engine cannot do (the sampler and the module do everything)."""
        return unsupported(policy) if self.inline and not self.module_path else []

    def wait_samplers_healthy(self, deadline: float | None = None) -> None:
        """Envoy health-checks the samplers; until one passes, requests go unmirrored."""
        want = sum(1 for s in self.samplers if s is not None and s.alive())
        self._wait_sampler_stat(
            "membership_healthy", lambda healthy: healthy >= want, deadline or time.monotonic() + 30, "sampler health in envoy"
        )

    def _wait_sampler_stat(self, stat: str, done: Callable[[int], bool], deadline: float, what: str) -> None:
        """Until Envoy's stat of the samplers' cluster satisfies ``done`` (EnvoyError past the deadline)."""
        assert self.envoy is not None
        while not done(self.stat(f"cluster.{SAMPLER_CLUSTER}.{stat}")):
            self.envoy.tick(deadline, what)

    def routes_reloads(self) -> int:
        return self.reloader.reloads() if self.reloader is not None and self.envoy is not None else 0

    def stats(self) -> dict[str, int]:
        """Envoy's counters and gauges (admin /stats)."""
        return self.envoy.stats() if self.envoy is not None else {}

    def stat(self, name: str) -> int:
        return self.stats().get(name, 0)


# --------------------------------------------------------------------------
# `up` as a command: the first screen, the live view, a clean stop


def example_requests(stack: LocalStack, tries: int = 10_000) -> list[str]:
    """Two curl commands for the first screen: one whose key the sampler
    mirrors, one whose key it does not, both found by asking the decision.
    Only for a rule a plain curl can reach (a path match, maybe a method);
    none when no rule is that simple or the key is not a header."""
    policy = stack.policy
    source = policy.key_chain[0]
    if source.kind is not KeyKind.HEADER:
        return []
    plan = Plan(policy)
    for route in policy.routes:
        host = next((h for h in route.hostnames if not h.startswith("*")), "")
        if route.hostnames and not host:
            continue
        for rule in route.rules:
            for match in rule.matches:
                if not rule.mirrors or match.headers or match.query_params or match.path.type is PathType.REGEX:
                    continue
                method = match.method or "GET"
                path = match.path.value if match.path.type is PathType.EXACT else match.path.prefix
                if policy.match(request_headers(path=path, host=host, method=method)) is not rule:
                    continue  # a more specific rule would take it
                found: dict[bool, str] = {}
                # The README's names first, so the screen and the README agree.
                for key in itertools.chain(("alice", "user-123"), (f"user-{i}" for i in range(tries))):
                    trace = plan.trace(request_headers([(source.name, key)], path=path, host=host, method=method), rule_id=rule.id)
                    found.setdefault(bool(trace.sampled), key)
                    if len(found) == 2:
                        break
                flags = (f"-X {method} " if method != "GET" else "") + (f"-H 'Host: {host}' " if host else "")
                what = {True: "mirrored", False: "not mirrored"}
                return [
                    f"  curl {flags}-H '{source.name}: {key}' {stack.url}{path}   # {what[m]}"
                    for m, key in sorted(found.items(), reverse=True)
                ]
    return []


def live_view(stack: LocalStack) -> list[str]:
    """Requests per primary and mirror; with an observer, the comparison per target."""
    rows = view_rows(stack.policy, stack.stats())
    if stack.observer is not None and stack.compare is not None:
        rows += compare_rows(live_targets(stack.compare, *stack.observer.counts()))
    return rows


def _compare_lines(stack: LocalStack) -> list[str]:
    if stack.observer is not None:
        report = f"mirror-sampler compare report --db {stack.observer.db} --config {stack.settings.config}"
        return [f"  compare: observer metrics {stack.observer.metrics_url}; report: {report}"]
    return []


def first_screen(stack: LocalStack) -> list[str]:
    metrics = [f"http://{LOOPBACK}:{s.metrics_port}/metrics" for s in stack.samplers if s is not None and s.metrics_port is not None]
    lines = [
        f"gateway ready: {stack.url} (Envoy admin {stack.admin_url})",
        f"  sampler metrics: {', '.join(metrics) if metrics else '(inline mode: Envoy decides, no sampler)'}",
        *_compare_lines(stack),
        f"  logs: {stack.log_dir}",
        "try:",
        *example_requests(stack),
    ]
    return lines


def run_up(settings: Settings, envoy: EnvoySettings, *, view: bool = True) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stack = LocalStack.from_settings(settings, envoy)
    try:
        stack.start()
    except (StackError, OSError) as e:
        print(f"mirror-sampler up: {e}", file=sys.stderr)
        return 1
    print("\n".join(first_screen(stack)), flush=True)
    interactive = sys.stdout.isatty() and view
    shown = 0
    last_print = 0.0
    code = 0
    try:
        while not stop.wait(1.0):
            dead = [(n, c) for n, c in stack.children().items() if not c.alive()]
            if dead:
                name, child = dead[0]
                print(f"mirror-sampler up: {name} exited with code {child.popen.returncode}: {child.last_words()}", file=sys.stderr)
                code = 1
                break
            if not view:
                continue
            rows = live_view(stack)
            if interactive:
                # Redraw in place: move up over the previous view, clear, print.
                sys.stdout.write(f"\x1b[{shown}F\x1b[J" if shown else "")
                sys.stdout.write("\n".join(rows) + "\n")
                sys.stdout.flush()
                shown = len(rows)
            elif time.monotonic() - last_print >= 10:
                print(" | ".join(r.strip() for r in rows), flush=True)
                last_print = time.monotonic()
    finally:
        stack.stop()
    return code
