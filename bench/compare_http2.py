"""The http2 transport of this tree against the same transport at earlier
commits and against the free processor, in one run: sampler CPU µs per
request, Envoy CPU µs per request and throughput under ``wrk``, the variants
alternated in rotated order, medians over repeats.

    .venv/bin/python bench/compare_http2.py --baseline 485c574 [--baseline 45ed406] [--duration 10] [--repeats 3]

The stack is bench/run.py's (its Envoy configuration, upstream, free processor
and ``measure``); a baseline is ``git archive``d into a temporary directory
and its sampler runs from there (working directory first on ``sys.path``),
with the same Python environment. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import bench.run as run  # noqa: E402  (the measurement)
import bench.testbed as testbed  # noqa: E402  (the stack)
import bench.variants as bench_variants  # noqa: E402
from extproc.envoy.render import render  # noqa: E402
from extproc.stack.sampler import SamplerProcess  # noqa: E402


def export(commit: str, into: Path) -> Path:
    """The package as it was at ``commit``."""
    tree = into / f"tree-{commit}"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "extproc"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", action="append", default=[], help="a commit to compare with (repeatable)")
    ap.add_argument("--duration", type=float, default=10, help="seconds of wrk per measurement (default 10)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every variant (default 3)")
    ap.add_argument("--no-free-processor", action="store_true", help="skip the free-processor row")
    testbed.add_keep_work_argument(ap)
    args = ap.parse_args(argv)
    testbed.check_tools()
    with testbed.work_folder("mirror-sampler-compare-", args.keep_work) as workdir:
        return compare(args, workdir)


def compare(args: argparse.Namespace, workdir: Path) -> int:
    trees: dict[str, Path] = {"sampler-http2-this-tree": REPO}
    for commit in args.baseline:
        trees[f"sampler-http2-{commit}"] = export(commit, workdir)

    def start_sampler(variant: testbed.Variant, workdir: Path) -> SamplerProcess:
        tree = trees[variant.name]
        env = {
            **testbed.SAMPLER_ENV,
            "MIRROR_LISTEN": f"{testbed.LOOPBACK}:0",
            "MIRROR_TRANSPORT": "http2",
            "MIRROR_SHUTDOWN_GRACE": "1",
            "PYTHONPATH": str(tree),
        }
        return SamplerProcess(env, name=variant.name, log_path=workdir / f"{variant.name}.log", cwd=tree, timeout=60)

    testbed.start_sampler = start_sampler  # the one thing that differs: where the sampler's code comes from
    variants = [testbed.Variant(name, render, "sampler", 1, "http2") for name in trees]
    free_binary = None
    if not args.no_free_processor:
        free_binary, note = testbed.build_free_processor(workdir)
        if free_binary is None:
            print(f"free processor skipped: {note}", file=sys.stderr)
        else:
            variants.append(testbed.Variant("free-processor", bench_variants.free_processor_yaml, "free"))
    policy = testbed.bench_policy()
    upstreams = {testbed.PRIMARY: testbed.free_port(), testbed.MIRROR: testbed.free_port()}
    upstream = testbed.start_envoy("upstream", testbed.upstream_yaml(upstreams, 0), workdir, 1)
    results: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    try:
        for rep in range(args.repeats):
            order = variants[rep % len(variants) :] + variants[: rep % len(variants)]
            for v in order:
                stack = testbed.start_stack(v, policy, upstreams, workdir, 1, free_binary)
                try:
                    r = run.measure(stack, args.duration, ())
                finally:
                    stack.stop()
                results[v.name].append(r)
                cpu = r.get("cpu_us_per_req_wrk", float("nan"))
                print(
                    f"  [{rep + 1}/{args.repeats}] {v.name:<32} {r['rps']:7.0f} req/s  processor {cpu:5.1f} µs/req  "
                    f"envoy {r['envoy_cpu_us_per_req_wrk']:5.0f} µs/req  fail-open {r['fail_open']}",
                    flush=True,
                )
    finally:
        upstream.stop()
    free = results.get("free-processor")
    print(f"\n{os.cpu_count()} cores, wrk -t1 -c{run.WRK_CONNECTIONS}, {args.duration:g} s, {args.repeats} repeat(s), medians\n")
    print("| variant | processor CPU µs/req | Envoy CPU µs/req | req/s | vs free processor |")
    print("|---|---|---|---|---|")
    for name, rs in results.items():
        cpus = [r.get("cpu_us_per_req_wrk", float("nan")) for r in rs]
        envoy = [r["envoy_cpu_us_per_req_wrk"] for r in rs]
        rps = [r["rps"] for r in rs]
        vs_free = run.med([run.ratio(r["rps"], f["rps"]) for r, f in zip(rs, free, strict=True)]) if free else float("nan")
        print(
            f"| {name} | {run.fmt(run.med(cpus), 1)} ({', '.join(f'{c:.1f}' for c in cpus)}) | {statistics.median(envoy):.0f} "
            f"({', '.join(f'{e:.0f}' for e in envoy)}) | {statistics.median(rps):.0f} | {run.pct(vs_free)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
