"""Envoy's CPU per request for the three in-Envoy ways to mirror 50%: native
(``runtime_fraction``), the dynamic module (``--inline module``) and the inline Lua
(``--inline lua``), in one run, alternating, with bench/run.py's stacks and wrk load.

    .venv/bin/python bench/module_cpu.py [--duration 10] [--repeats 3] [--concurrency 1]

Prints per repeat and the medians; the figure that matters is Envoy CPU µs/request
(and its difference from native: what deciding in Envoy costs), measured from
/proc for the Envoy under test only. Ratios are paired within a repeat.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.run import measure  # noqa: E402
from bench.testbed import (  # noqa: E402
    MIRROR,
    PRIMARY,
    Variant,
    add_keep_work_argument,
    bench_policy,
    check_tools,
    free_port,
    start_envoy,
    start_stack,
    upstream_yaml,
    work_folder,
)
from bench.variants import inline_yaml, native_yaml  # noqa: E402
from extproc.core.policy import Policy  # noqa: E402
from extproc.envoy.module import render_module  # noqa: E402
from extproc.envoy.render import Topology  # noqa: E402
from extproc.module.support import module_for  # noqa: E402
from extproc.stack.envoy import envoy_binary  # noqa: E402


def module_variant() -> Variant:
    path = module_for(envoy_binary())

    def yaml_text(policy: Policy, topology: Topology) -> str:
        return render_module(policy, topology, path)

    return Variant("module", yaml_text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10, help="seconds of wrk load per variant (default 10)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every variant (default 3)")
    ap.add_argument("--concurrency", type=int, default=1, help="Envoy --concurrency of the Envoy under test (default 1)")
    add_keep_work_argument(ap)
    args = ap.parse_args(argv)
    check_tools()
    policy = bench_policy()
    variants = [Variant("native", native_yaml), module_variant(), Variant("lua", inline_yaml)]
    with work_folder("mirror-sampler-module-bench-", args.keep_work) as workdir:
        return compare(args, policy, variants, workdir)


def compare(args: argparse.Namespace, policy: Policy, variants: list[Variant], workdir: Path) -> int:
    upstream_ports = {PRIMARY: free_port(), MIRROR: free_port()}
    upstream = start_envoy("upstream", upstream_yaml(upstream_ports, 0), workdir, 1)
    runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    try:
        for rep in range(args.repeats):
            order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
            for v in order:
                stack = start_stack(v, policy, upstream_ports, workdir, args.concurrency)
                try:
                    r = measure(stack, args.duration, ())
                finally:
                    stack.stop()
                runs[v.name].append(r)
                print(
                    f"  [{rep + 1}/{args.repeats}] {v.name:<7} {r['rps']:7.0f} req/s  envoy {r['envoy_cpu_us_per_req_wrk']:6.1f} µs/req"
                    f"  mirrored {r['mirrored_share']:.3f}",
                    flush=True,
                )
    finally:
        upstream.stop()
    print("\n| variant | req/s | vs native | Envoy CPU µs/req | added over native | mirrored share |")
    print("|---|---|---|---|---|---|")
    for v in variants:
        rows = runs[v.name]
        rps = statistics.median(r["rps"] for r in rows)
        ratio = statistics.median(r["rps"] / n["rps"] for r, n in zip(rows, runs["native"], strict=True))
        cpu = statistics.median(r["envoy_cpu_us_per_req_wrk"] for r in rows)
        added = statistics.median(
            r["envoy_cpu_us_per_req_wrk"] - n["envoy_cpu_us_per_req_wrk"] for r, n in zip(rows, runs["native"], strict=True)
        )
        share = statistics.median(r["mirrored_share"] for r in rows)
        print(f"| {v.name} | {rps:.0f} | {ratio:.2f} | {cpu:.1f} | {added:+.1f} | {share:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
