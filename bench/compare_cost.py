"""What comparing the shadow costs (docs/compare.md): the same stack with the
comparison off and on, in one run, alternating. "on" is the configuration
`envoy-config` renders with spec.compare (the capture points) and observers
(`mirror-sampler compare capture`, one per core, one SQLite file); the rule
mirrors 50% (bench/testbed.py) and compares every mirror.

    .venv/bin/python bench/compare_cost.py [--duration 8] [--repeats 2] [--rate 100] [--observers 2]

Prints per repeat and the medians: req/s (wrk, saturating), the primary's
latency at a fixed rate (hey), Envoy's CPU per request, the observers' CPU per
compared request, and how many were compared (the observers' counter), so that
"on" visibly compared what it mirrored. Ratios are paired within a repeat.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.procstat import cpu_seconds  # noqa: E402
from bench.run import measure  # noqa: E402
from bench.testbed import MIRROR, PRIMARY, Variant, bench_policy, check_tools, free_port, start_envoy, start_stack, upstream_yaml  # noqa: E402
from extproc.compare.cli import parse_config_text  # noqa: E402
from extproc.compare.envoy import render_with_capture  # noqa: E402
from extproc.core.policy import Policy  # noqa: E402
from extproc.envoy.render import Address, Topology, render  # noqa: E402
from extproc.stack.observer import ObserverProcess  # noqa: E402

# The bench's policy is the simple mode's one rule.
COMPARE_YAML = f"compare:\n  rules:\n  - {{rule: simple, targets: [{MIRROR}]}}\n"


def compared(observers: list[ObserverProcess]) -> int:
    total = 0.0
    for o in observers:
        results, _ = o.counts()
        total += sum(n for (_, _, result), n in results.items() if result in ("same", "differs", "noise_only"))
    return int(total)


def settled(observers: list[ObserverProcess], quiet_s: float = 1.0, bound_s: float = 30.0) -> int:
    """The compared count once the observers have joined what Envoy sent (no change for ``quiet_s``),
    so that one variant's late joins are not counted in the next one's window."""
    deadline = time.monotonic() + bound_s
    last, since = compared(observers), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = compared(observers)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=8, help="seconds of load per measurement (default 8)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of off and on (default 2)")
    ap.add_argument("--rate", type=int, default=100, help="hey's fixed rate for the latency figures (default 100 req/s)")
    ap.add_argument("--observers", type=int, default=2, help="observer processes (default 2)")
    ap.add_argument("--concurrency", type=int, default=1, help="Envoy --concurrency of the Envoy under test (default 1)")
    args = ap.parse_args(argv)
    check_tools()
    policy = bench_policy()
    workdir = Path(tempfile.mkdtemp(prefix="mirror-sampler-compare-bench-"))
    (workdir / "compare.yaml").write_text(COMPARE_YAML)
    compare = parse_config_text(COMPARE_YAML, "compare.yaml")
    observers = [
        ObserverProcess(str(workdir / "compare.yaml"), workdir / "compare.db", routes=None, log_path=workdir / f"observer-{i}.log")
        for i in range(args.observers)
    ]
    addresses = [Address("127.0.0.1", o.port) for o in observers]

    def with_capture(p: Policy, topology: Topology) -> str:
        return render_with_capture(p, topology, compare, addresses)

    variants = [Variant("off", render, processor="sampler"), Variant("on", with_capture, processor="sampler")]
    upstream_ports = {PRIMARY: free_port(), MIRROR: free_port()}
    upstream = start_envoy("upstream", upstream_yaml(upstream_ports, 0), workdir, 1)
    runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    try:
        for rep in range(args.repeats):
            for v in variants if rep % 2 == 0 else variants[::-1]:
                stack = start_stack(v, policy, upstream_ports, workdir, args.concurrency)
                cpu0, compared0 = sum(cpu_seconds(o.pid) for o in observers), compared(observers)
                try:
                    r = measure(stack, args.duration, (args.rate,))
                finally:
                    stack.stop()
                r["compared"] = settled(observers) - compared0
                cpu = sum(cpu_seconds(o.pid) for o in observers) - cpu0
                r["observer_cpu_ms_per_compared"] = cpu / r["compared"] * 1e3 if r["compared"] else float("nan")
                runs[v.name].append(r)
                h = r[f"hey{args.rate}"]
                print(
                    f"  [{rep + 1}/{args.repeats}] {v.name:<4} {r['rps']:7.0f} req/s  p50 {h['p50']:6.2f} ms  p99 {h['p99']:6.2f} ms"
                    f"  envoy {r['envoy_cpu_us_per_req_wrk']:6.1f} µs/req  compared {r['compared']}",
                    flush=True,
                )
    finally:
        upstream.stop()
        for o in observers:
            o.stop()
    print(
        f"\n| comparison | req/s | vs off | p50 ms at {args.rate}/s | p99 ms | Envoy CPU µs/req | observers' CPU ms/compared | compared |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for v in variants:
        rows = runs[v.name]

        def med(key: str, rows: list[dict[str, Any]] = rows) -> float:
            return float(statistics.median(r[key] if not key.startswith("hey") else r[f"hey{args.rate}"][key[3:]] for r in rows))

        ratio = statistics.median(r["rps"] / o["rps"] for r, o in zip(rows, runs["off"], strict=True))
        observer_ms = med("observer_cpu_ms_per_compared") if v.name == "on" else float("nan")
        print(
            f"| {v.name} | {med('rps'):.0f} | {ratio:.2f} | {med('heyp50'):.2f} | {med('heyp99'):.2f} | "
            f"{med('envoy_cpu_us_per_req_wrk'):.1f} | {observer_ms:.2f} | {sum(r['compared'] for r in rows)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
