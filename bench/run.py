"""Native Envoy mirroring vs Envoy + mirror-sampler, in one run, on this machine.

    .venv/bin/python bench/run.py [--duration S] [--repeats N] [--quick]

Variants (``VARIANTS`` below), run alternately, each repeat in a rotated order:

- ``native``: Envoy mirroring with ``runtime_fraction`` at the same percentage
  (the rendered configuration with the sampler's filters and variant routes
  taken out, the same mirror policy on the plain route);
- ``sampler``: the configuration ``envoyconf.render`` produces, with the sampler
  (``mirror-sampler serve``) as ext_proc; ``sampler-wN`` the same with
  ``MIRROR_WORKERS=N``.

Same Envoy binary, same ``--concurrency``, same upstreams: a second Envoy whose
listeners answer ``direct_response`` (so the upstreams are not the bottleneck).
Load: ``wrk`` (closed loop, throughput) and ``hey`` at fixed rates (latency
percentiles, computed here from hey's per-request CSV so p99.9 is exact).

Adding a variant (e.g. the decision inline in Envoy's Lua) is one entry in
``VARIANTS``: a function returning Envoy's YAML, and whether a sampler runs.

Writes bench/results/latest.{md,json,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from extproc.children import Child  # noqa: E402
from extproc.config import Settings, build_policy  # noqa: E402
from extproc.envoyconf import Address, Topology, render  # noqa: E402
from extproc.gateway import GatewayError  # noqa: E402
from extproc.gateway import envoy_binary as gateway_envoy_binary  # noqa: E402
from extproc.policy import Policy  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LOOPBACK = "127.0.0.1"
PERCENT = 50
PRIMARY, MIRROR = "backend", "mirror"
SAMPLER_ENV = {"MIRROR_BACKEND": MIRROR, "MIRROR_PRIMARY": PRIMARY, "MIRROR_PERCENT": str(PERCENT)}
RATES = (500, 1000, 2000)
HEY_CONNECTIONS = 10
WRK_CONNECTIONS = 16
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------
# Tools


def ensure_tools() -> None:
    missing = [t for t in ("wrk", "hey") if shutil.which(t) is None]
    if not missing:
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {' '.join(missing)} (apt-get)...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], check=False, stdout=subprocess.DEVNULL, env=env)
        subprocess.run(["apt-get", "install", "-y", *missing], check=False, stdout=subprocess.DEVNULL, env=env)
    still = [t for t in missing if shutil.which(t) is None]
    if still:
        sys.exit(f"bench: needs {' and '.join(still)}: install with `sudo apt-get install -y wrk hey` (Debian/Ubuntu packages)")


def envoy_binary() -> str:
    try:
        return gateway_envoy_binary()
    except GatewayError as e:
        sys.exit(f"bench: {e}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# Process accounting (/proc)


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (a supervisor's workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo.extend(int(c) for c in Path(f"/proc/{p}/task/{task}/children").read_text().split())
        except OSError:
            pass
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of pid and its children, in seconds."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def rss_mib(pid: int) -> float:
    total = 0
    for p in process_tree(pid):
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1])
        except OSError:
            continue
    return total * PAGE / 2**20


# --------------------------------------------------------------------------
# Envoy configurations


def bench_policy() -> Policy:
    return build_policy(Settings.load(SAMPLER_ENV))


def upstream_yaml(ports: dict[str, int], admin_path_port: int) -> str:
    """A second Envoy answering 200 on one listener per backend."""
    listeners = []
    for name, port in ports.items():
        listeners.append(
            {
                "name": name,
                "address": {"socket_address": {"address": LOOPBACK, "port_value": port}},
                "filter_chains": [
                    {
                        "filters": [
                            {
                                "name": "envoy.filters.network.http_connection_manager",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                    "stat_prefix": name,
                                    "route_config": {
                                        "virtual_hosts": [
                                            {
                                                "name": name,
                                                "domains": ["*"],
                                                "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": f"{name}\n"}}}],
                                            }
                                        ]
                                    },
                                    "http_filters": [
                                        {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
                                    ],
                                },
                            }
                        ]
                    }
                ],
            }
        )
    return yaml.safe_dump(
        {"admin": {"address": {"socket_address": {"address": LOOPBACK, "port_value": admin_path_port}}}, "static_resources": {"listeners": listeners}}
    )


_DENOMINATORS = {100: "HUNDRED", 10_000: "TEN_THOUSAND", 1_000_000: "MILLION"}


def native_yaml(policy: Policy, topology: Topology) -> str:
    """The sampler's configuration with the sampler taken out: no Lua, no
    ext_proc, no variant routes; each rule's plain route mirrors every target
    with ``runtime_fraction`` at the target's fraction."""
    config = yaml.safe_load(render(policy, topology))
    resources = config["staticResources"]
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] != "mirror-sampler"]
    for lst in resources["listeners"]:
        for chain in lst["filterChains"]:
            for f in chain["filters"]:
                hcm = f["typedConfig"]
                hcm["httpFilters"] = [h for h in hcm["httpFilters"] if h["name"] == "envoy.filters.http.router"]
                rules = {r.id: r for r in policy.rules}
                for vhost in hcm["routeConfig"]["virtualHosts"]:
                    plain = []
                    variants: dict[str, dict[str, Any]] = {}
                    for r in vhost.get("routes", []):
                        rule_id, sep, _ = r["name"].partition(" mirror ")
                        if sep:
                            variants.setdefault(rule_id, r)  # the first variant has every target
                        else:
                            plain.append(r)
                    for r in plain:
                        r.pop("typedPerFilterConfig", None)
                        rule = rules.get(r["name"])
                        if rule is None or not rule.mirrors or r["name"] not in variants:
                            continue
                        policies = variants[r["name"]]["route"]["requestMirrorPolicies"]
                        for mp, target in zip(policies, rule.mirrors):
                            num, den = target.fraction.numerator, target.fraction.denominator
                            if den not in _DENOMINATORS:  # nearest per-million
                                num, den = round(num * 1_000_000 / den), 1_000_000
                            mp["runtimeFraction"] = {"defaultValue": {"numerator": num, "denominator": _DENOMINATORS[den]}}
                        r["route"]["requestMirrorPolicies"] = policies
                    vhost["routes"] = plain
    return yaml.safe_dump(config, sort_keys=False)


@dataclass
class Variant:
    name: str
    envoy_yaml: Callable[[Policy, Topology], str]
    workers: int = 0  # samplers' MIRROR_WORKERS; 0: no sampler


def variants(workers: list[int]) -> list[Variant]:
    out = [Variant("native", native_yaml)]
    for w in workers:
        out.append(Variant("sampler" if w == 1 else f"sampler-w{w}", render, w))
    # The same policy decided in Envoy itself (generated Lua), no sampler.
    out.append(Variant("inline", lambda p, t: render(p, dataclasses.replace(t, inline=True))))
    return out


# --------------------------------------------------------------------------
# The stack


class Envoy(Child):
    def __init__(self, name: str, config: str, workdir: Path, concurrency: int) -> None:
        path = workdir / f"{name}.yaml"
        path.write_text(config)
        admin_path = workdir / f"{name}-admin.txt"
        super().__init__(
            name,
            [envoy_binary(), "-c", str(path), "--concurrency", str(concurrency), "--log-level", "warning",
             "--use-dynamic-base-id", "--admin-address-path", str(admin_path)],
            log_path=workdir / f"{name}.log",
        )
        deadline = time.monotonic() + 30
        while True:
            if not self.alive():
                raise RuntimeError(f"{name} exited: {self.last_words()}")
            text = admin_path.read_text().strip() if admin_path.exists() else ""
            if text:
                self.admin = f"http://{text}"
                try:
                    if self.get("/ready").strip() == "LIVE":
                        break
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready: {self.last_words()}")
            time.sleep(0.1)

    def get(self, path: str) -> str:
        return urllib.request.urlopen(self.admin + path, timeout=5).read().decode()

    def stats(self) -> dict[str, int]:
        out = {}
        for line in self.get("/stats?usedonly").splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name] = int(value)
        return out


class Sampler(Child):
    def __init__(self, port: int, workers: int, workdir: Path) -> None:
        env = {
            **SAMPLER_ENV,
            "MIRROR_LISTEN": f"{LOOPBACK}:{port}",
            "MIRROR_METRICS_LISTEN": f"{LOOPBACK}:0",
            "MIRROR_LOG_FORMAT": "json",
            "MIRROR_WORKERS": str(workers),
            "MIRROR_SHUTDOWN_GRACE": "1",
        }
        super().__init__(f"sampler-w{workers}", [sys.executable, "-m", "extproc", "serve"], env=env, log_path=workdir / f"sampler-w{workers}.log")
        for i in range(workers):
            # One "serving" line per worker (a single process logs one).
            self.wait_event("serving", timeout=60, after=0)
        time.sleep(0.5 if workers > 1 else 0)


@dataclass
class Stack:
    variant: Variant
    envoy: Envoy
    url: str
    sampler: Sampler | None = None

    def stop(self) -> None:
        self.envoy.stop()
        if self.sampler is not None:
            self.sampler.stop()


def start_stack(variant: Variant, policy: Policy, upstreams: dict[str, int], workdir: Path, concurrency: int) -> Stack:
    sampler = None
    sampler_port = free_port()
    if variant.workers:
        sampler = Sampler(sampler_port, variant.workers, workdir)
    port = free_port()
    topology = Topology(
        listener=Address(LOOPBACK, port),
        admin=Address(LOOPBACK, 0),
        samplers=(Address(LOOPBACK, sampler_port),),
        backends={n: Address(LOOPBACK, p) for n, p in upstreams.items()},
    )
    envoy = Envoy(f"envoy-{variant.name}", variant.envoy_yaml(policy, topology), workdir, concurrency)
    stack = Stack(variant, envoy, f"http://{LOOPBACK}:{port}/", sampler)
    if sampler is not None:
        deadline = time.monotonic() + 30
        while envoy.stats().get("cluster.mirror-sampler.membership_healthy", 0) < 1:
            if time.monotonic() > deadline:
                stack.stop()
                raise RuntimeError("sampler never became healthy in Envoy")
            time.sleep(0.2)
    return stack


# --------------------------------------------------------------------------
# Load


def run_wrk(url: str, seconds: float, connections: int = WRK_CONNECTIONS) -> float:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", url], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise RuntimeError(f"wrk output without Requests/sec: {out}")


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(p / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def run_hey(url: str, rate: int, seconds: float) -> dict[str, float]:
    c = HEY_CONNECTIONS
    out = subprocess.run(
        ["hey", "-z", f"{max(1, round(seconds))}s", "-c", str(c), "-q", str(rate // c), "-o", "csv", url],
        capture_output=True, text=True, check=True,
    ).stdout
    lat, errors = [], 0
    for line in out.splitlines()[1:]:
        parts = line.split(",")
        if len(parts) < 7:
            continue
        if parts[6] != "200":
            errors += 1
        lat.append(float(parts[0]) * 1000)
    lat.sort()
    return {
        "rps": len(lat) / max(1, round(seconds)),
        "p50": percentile(lat, 50),
        "p99": percentile(lat, 99),
        "p999": percentile(lat, 99.9),
        "errors": errors,
        "n": len(lat),
    }


# --------------------------------------------------------------------------
# One measurement of one variant


def measure(stack: Stack, seconds: float, rates: tuple[int, ...]) -> dict[str, Any]:
    pid = stack.sampler.pid if stack.sampler else None
    result: dict[str, Any] = {}
    run_wrk(stack.url, min(2, seconds))  # warm-up: connections, caches
    before = stack.envoy.stats()
    cpu0 = cpu_seconds(pid) if pid else 0.0
    result["rps"] = run_wrk(stack.url, seconds)
    after = stack.envoy.stats()
    cpu1 = cpu_seconds(pid) if pid else 0.0
    requests = after.get(f"cluster.{PRIMARY}.upstream_rq_total", 0) - before.get(f"cluster.{PRIMARY}.upstream_rq_total", 0)
    mirrored = after.get(f"cluster.{MIRROR}.upstream_rq_total", 0) - before.get(f"cluster.{MIRROR}.upstream_rq_total", 0)
    result["mirrored_share"] = mirrored / requests if requests else 0.0
    ext = "http.ingress_http.ext_proc."
    result["fail_open"] = after.get(ext + "failure_mode_allowed", 0) - before.get(ext + "failure_mode_allowed", 0)
    if pid:
        result["cpu_us_per_req_wrk"] = (cpu1 - cpu0) / requests * 1e6 if requests else float("nan")
    for rate in rates:
        cpu0 = cpu_seconds(pid) if pid else 0.0
        before = stack.envoy.stats()
        h = run_hey(stack.url, rate, seconds)
        after = stack.envoy.stats()
        if pid:
            n = after.get(f"cluster.{PRIMARY}.upstream_rq_total", 0) - before.get(f"cluster.{PRIMARY}.upstream_rq_total", 0)
            h["cpu_us_per_req"] = (cpu_seconds(pid) - cpu0) / n * 1e6 if n else float("nan")
        result["fail_open"] += after.get(ext + "failure_mode_allowed", 0) - before.get(ext + "failure_mode_allowed", 0)
        result[f"hey{rate}"] = h
    return result


def soak(stack: Stack, seconds: float, rate: int = 1000) -> dict[str, Any]:
    """RSS of the sampler every 2 s under a steady rate."""
    assert stack.sampler is not None
    pid = stack.sampler.pid
    c = HEY_CONNECTIONS
    proc = subprocess.Popen(["hey", "-z", f"{round(seconds)}s", "-c", str(c), "-q", str(rate // c), stack.url], stdout=subprocess.DEVNULL)
    samples = []
    start = time.monotonic()
    while proc.poll() is None:
        samples.append((round(time.monotonic() - start, 1), round(rss_mib(pid), 2)))
        time.sleep(2)
    half = [r for t, r in samples if t >= seconds / 2]
    return {
        "seconds": seconds,
        "rate": rate,
        "samples": samples,
        "rss_first": samples[0][1] if samples else None,
        "rss_last": samples[-1][1] if samples else None,
        "rss_max": max(r for _, r in samples) if samples else None,
        # Growth over the second half: flat means ~0.
        "second_half_growth_mib": round(half[-1] - half[0], 2) if len(half) > 1 else None,
    }


# --------------------------------------------------------------------------
# Report


def med(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def summarise(runs: dict[str, list[dict[str, Any]]], rates: tuple[int, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        s: dict[str, Any] = {"rps": med([r["rps"] for r in rs]), "mirrored_share": med([r["mirrored_share"] for r in rs]), "fail_open": sum(r["fail_open"] for r in rs)}
        if "cpu_us_per_req_wrk" in rs[0]:
            s["cpu_us_per_req_wrk"] = med([r["cpu_us_per_req_wrk"] for r in rs])
        for rate in rates:
            k = f"hey{rate}"
            s[k] = {m: med([r[k][m] for r in rs]) for m in rs[0][k]}
        out[name] = s
    return out


def fmt(v: float, nd: int = 2) -> str:
    return "n/a" if v != v else f"{v:.{nd}f}"


def table(summary: dict[str, Any], rates: tuple[int, ...], rss: dict[str, tuple[float, float]]) -> str:
    native = summary["native"]
    lines = [
        "| variant | wrk req/s | vs native | mirrored | fail-open | CPU µs/req (wrk) | RSS MiB start → end | "
        + " | ".join(f"+p50/+p99/+p99.9 ms @{r}" for r in rates)
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(rates),
    ]
    for name, s in summary.items():
        cells = [name, f"{s['rps']:.0f}", f"{s['rps'] / native['rps']:.0%}", f"{s['mirrored_share']:.1%}", str(s["fail_open"])]
        cells.append(fmt(s.get("cpu_us_per_req_wrk", float("nan")), 0))
        cells.append(f"{rss[name][0]:.1f} → {rss[name][1]:.1f}" if name in rss else "–")
        for rate in rates:
            h, n = s[f"hey{rate}"], native[f"hey{rate}"]
            if name == "native":
                cells.append(f"{fmt(h['p50'])}/{fmt(h['p99'])}/{fmt(h['p999'])} (abs)")
            else:
                cells.append("/".join(fmt(h[m] - n[m]) for m in ("p50", "p99", "p999")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model or platform.processor(), "kernel": platform.release(), "python": platform.python_version()}


def chart(summary: dict[str, Any], rates: tuple[int, ...], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1, 1.6]})
    native = summary["native"]["rps"]
    bars = ax1.bar(names, [summary[n]["rps"] for n in names], color=["#888888"] + ["#1f77b4", "#2ca02c", "#d62728", "#9467bd"][: len(names) - 1])
    for b, n in zip(bars, names):
        ax1.annotate(f"{summary[n]['rps']:.0f}\n{summary[n]['rps'] / native:.0%}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=9)
    ax1.set_title(f"Throughput (wrk -c{WRK_CONNECTIONS}, closed loop)")
    ax1.set_ylabel("requests/s")
    ax1.axhline(native * 0.5, ls="--", color="#aa3333", lw=1)
    ax1.text(len(names) - 0.5, native * 0.5, "50% of native", color="#aa3333", fontsize=8, ha="right", va="bottom")
    ax1.set_ylim(0, native * 1.25)
    others = [n for n in names if n != "native"]
    width = 0.8 / max(1, len(others) * 3)
    metrics = ("p50", "p99", "p999")
    for i, n in enumerate(others):
        for j, m in enumerate(metrics):
            xs = [k + (i * 3 + j) * width - 0.4 + width / 2 for k in range(len(rates))]
            ys = [summary[n][f"hey{r}"][m] - summary["native"][f"hey{r}"][m] for r in rates]
            ax2.bar(xs, ys, width, label=f"{n} +{m.replace('p999', 'p99.9')}", alpha=[1, 0.7, 0.45][j], color=["#1f77b4", "#2ca02c", "#d62728", "#9467bd"][i % 4])
    top = max([summary[n][f"hey{r}"][m] - summary["native"][f"hey{r}"][m] for n in others for r in rates for m in metrics] + [1.5])
    ax2.set_ylim(0, top * 1.35)  # room for the legend
    ax2.axhline(1.5, ls="--", color="#aa3333", lw=1)
    ax2.text(len(rates) - 0.5, 1.5, "p99 target 1.5 ms", color="#aa3333", fontsize=8, ha="right", va="bottom")
    ax2.set_xticks(range(len(rates)), [f"{r} req/s" for r in rates])
    ax2.set_ylabel("ms added over native")
    ax2.set_title("Added latency (hey, fixed rate)")
    ax2.legend(fontsize=8, ncol=max(1, len(others)))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10, help="seconds per load phase (default 10)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every variant; medians are reported (default 3)")
    ap.add_argument("--soak", type=float, default=120, help="seconds of steady 1000 req/s on the sampler for the memory check; 0: skip (default 120)")
    ap.add_argument("--workers", default="1,2", help="sampler worker counts to run, comma-separated (default 1,2)")
    ap.add_argument("--concurrency", type=int, default=1, help="Envoy --concurrency for the Envoy under test (default 1)")
    ap.add_argument("--upstream-concurrency", type=int, default=1, help="Envoy --concurrency of the direct_response upstream (default 1)")
    ap.add_argument("--rates", default=",".join(map(str, RATES)), help="hey rates, req/s (default 500,1000,2000)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 3 s phases, 1 repeat, 10 s soak")
    ap.add_argument("--output", type=Path, default=RESULTS, help="where latest.{md,json,png} go")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.repeats, args.soak = 3, 1, 10
    rates = tuple(int(r) for r in args.rates.split(","))
    ensure_tools()
    policy = bench_policy()
    vs = variants([int(w) for w in args.workers.split(",") if w.strip()])
    workdir = Path(tempfile.mkdtemp(prefix="mirror-sampler-bench-"))
    print(f"bench: {os.cpu_count()} cores, Envoy --concurrency {args.concurrency}, {args.duration:g} s phases, {args.repeats} repeat(s); logs in {workdir}", flush=True)

    upstream_ports = {PRIMARY: free_port(), MIRROR: free_port()}
    upstream = Envoy("upstream", upstream_yaml(upstream_ports, 0), workdir, args.upstream_concurrency)
    runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in vs}
    rss: dict[str, tuple[float, float]] = {}
    soak_result: dict[str, Any] | None = None
    started = time.time()
    try:
        for rep in range(args.repeats):
            order = vs[rep % len(vs):] + vs[: rep % len(vs)]
            for v in order:
                stack = start_stack(v, policy, upstream_ports, workdir, args.concurrency)
                try:
                    rss_start = rss_mib(stack.sampler.pid) if stack.sampler else 0.0
                    r = measure(stack, args.duration, rates)
                    if stack.sampler:
                        r["rss_start"], r["rss_end"] = rss_start, rss_mib(stack.sampler.pid)
                        if rep == args.repeats - 1 and v.workers == 1 and args.soak > 0:
                            soak_result = soak(stack, args.soak)
                    runs[v.name].append(r)
                    line = f"  [{rep + 1}/{args.repeats}] {v.name:<11} wrk {r['rps']:7.0f} req/s"
                    line += "".join(f"  @{rate}: p50 {r[f'hey{rate}']['p50']:.2f} p99 {r[f'hey{rate}']['p99']:.2f} p99.9 {r[f'hey{rate}']['p999']:.2f}" for rate in rates)
                    if stack.sampler:
                        line += f"  cpu {r['cpu_us_per_req_wrk']:.0f} µs/req  mirrored {r['mirrored_share']:.0%}  fail-open {r['fail_open']}"
                    print(line, flush=True)
                finally:
                    stack.stop()
    finally:
        upstream.stop()

    summary = summarise(runs, rates)
    for name, rs in runs.items():
        if "rss_start" in rs[0]:
            rss[name] = (med([r["rss_start"] for r in rs]), med([r["rss_end"] for r in rs]))
    info = machine()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    tbl = table(summary, rates, rss)
    head = (
        f"Machine: {info['nproc']} cores, {info['cpu']}, Linux {info['kernel']}, Python {info['python']}. "
        f"Envoy --concurrency {args.concurrency} (upstream {args.upstream_concurrency}); wrk -t1 -c{WRK_CONNECTIONS} and "
        f"hey -c{HEY_CONNECTIONS} at fixed rates, {args.duration:g} s phases, medians of {args.repeats} repeat(s); "
        f"{PERCENT}% mirrored. Load generators, both Envoys and the sampler share the same cores."
    )
    soak_line = ""
    if soak_result:
        soak_line = (
            f"Sampler RSS over {soak_result['seconds']:.0f} s at {soak_result['rate']} req/s: first {soak_result['rss_first']} MiB, "
            f"last {soak_result['rss_last']} MiB, max {soak_result['rss_max']} MiB, growth over the second half {soak_result['second_half_growth_mib']} MiB."
        )
    print()
    print(head)
    print(tbl)
    if soak_line:
        print(soak_line)
    args.output.mkdir(parents=True, exist_ok=True)
    md = [
        "# Benchmark: native Envoy mirroring vs Envoy + mirror-sampler",
        "",
        f"Date: {date}. Command: `.venv/bin/python bench/run.py {' '.join(sys.argv[1:] if argv is None else argv)}`".rstrip() + f" ({time.time() - started:.0f} s).",
        "",
        head,
        "",
        tbl,
        "",
        "`vs native`: wrk throughput as a share of native Envoy's, same run. `+p50/+p99/+p99.9`: latency added over native at that rate "
        "(medians of the per-repeat percentiles; the native row shows its absolute values). `mirrored`: share of requests Envoy mirrored "
        f"(target {PERCENT}%). `fail-open`: requests ext_proc let through unanswered (timeouts, errors): should be 0. CPU: sampler "
        "utime+stime (all its processes) per request during the wrk phase. RSS: sampler resident memory at start and after its phases "
        "(with workers: supervisor and workers together). hey reports latency in 0.1 ms steps. Where the time goes: bench/PROFILE.md.",
        "",
    ]
    if soak_line:
        md += [soak_line, ""]
    md += ["![throughput and added latency](latest.png)", ""]
    (args.output / "latest.md").write_text("\n".join(md))
    (args.output / "latest.json").write_text(
        json.dumps({"date": date, "machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "summary": summary, "soak": soak_result}, indent=1)
    )
    try:
        chart(summary, rates, args.output / "latest.png", f"mirror-sampler bench, {date}, {info['nproc']} cores ({info['cpu']}), Envoy --concurrency {args.concurrency}")
    except ImportError:
        print("bench: matplotlib missing, no chart: pip install -e '.[bench]'", file=sys.stderr)
    print(f"\nwrote {args.output / 'latest.md'}, latest.json, latest.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
