"""What comparing the shadow costs (issue 17's `compare` row, docs/compare.md
"Cost"): the same stack with the comparison off and on, alternating in one run.

    .venv/bin/python bench/compare_cost.py [--duration 8] [--repeats 3] [--rate 100] [--percent 100]
        [--observers 2] [--baseline COMMIT ...] [--no-absent] [--apart] [--parts] [--sink] [--access-log] [--flush-ms MS ...]
        [--observers-apart | --observers-confined] [--shm]

Variants, each repeat in a rotated order (bench/testbed.py's stack: the
sampler, an Envoy ``--concurrency 1``, a second Envoy answering 200 as the
upstreams; one rule mirroring ``--percent`` of requests, 100 by default so
that every request measured is a mirrored one):

- ``off``: the configuration ``envoy-config`` renders without spec.compare;
- ``on``: with the capture points (``render_with_capture``: the Lua capture
  filter and Envoy's gRPC access log), every mirror compared, logged to
  ``--observers`` observers of this tree (`mirror-sampler compare capture`) on
  one SQLite file;
- ``on-COMMIT`` (``--baseline``): the same with the observers of that commit
  (``git archive``d, run from there with this Python environment);
- ``on-absent``: the capture points logging to addresses nobody listens
  on: a comparison that is down must not slow the primary;
- ``on-apart`` (``--apart``): ``on`` with the shadow's capture point moved out
  of the Envoy under test into a second Envoy (``--concurrency 1``) on a
  loopback port: the design alternative that takes the copy's pass and its
  capture off the primary's worker (docs/compare.md, "Capture"). Its
  observers are its own; the second Envoy's CPU is not in the Envoy column,
  and its mirrors are counted there, not in ``compared / mirrored``;
- ``on-no-primary-capture``, ``on-no-shadow-capture``, ``on-no-hop``
  (``--parts``): ``on`` with one part taken out (bench/compare_parts.py, as
  bench/compare_instructions.py counts them): the primary's capture, the
  shadow's capture, or the copy's pass through the internal listener (the
  copy then goes straight to the target, its capture with it);
- ``on-split-log`` (``--split-log``): ``on`` with the shadow's entries under a
  log name of their own, so on a stream of their own (the design first built);
- ``on-flush-MS`` (``--flush-ms MS``, repeatable): ``on`` with Envoy's access
  log sending what it holds every MS milliseconds instead of the rendered
  interval (a batch is serialised on the worker at once: smaller, more
  frequent batches trade the tail for more messages);
- ``on-sink`` (``--sink``): ``on`` logging to the sink of ``access-log``
  below (bench/access_log.py: it counts the bytes and nothing else) instead of
  observers: Envoy's whole share of ``on`` without the observers' CPU on the
  same cores (``on-absent`` has none either, but its Envoy retries a
  connection every flush and drops the batch);
- ``on-shm`` (``--shm``): ``on`` with its observers' SQLite file on /dev/shm
  (tmpfs) instead of the work folder's disk: what the store's writes cost
  the primary through the kernel (the file system's journal, writeback),
  which runs on whichever core it likes;
- ``access-log`` (``--access-log``): ``off`` plus Envoy's gRPC access log of
  both sides to a sink (bench/access_log.py): what a capture by access log
  costs the primary at least (no bodies, nothing compared); and
  ``access-log-bodies``, the same with both sides' bodies copied by Lua
  filters into what the log carries, the shadow's by an upstream filter of
  the target's cluster instead of ``on``'s internal listener (bench/access_log.py).

``--observers-apart`` runs every variant with the observers on a core of their
own: every observer process (all its threads) and the sink on the machine's
last core, and this process with all it starts (the Envoys, the sampler, wrk
and hey) on the others. That is the deployment docs/compare.md advises
(observers on another node, pod or CPU set), within one machine: ``off`` and
the ``on`` variants then differ by Envoy's own work, not by the observers'
CPU on Envoy's cores. ``--observers-confined`` pins the observers and the sink
the same way and leaves everything else free to run on any core, theirs
included (the kernel may wake Envoy on the other core when theirs is busy).

Each measurement: wrk (closed loop, 16 connections) for the throughput, then
hey at ``--rate`` req/s (open loop) for the primary's latency. After each, the
observers are given until their compared count stops moving, so a variant's
late joins are counted (and their CPU charged) in its own window. Figures:
req/s; p50/p99 at the fixed rate and their difference from ``off`` in the same
repeat; Envoy CPU µs per request; the observers' CPU µs per compared request
(utime+stime of all of them over the phase, divided by the pairs their
counters added) under wrk and at the fixed rate; captures dropped.
Medians over repeats. Writes bench/results/compare.{md,json} (``--output``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench.access_log import access_log, access_log_bodies, received, start_sink  # noqa: E402
from bench.compare_http2 import export  # noqa: E402
from bench.compare_parts import PARTS  # noqa: E402
from bench.procstat import code_state, cpu_seconds, for_each_thread, machine  # noqa: E402
from bench.run import WRK_CONNECTIONS, med, run_hey, run_wrk  # noqa: E402
from bench.testbed import (  # noqa: E402
    EXT_PROC_STATS,
    HEY_CONNECTIONS,
    LOOPBACK,
    MIRROR,
    PRIMARY,
    RESULTS,
    Stack,
    Variant,
    add_keep_work_argument,
    bench_policy,
    check_tools,
    free_port,
    primary_requests,
    start_envoy,
    start_stack,
    upstream_yaml,
    work_folder,
)
from bench.variants import Keys, listener_manager  # noqa: E402
from extproc.compare.cli import parse_config_text  # noqa: E402
from extproc.compare.envoy import CAPTURE_LISTENER, CAPTURE_SHADOW_CLUSTER, render_with_capture  # noqa: E402
from extproc.core.policy import Policy  # noqa: E402
from extproc.envoy.render import Address, Topology, render  # noqa: E402
from extproc.stack.observer import ObserverProcess  # noqa: E402

# The bench's policy is the simple mode's one rule.
COMPARE_YAML = f"compare:\n  rules:\n  - {{rule: simple, targets: [{MIRROR}]}}\n"
JUDGED = ("same", "differs", "noise_only")
# Entries Envoy's gRPC access log counts as dropped (its own stat; with no
# observer listening it counted 10 of ~1,700 entries in one run: not every loss).
LOGS_DROPPED = "access_logs.grpc_access_log.logs_dropped"


@dataclass
class Observers:
    """The observers one variant streams to (none for ``off``; unreachable addresses for ``on-absent``)."""

    processes: list[ObserverProcess] = field(default_factory=list)
    addresses: list[Address] = field(default_factory=list)

    def cpu(self) -> float:
        return sum(cpu_seconds(o.pid) for o in self.processes)

    def compared(self) -> int:
        total = 0.0
        for o in self.processes:
            results, _ = o.counts()
            total += sum(n for (_, _, result), n in results.items() if result in JUDGED)
        return int(total)

    def dropped(self) -> dict[str, int]:
        """Captures dropped so far, by reason (mirror_sampler_compare_dropped_total)."""
        out: dict[str, int] = {}
        for o in self.processes:
            with urllib.request.urlopen(o.metrics_url, timeout=5) as response:
                text = response.read().decode()
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    if s.name == "mirror_sampler_compare_dropped_total":
                        out[s.labels["reason"]] = out.get(s.labels["reason"], 0) + int(s.value)
        return out

    def settled(self, quiet_s: float = 1.0, bound_s: float = 30.0) -> int:
        """The compared count once the observers have joined what Envoy sent
        (no change for ``quiet_s``): one phase's late joins are not the next one's."""
        deadline = time.monotonic() + bound_s
        last, since = self.compared(), time.monotonic()
        while self.processes and time.monotonic() < deadline:
            time.sleep(0.2)
            now = self.compared()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                break
        return last

    def stop(self) -> None:
        for o in self.processes:
            o.stop()


def apart(rendered: str, capture_port: int) -> tuple[str, str]:
    """``render_with_capture``'s configuration split in two: the Envoy under test
    without the shadow capture listener, its shadow cluster pointing at
    ``capture_port``; and a second Envoy serving that listener there, with the
    clusters it routes to (the targets, the observers)."""
    config: dict[str, Any] = yaml.safe_load(rendered)
    k = Keys(config)
    resources = config[k("static_resources")]
    (listener,) = [entry for entry in resources["listeners"] if entry["name"] == CAPTURE_LISTENER]
    resources["listeners"].remove(listener)
    listener.pop(k("internal_listener"))
    listener["address"] = {k("socket_address"): {"address": LOOPBACK, k("port_value"): capture_port}}
    (shadow,) = [c for c in resources["clusters"] if c["name"] == CAPTURE_SHADOW_CLUSTER]
    endpoint = shadow[k("load_assignment")]["endpoints"][0][k("lb_endpoints")][0]["endpoint"]
    endpoint["address"] = {k("socket_address"): {"address": LOOPBACK, k("port_value"): capture_port}}
    capture = {
        k("static_resources"): {
            "listeners": [listener],
            "clusters": [c for c in resources["clusters"] if c["name"] != CAPTURE_SHADOW_CLUSTER],
        },
        "admin": {"address": {k("socket_address"): {"address": LOOPBACK, k("port_value"): 0}}},
    }
    return yaml.safe_dump(config, sort_keys=False), yaml.safe_dump(capture, sort_keys=False)


def split_log(rendered: str) -> str:
    """``on`` with the capture listener's access log under a log name of its own: Envoy
    then keeps a second stream per worker, and a request's sides reach the observers
    on two streams (docs/compare.md "Join across processes")."""
    config: dict[str, Any] = yaml.safe_load(rendered)
    k = Keys(config)
    for log in listener_manager(config, CAPTURE_LISTENER)[k("access_log")]:
        log[k("typed_config")][k("common_config")][k("log_name")] += "-shadow"
    return yaml.safe_dump(config, sort_keys=False)


def flush_every(rendered: str, milliseconds: int) -> str:
    """``rendered`` with every gRPC access log flushing every ``milliseconds``."""
    config: dict[str, Any] = yaml.safe_load(rendered)
    k = Keys(config)
    changed = 0
    for entry in config[k("static_resources")]["listeners"]:
        for log in listener_manager(config, entry["name"]).get(k("access_log"), []):
            log[k("typed_config")][k("common_config")][k("buffer_flush_interval")] = f"{milliseconds / 1000:g}s"
            changed += 1
    if not changed:
        raise SystemExit("--flush-ms: the rendered configuration has no access log")
    return yaml.safe_dump(config, sort_keys=False)


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` on ``cpus`` (threads it starts later inherit it)."""
    for_each_thread(pid, lambda thread: os.sched_setaffinity(thread, cpus))


def phase(stack: Stack, observers: Observers, load: Callable[[], Any]) -> dict[str, Any]:
    """One load phase with its CPU and counter deltas (observers settled before and after)."""
    observers.settled()
    stats0, envoy0, cpu0, compared0 = stack.envoy.stats(), cpu_seconds(stack.envoy.pid), observers.cpu(), observers.compared()
    dropped0 = observers.dropped()
    result = load()
    compared = observers.settled() - compared0
    cpu = observers.cpu() - cpu0
    envoy = cpu_seconds(stack.envoy.pid) - envoy0
    stats1 = stack.envoy.stats()
    requests = primary_requests(stats1) - primary_requests(stats0)
    mirrored = stats1.get(f"cluster.{MIRROR}.upstream_rq_total", 0) - stats0.get(f"cluster.{MIRROR}.upstream_rq_total", 0)
    fail_open = stats1.get(EXT_PROC_STATS + "failure_mode_allowed", 0) - stats0.get(EXT_PROC_STATS + "failure_mode_allowed", 0)
    envoy_dropped = stats1.get(LOGS_DROPPED, 0) - stats0.get(LOGS_DROPPED, 0)
    return {
        "load": result,
        "requests": requests,
        "mirrored_share": mirrored / requests if requests else float("nan"),
        "fail_open": fail_open,
        "envoy_cpu_us_per_req": envoy / requests * 1e6 if requests else float("nan"),
        "compared": compared,
        "observer_cpu_us_per_compared": cpu / compared * 1e6 if compared else float("nan"),
        "dropped": {reason: n - dropped0.get(reason, 0) for reason, n in observers.dropped().items() if n > dropped0.get(reason, 0)},
        "envoy_dropped": envoy_dropped,
    }


def measure(stack: Stack, observers: Observers, seconds: float, rate: int, connections: int) -> dict[str, Any]:
    run_wrk(stack.url, min(2, seconds))  # warm-up: connections, caches
    wrk = phase(stack, observers, lambda: run_wrk(stack.url, seconds))
    hey = phase(stack, observers, lambda: run_hey(stack.url, rate, seconds, connections))
    return {"wrk": wrk, "hey": hey}


def fmt(value: float, digits: int = 0) -> str:
    return "-" if value != value else f"{value:.{digits}f}"


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Medians over repeats; differences from ``off`` paired within each repeat."""
    off = runs["off"]
    out: dict[str, dict[str, float]] = {}
    for name, rs in runs.items():
        out[name] = {
            "rps": med([r["wrk"]["load"] for r in rs]),
            "rps_vs_off": med([r["wrk"]["load"] / o["wrk"]["load"] for r, o in zip(rs, off, strict=True)]),
            "p50_ms": med([r["hey"]["load"]["p50"] for r in rs]),
            "p99_ms": med([r["hey"]["load"]["p99"] for r in rs]),
            "added_p50_ms": med([r["hey"]["load"]["p50"] - o["hey"]["load"]["p50"] for r, o in zip(rs, off, strict=True)]),
            "added_p99_ms": med([r["hey"]["load"]["p99"] - o["hey"]["load"]["p99"] for r, o in zip(rs, off, strict=True)]),
            "envoy_cpu_us_per_req_wrk": med([r["wrk"]["envoy_cpu_us_per_req"] for r in rs]),
            "envoy_cpu_us_per_req_hey": med([r["hey"]["envoy_cpu_us_per_req"] for r in rs]),
            "observer_cpu_us_per_compared_wrk": med([r["wrk"]["observer_cpu_us_per_compared"] for r in rs]),
            "observer_cpu_us_per_compared_hey": med([r["hey"]["observer_cpu_us_per_compared"] for r in rs]),
            "compared": sum(r[p]["compared"] for r in rs for p in ("wrk", "hey")),
            "mirrored": sum(r[p]["mirrored_share"] * r[p]["requests"] for r in rs for p in ("wrk", "hey")),
            "dropped": sum(n for r in rs for p in ("wrk", "hey") for n in r[p]["dropped"].values()),
            "envoy_dropped": sum(r[p].get("envoy_dropped", 0) for r in rs for p in ("wrk", "hey")),
            "fail_open": sum(r[p]["fail_open"] for r in rs for p in ("wrk", "hey")),
            "mirrored_share": med([r["wrk"]["mirrored_share"] for r in rs]),
        }
    return out


def table(summary: dict[str, dict[str, float]], rate: int) -> list[str]:
    lines = [
        f"| variant | req/s (wrk) | vs off | p50 ms @{rate}/s | p99 ms | +p50 ms | +p99 ms | Envoy CPU µs/req (wrk, @{rate}) "
        f"| observers' CPU µs/compared (wrk, @{rate}) | compared / mirrored | dropped (observers, Envoy) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {fmt(s['rps'])} | {s['rps_vs_off']:.2f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | "
            f"{s['added_p50_ms']:+.1f} | {s['added_p99_ms']:+.1f} | "
            f"{fmt(s['envoy_cpu_us_per_req_wrk'])}, {fmt(s['envoy_cpu_us_per_req_hey'])} | "
            f"{fmt(s['observer_cpu_us_per_compared_wrk'])}, {fmt(s['observer_cpu_us_per_compared_hey'])} | "
            f"{int(s['compared'])} / {int(s['mirrored'])} | {int(s['dropped'])}, {int(s['envoy_dropped'])} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=8, help="seconds of each load phase (default 8)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every variant (default 3)")
    ap.add_argument("--rate", type=int, default=100, help="hey's fixed rate for the latency figures (default 100 req/s)")
    ap.add_argument(
        "--hey-connections",
        type=int,
        default=HEY_CONNECTIONS,
        help=f"hey's connections for the latency figures (default {HEY_CONNECTIONS}; -q is per connection, so their requests "
        "leave together and queue behind each other in Envoy's worker: 1 spaces them evenly)",
    )
    ap.add_argument("--percent", type=int, default=100, help="share of requests mirrored (default 100: every request is compared)")
    ap.add_argument("--observers", type=int, default=2, help="observer processes per variant (default 2)")
    ap.add_argument("--concurrency", type=int, default=1, help="Envoy --concurrency of the Envoy under test (default 1)")
    ap.add_argument("--baseline", action="append", default=[], help="also the observers of this commit (repeatable)")
    ap.add_argument("--no-absent", action="store_true", help="skip the on-absent variant")
    ap.add_argument("--apart", action="store_true", help="also on-apart: the shadow's capture point in a second Envoy")
    ap.add_argument("--split-log", action="store_true", help="also on-split-log: the shadow's entries under a log name of their own")
    ap.add_argument(
        "--parts",
        action="store_true",
        help="also on-no-primary-capture, on-no-shadow-capture, on-no-hop: `on` with that part taken out (bench/compare_parts.py)",
    )
    ap.add_argument("--access-log", action="store_true", help="also access-log: off plus Envoy's gRPC access log of both sides")
    ap.add_argument("--shm", action="store_true", help="also on-shm: on, with the observers' SQLite file on /dev/shm (tmpfs)")
    ap.add_argument("--sink", action="store_true", help="also on-sink: on, logging to a sink that only counts bytes instead of observers")
    ap.add_argument(
        "--flush-ms", type=int, action="append", default=[], help="also on-flush-MS: the access log flushing every MS ms (repeatable)"
    )
    placement = ap.add_mutually_exclusive_group()
    placement.add_argument(
        "--observers-apart",
        action="store_true",
        help="the observers and the sink on the last core, everything else on the others (observers on cores of their own)",
    )
    placement.add_argument(
        "--observers-confined",
        action="store_true",
        help="the observers and the sink on the last core, everything else on any core",
    )
    ap.add_argument("--output", type=Path, default=RESULTS, help="where compare.{md,json} go")
    add_keep_work_argument(ap)
    args = ap.parse_args(argv)
    check_tools()
    if args.observers_apart and len(os.sched_getaffinity(0)) < 2:
        ap.error(f"--observers-apart: this process may run on {len(os.sched_getaffinity(0))} core, and it needs two")
    for ms in args.flush_ms:
        if ms <= 0:
            ap.error(f"--flush-ms: {ms} is not a positive number of milliseconds")
    with work_folder("mirror-sampler-compare-bench-", args.keep_work) as workdir:
        return run_variants(args, argv, workdir)


def run_variants(args: argparse.Namespace, argv: list[str] | None, workdir: Path) -> int:
    cores = sorted(os.sched_getaffinity(0))
    observer_cores = set(cores[-1:])
    pinned = args.observers_apart or args.observers_confined
    if args.observers_apart:
        # Set before anything starts, so that every child inherits it.
        os.sched_setaffinity(0, set(cores[:-1]))
    load_start = os.getloadavg()[0]
    command = "python bench/compare_cost.py " + " ".join(sys.argv[1:] if argv is None else argv)
    policy = bench_policy(args.percent)
    settings = workdir / "compare.yaml"
    settings.write_text(COMPARE_YAML)
    compare = parse_config_text(COMPARE_YAML, str(settings))
    trees: dict[str, Path] = {"on": REPO, **{f"on-{c}": export(c, workdir) for c in args.baseline}}
    if args.apart:
        trees["on-apart"] = REPO
    if args.split_log:
        trees["on-split-log"] = REPO
    if args.parts:
        trees.update({f"on-{part}": REPO for part in PARTS})
    if args.shm:
        trees["on-shm"] = REPO
    for ms in args.flush_ms:
        trees[f"on-flush-{ms}"] = REPO
    observers: dict[str, Observers] = {"off": Observers()}
    in_memory: list[Path] = []  # stores on /dev/shm: removed at the end, unlike the work folder
    sink_port, sink_bytes = free_port(), workdir / "access-log-sink.bytes"
    try:
        for name, tree in trees.items():
            # Each variant's store in a folder of its own, away from the settings file's folder (which the observers watch).
            if name == "on-shm":
                folder = Path(tempfile.mkdtemp(prefix="mirror-sampler-compare-bench-", dir="/dev/shm"))
                in_memory.append(folder)
            else:
                folder = workdir / name
                folder.mkdir()
            db, env = folder / "compare.db", {"PYTHONPATH": str(tree)}
            started = [
                ObserverProcess(str(settings), db, routes=None, env=env, cwd=tree, log_path=workdir / f"{name}-observer-{i}.log")
                for i in range(args.observers)
            ]
            if pinned:
                for process in started:
                    pin(process.pid, observer_cores)
            observers[name] = Observers(started, [Address("127.0.0.1", o.port) for o in started])
        if not args.no_absent:
            # Ports bound and released at once: nobody listens there.
            observers["on-absent"] = Observers([], [Address("127.0.0.1", free_port()) for _ in range(args.observers)])
        if args.sink:
            observers["on-sink"] = Observers([], [Address("127.0.0.1", sink_port)])
        if args.access_log:
            observers["access-log"] = Observers()
            observers["access-log-bodies"] = Observers()
    except BaseException:
        for o in observers.values():
            o.stop()
        for folder in in_memory:
            shutil.rmtree(folder, ignore_errors=True)
        raise

    capture_port = free_port()

    def renderer(name: str) -> Callable[[Policy, Topology], str]:
        if name == "off":
            return render
        if name == "access-log":
            return lambda p, topology: yaml.safe_dump(access_log(yaml.safe_load(render(p, topology)), sink_port))
        if name == "access-log-bodies":
            return lambda p, topology: yaml.safe_dump(access_log_bodies(yaml.safe_load(render(p, topology)), sink_port, MIRROR))
        addresses = observers[name].addresses
        if name == "on-apart":
            return lambda p, topology: apart(render_with_capture(p, topology, compare, addresses), capture_port)[0]
        if name == "on-split-log":
            return lambda p, topology: split_log(render_with_capture(p, topology, compare, addresses))
        if name.removeprefix("on-") in PARTS:
            part = PARTS[name.removeprefix("on-")]
            return lambda p, topology: yaml.safe_dump(part(yaml.safe_load(render_with_capture(p, topology, compare, addresses))))
        if name.startswith("on-flush-"):
            ms = int(name.removeprefix("on-flush-"))
            return lambda p, topology: flush_every(render_with_capture(p, topology, compare, addresses), ms)
        return lambda p, topology: render_with_capture(p, topology, compare, addresses)

    variants = [Variant(name, renderer(name), processor="sampler", percent=args.percent) for name in observers]
    upstream_ports = {PRIMARY: free_port(), MIRROR: free_port()}
    upstream = start_envoy("upstream", upstream_yaml(upstream_ports, 0), workdir, 1)
    second = []
    sink = start_sink(sink_port, sink_bytes) if args.access_log or args.sink else None
    if sink is not None and pinned:
        pin(sink.pid, observer_cores)
    runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    try:
        if args.apart:
            # The second Envoy's half depends only on the observers and the upstreams: one for the whole run.
            topology = Topology(backends={n: Address(LOOPBACK, p) for n, p in upstream_ports.items()})
            rendered = render_with_capture(policy, topology, compare, observers["on-apart"].addresses)
            second.append(start_envoy("capture", apart(rendered, capture_port)[1], workdir, 1))
        for rep in range(args.repeats):
            for v in variants[rep % len(variants) :] + variants[: rep % len(variants)]:
                stack = start_stack(v, policy, upstream_ports, workdir, args.concurrency)
                try:
                    r = measure(stack, observers[v.name], args.duration, args.rate, args.hey_connections)
                finally:
                    stack.stop()
                runs[v.name].append(r)
                w, h = r["wrk"], r["hey"]
                print(
                    f"  [{rep + 1}/{args.repeats}] {v.name:<14} {w['load']:6.0f} req/s  p50 {h['load']['p50']:5.1f} ms  "
                    f"p99 {h['load']['p99']:6.1f} ms  envoy {w['envoy_cpu_us_per_req']:4.0f}/{h['envoy_cpu_us_per_req']:4.0f} µs/req  "
                    f"observers {fmt(w['observer_cpu_us_per_compared'])}/{fmt(h['observer_cpu_us_per_compared'])} µs/compared  "
                    f"compared {w['compared'] + h['compared']}  mirrored {w['mirrored_share']:.0%}  "
                    f"dropped {w['dropped'] or ''} {h['dropped'] or ''}  Envoy dropped {w['envoy_dropped']}/{h['envoy_dropped']}",
                    flush=True,
                )
    finally:
        upstream.stop()
        for envoy in second:
            envoy.stop()
        if sink is not None:
            sink.terminate()
            sink.wait(timeout=30)
        for o in observers.values():
            o.stop()
        for folder in in_memory:
            shutil.rmtree(folder, ignore_errors=True)
    summary = summarise(runs)
    info = machine()
    md = [
        f"# Comparing the shadow: cost ({datetime.date.today().isoformat()})",
        "",
        f"`{command}`",
        "",
        f"{info['nproc']} cores ({info['cpu']}), Python {info['python']}; load average (1 min) {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (other work on the machine). Code: {code_state()}.",
        f"{args.percent}% of requests mirrored, every mirror compared; {args.observers} observer(s) per `on` variant on one SQLite file; "
        f"Envoy --concurrency {args.concurrency}; wrk -t1 -c{WRK_CONNECTIONS} and hey -c{args.hey_connections} at {args.rate} req/s, "
        f"{args.duration:g} s each; {args.repeats} repeat(s), rotated order; medians."
        + (
            f" Observers apart: every observer and the sink on core {cores[-1]}, everything else on core(s) "
            f"{', '.join(map(str, cores[:-1]))}."
            if args.observers_apart
            else f" Observers confined: every observer and the sink on core {cores[-1]}, everything else on any core."
            if args.observers_confined
            else ""
        ),
        "",
        *table(summary, args.rate),
        "",
        "`+p50`/`+p99`: latency at the fixed rate minus `off`'s in the same repeat (median of the differences). "
        "Envoy CPU: utime+stime of the Envoy under test per request to the primary. Observers' CPU: of all the variant's "
        "observers over the phase (late joins included), per pair their counters added. `compared / mirrored`: pairs judged "
        "(same, differs, noise_only) against mirrored requests Envoy sent, both phases, all repeats. "
        "`dropped`: the observers' mirror_sampler_compare_dropped_total, and the entries Envoy's access log dropped "
        "(access_logs.grpc_access_log.logs_dropped). Per repeat: compare.json.",
    ]
    if args.access_log:
        md += ["", f"`access-log`: the sink received {received(sink_bytes):,} bytes of access log entries in all."]
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "compare.md").write_text("\n".join(md) + "\n")
    (args.output / "compare.json").write_text(
        json.dumps({"command": command, "machine": info, "summary": summary, "runs": runs}, indent=2) + "\n"
    )
    print("\n".join(md))
    fails = sum(s["fail_open"] for s in summary.values())
    if fails:
        print(f"note: {fails} requests passed fail-open (ext_proc errors)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
