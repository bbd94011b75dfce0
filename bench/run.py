"""Native Envoy mirroring vs Envoy + mirror-sampler (each ext_proc transport)
vs a processor that costs nothing, in one run, on this machine.

    .venv/bin/python bench/run.py [--duration S] [--repeats N] [--quick]

Variants (bench/variants.py), run alternately, each repeat in a rotated order:

- ``native``: Envoy mirroring with ``runtime_fraction`` at the same percentage:
  the rendered configuration without the sampler's filters and cluster, only
  the routes named by a rule id of the policy, each with mirror policies
  built from the policy's own mirror targets (``native_yaml``);
- ``sampler-http2``, ``sampler-grpcio``: the configuration ``render`` produces,
  with the sampler (``mirror-sampler serve``, ``MIRROR_TRANSPORT``) as
  ext_proc; ``sampler-wN`` the same on the default transport with
  ``MIRROR_WORKERS=N``;
- ``free-processor``: the same configuration, ext_proc answered by
  ``bench/free_processor.c`` (compiled here with ``cc``; skipped without one),
  which sends the sampler's own precomputed answers without decoding anything:
  Envoy's side of ext_proc, the ceiling any sampler can reach. It has no
  health service, so this row's sampler cluster has no health check;
- ``inline``: the same policy decided in Envoy itself (generated Lua);
- ``module``: the same policy decided in Envoy by the dynamic module
  (``--inline module``, built here with ``cc`` for the installed Envoy).

Same Envoy binary, same ``--concurrency``, same upstreams: a second Envoy whose
listeners answer ``direct_response`` (so the upstreams are not the bottleneck).
Load: ``wrk`` (closed loop, throughput, processor CPU per request) and ``hey``
at fixed rates (latency percentiles, computed here from hey's per-request CSV
so p99.9 is exact). Ratios and added latencies are paired within a repeat
(same minute, same machine load), then the median over repeats is reported.

Writes bench/results/latest.{md,json,png}. Memory over time: bench/soak.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.procstat import code_state, cpu_seconds, machine, rss_mib  # noqa: E402
from bench.testbed import (  # noqa: E402
    DEFAULT_TRANSPORT,
    EXT_PROC_STATS,
    HEY_CONNECTIONS,
    MIRROR,
    PERCENT,
    PRIMARY,
    RESULTS,
    TRANSPORTS,
    Stack,
    add_keep_work_argument,
    bench_policy,
    build_free_processor,
    check_tools,
    free_port,
    hey_command,
    primary_requests,
    start_envoy,
    start_stack,
    upstream_yaml,
    work_folder,
)
from bench.variants import variants  # noqa: E402

RATES = (500, 1000, 2000)
TARGET_RATE = 1000  # the rate the latency target is stated at
WRK_CONNECTIONS = 16

# Targets of the transport issue, checked in the report.
CPU_VS_GRPCIO_MAX = 0.3  # http2 sampler CPU per request <= 0.3x grpcio's
RPS_VS_FREE_MIN = 0.85  # http2 throughput >= 0.85x the free processor's
P99_VS_FREE_MAX = 2.0  # http2 added p99 at TARGET_RATE <= 2x the free processor's


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
    """Nearest rank: the smallest value with at least ``p`` percent of the values at or under it."""
    if not sorted_values:
        return float("nan")
    # The small margin keeps 99/100 of 100 at rank 99 where the product comes out a hair over.
    rank = math.ceil(p / 100 * len(sorted_values) - 1e-9)
    return sorted_values[min(len(sorted_values), max(1, rank)) - 1]


def run_hey(url: str, rate: int, seconds: float, connections: int = HEY_CONNECTIONS) -> dict[str, float]:
    command = [*hey_command(rate, seconds, connections), "-o", "csv", url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    lat: list[float] = []
    errors = 0
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


def measure(stack: Stack, seconds: float, rates: tuple[int, ...], hey_connections: int = HEY_CONNECTIONS) -> dict[str, Any]:
    pid = stack.processor_pid
    result: dict[str, Any] = {}
    run_wrk(stack.url, min(2, seconds))  # warm-up: connections, caches
    before = stack.envoy.stats()
    cpu0 = cpu_seconds(pid) if pid else 0.0
    envoy0 = cpu_seconds(stack.envoy.pid)
    result["rps"] = run_wrk(stack.url, seconds)
    cpu1 = cpu_seconds(pid) if pid else 0.0
    envoy1 = cpu_seconds(stack.envoy.pid)
    after = stack.envoy.stats()
    requests = primary_requests(after) - primary_requests(before)
    mirrored = after.get(f"cluster.{MIRROR}.upstream_rq_total", 0) - before.get(f"cluster.{MIRROR}.upstream_rq_total", 0)
    result["requests"] = requests
    result["mirrored_share"] = mirrored / requests if requests else 0.0
    result["fail_open"] = after.get(EXT_PROC_STATS + "failure_mode_allowed", 0) - before.get(EXT_PROC_STATS + "failure_mode_allowed", 0)
    result["envoy_cpu_us_per_req_wrk"] = (envoy1 - envoy0) / requests * 1e6 if requests else float("nan")
    if pid:
        result["cpu_us_per_req_wrk"] = (cpu1 - cpu0) / requests * 1e6 if requests else float("nan")
    for rate in rates:
        cpu0 = cpu_seconds(pid) if pid else 0.0
        before = stack.envoy.stats()
        h = run_hey(stack.url, rate, seconds, hey_connections)
        after = stack.envoy.stats()
        if pid:
            n = primary_requests(after) - primary_requests(before)
            h["cpu_us_per_req"] = (cpu_seconds(pid) - cpu0) / n * 1e6 if n else float("nan")
        result["fail_open"] += after.get(EXT_PROC_STATS + "failure_mode_allowed", 0) - before.get(
            EXT_PROC_STATS + "failure_mode_allowed", 0
        )
        result[f"hey{rate}"] = h
    return result


# --------------------------------------------------------------------------
# Report


def med(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def summarise(runs: dict[str, list[dict[str, Any]]], rates: tuple[int, ...]) -> dict[str, Any]:
    """Medians over repeats; ratios and added latency paired within each repeat
    (repeat i of a variant against repeat i of native / the free processor)."""
    out: dict[str, Any] = {}
    native = runs["native"]
    free = runs.get("free-processor")
    for name, rs in runs.items():
        s: dict[str, Any] = {
            "rps": med([r["rps"] for r in rs]),
            "mirrored_share": med([r["mirrored_share"] for r in rs]),
            "fail_open": sum(r["fail_open"] for r in rs),
            "envoy_cpu_us_per_req_wrk": med([r["envoy_cpu_us_per_req_wrk"] for r in rs]),
            "rps_vs_native": med([ratio(r["rps"], n["rps"]) for r, n in zip(rs, native, strict=True)]),
        }
        if free is not None:
            s["rps_vs_free"] = med([ratio(r["rps"], f["rps"]) for r, f in zip(rs, free, strict=True)])
        if "cpu_us_per_req_wrk" in rs[0]:
            s["cpu_us_per_req_wrk"] = med([r["cpu_us_per_req_wrk"] for r in rs])
            s["cpu_us_per_req_wrk_all"] = [round(r["cpu_us_per_req_wrk"], 1) for r in rs]
        for rate in rates:
            key = f"hey{rate}"
            s[key] = {m: med([r[key][m] for r in rs]) for m in rs[0][key]}
            s[f"added{rate}"] = {m: med([r[key][m] - n[key][m] for r, n in zip(rs, native, strict=True)]) for m in ("p50", "p99", "p999")}
        out[name] = s
    # Same-run CPU ratio of the two transports, paired per repeat.
    if "sampler-http2" in runs and "sampler-grpcio" in runs:
        pairs = zip(runs["sampler-http2"], runs["sampler-grpcio"], strict=True)
        out["sampler-http2"]["cpu_vs_grpcio"] = med([ratio(a["cpu_us_per_req_wrk"], b["cpu_us_per_req_wrk"]) for a, b in pairs])
    return out


def fmt(v: float, nd: int = 2) -> str:
    return "n/a" if v != v else f"{v:.{nd}f}"


def pct(v: float | None) -> str:
    return "–" if v is None or v != v else f"{v:.0%}"


def table(summary: dict[str, Any], rates: tuple[int, ...], rss: dict[str, tuple[float, float]]) -> str:
    native = summary["native"]
    lines = [
        "| variant | wrk req/s | vs native | vs free processor | mirrored | fail-open | processor CPU µs/req (wrk) "
        "| Envoy CPU µs/req (wrk) | RSS MiB start → end | " + " | ".join(f"+p50/+p99/+p99.9 ms @{r}" for r in rates) + " |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(rates),
    ]
    for name, s in summary.items():
        cells = [
            name,
            f"{s['rps']:.0f}",
            pct(s["rps_vs_native"]),
            pct(s.get("rps_vs_free")),
            f"{s['mirrored_share']:.1%}",
            str(s["fail_open"]),
        ]
        cpu = s.get("cpu_us_per_req_wrk")
        cells.append("–" if cpu is None else f"{fmt(cpu, 0)} ({', '.join(f'{v:.0f}' for v in s['cpu_us_per_req_wrk_all'])})")
        cells.append(fmt(s["envoy_cpu_us_per_req_wrk"], 0))
        cells.append(f"{rss[name][0]:.1f} → {rss[name][1]:.1f}" if name in rss else "–")
        for rate in rates:
            if name == "native":
                h = native[f"hey{rate}"]
                cells.append(f"{fmt(h['p50'])}/{fmt(h['p99'])}/{fmt(h['p999'])} (abs)")
            else:
                a = s[f"added{rate}"]
                cells.append("/".join(fmt(a[m]) for m in ("p50", "p99", "p999")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(summary: dict[str, Any], free_note: str) -> tuple[str, dict[str, Any]]:
    """The transport issue's targets for sampler-http2: a markdown table and the figures."""
    h2, grpcio, free = summary.get("sampler-http2"), summary.get("sampler-grpcio"), summary.get("free-processor")
    rows: list[tuple[str, str, str]] = []
    data: dict[str, Any] = {}
    if h2 is not None and grpcio is not None:
        r = h2["cpu_vs_grpcio"]
        data["cpu_vs_grpcio"] = r
        rows.append(
            (
                f"http2 sampler CPU ≤ {CPU_VS_GRPCIO_MAX}× grpcio's",
                f"{h2['cpu_us_per_req_wrk']:.0f} vs {grpcio['cpu_us_per_req_wrk']:.0f} µs/req: **{r:.2f}×** (per-repeat pairs)",
                verdict(
                    r <= CPU_VS_GRPCIO_MAX,
                    f"{CPU_VS_GRPCIO_MAX / r:.1f}× under the bound" if r <= CPU_VS_GRPCIO_MAX else f"{r / CPU_VS_GRPCIO_MAX:.2f}× over",
                ),
            )
        )
    if h2 is not None and free is not None:
        r = h2["rps_vs_free"]
        data["rps_vs_free"] = r
        rows.append(
            (
                f"throughput ≥ {RPS_VS_FREE_MIN}× the free processor's",
                f"{h2['rps']:.0f} vs {free['rps']:.0f} req/s: **{r:.2f}×** (per-repeat pairs)",
                verdict(
                    r >= RPS_VS_FREE_MIN,
                    f"by {r - RPS_VS_FREE_MIN:+.2f}" if r >= RPS_VS_FREE_MIN else f"short by {RPS_VS_FREE_MIN - r:.2f}",
                ),
            )
        )
        a, f = h2[f"added{TARGET_RATE}"]["p99"], free[f"added{TARGET_RATE}"]["p99"]
        data["added_p99"] = {"sampler-http2": a, "free-processor": f}
        bound = P99_VS_FREE_MAX * f
        rows.append(
            (
                f"added p99 at {TARGET_RATE} req/s ≤ {P99_VS_FREE_MAX:g}× the free processor's",
                f"+{a:.2f} ms vs +{f:.2f} ms (bound {bound:.2f} ms)",
                verdict(a <= bound, f"{bound - a:.2f} ms to spare" if a <= bound else f"{a - bound:.2f} ms over"),
            )
        )
    elif free_note:
        rows.append(("throughput and p99 against the free processor", f"not measured: {free_note}", "–"))
    lines = ["| target (sampler-http2) | measured (medians) | verdict |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines), data


def verdict(ok: bool, by: str) -> str:
    return f"**met** ({by})" if ok else f"**missed** ({by})"


COLOURS = {
    "native": "#888888",
    "sampler-http2": "#1f77b4",
    "sampler-grpcio": "#ff7f0e",
    "free-processor": "#2ca02c",
    "inline": "#9467bd",
    "module": "#8c564b",
}


def chart(summary: dict[str, Any], rates: tuple[int, ...], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    colours = [COLOURS.get(n, "#17becf") for n in names]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [1.2, 0.9, 1.5]})
    native = summary["native"]["rps"]
    bars = ax1.bar(names, [summary[n]["rps"] for n in names], color=colours)
    for b, n in zip(bars, names, strict=True):
        label = f"{summary[n]['rps']:.0f}\n{pct(summary[n]['rps_vs_native'])}"
        ax1.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    if "free-processor" in summary:
        level = summary["free-processor"]["rps"] * RPS_VS_FREE_MIN
        ax1.axhline(level, ls="--", color="#2ca02c", lw=1)
        ax1.text(-0.4, level, f"target: {RPS_VS_FREE_MIN}× free processor", color="#2ca02c", fontsize=8, ha="left", va="bottom")
    ax1.set_title(f"Throughput (wrk -c{WRK_CONNECTIONS}); % of native, same run", fontsize=9)
    ax1.set_ylabel("requests/s")
    ax1.set_ylim(0, native * 1.25)
    ax1.tick_params(axis="x", labelrotation=30, labelsize=8)

    with_cpu = [n for n in names if "cpu_us_per_req_wrk" in summary[n]]
    cbars = ax2.bar(with_cpu, [summary[n]["cpu_us_per_req_wrk"] for n in with_cpu], color=[COLOURS.get(n, "#17becf") for n in with_cpu])
    for b, n in zip(cbars, with_cpu, strict=True):
        ax2.annotate(
            f"{summary[n]['cpu_us_per_req_wrk']:.0f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8
        )
    ax2.set_title("Processor CPU per request (µs, utime+stime)", fontsize=9)
    ax2.tick_params(axis="x", labelrotation=30, labelsize=8)

    others = [n for n in names if n != "native"]
    width = 0.8 / max(1, len(others))
    for i, n in enumerate(others):
        xs = [k + i * width - 0.4 + width / 2 for k in range(len(rates))]
        p99 = [summary[n][f"added{r}"]["p99"] for r in rates]
        p50 = [summary[n][f"added{r}"]["p50"] for r in rates]
        colour = COLOURS.get(n, "#17becf")
        ax3.bar(xs, p99, width, label=f"{n} +p99", color=colour, alpha=0.45)
        ax3.bar(xs, p50, width * 0.5, label=f"{n} +p50", color=colour)
    tops = [summary[n][f"added{r}"][m] for n in others for r in rates for m in ("p50", "p99")]
    tops = [t for t in tops if t == t]
    ax3.set_ylim(min([0.0, *tops]) * 1.2, max([1.0, *tops]) * 1.6)  # room for the legend
    ax3.axhline(0, color="#444444", lw=0.8)
    ax3.set_xticks(range(len(rates)), [f"{r} req/s" for r in rates])
    ax3.set_ylabel("ms added over native (paired per repeat)")
    ax3.set_title("Added latency (hey, fixed rate): +p99 wide, +p50 narrow", fontsize=9)
    ax3.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10, help="seconds per load phase (default 10)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every variant; medians are reported (default 3)")
    ap.add_argument("--transports", default=",".join(TRANSPORTS), help="sampler transports, comma-separated (default http2,grpcio)")
    ap.add_argument(
        "--workers", default="1,2", help=f"sampler worker counts, comma-separated; N > 1 runs on {DEFAULT_TRANSPORT} (default 1,2)"
    )
    ap.add_argument("--no-free-processor", action="store_true", help="skip the free-processor row")
    ap.add_argument("--concurrency", type=int, default=1, help="Envoy --concurrency for the Envoy under test (default 1)")
    ap.add_argument("--upstream-concurrency", type=int, default=1, help="Envoy --concurrency of the direct_response upstream (default 1)")
    ap.add_argument("--rates", default=",".join(map(str, RATES)), help="hey rates, req/s (default 500,1000,2000)")
    ap.add_argument(
        "--hey-connections",
        type=int,
        default=HEY_CONNECTIONS,
        help=f"hey's connections for the latency columns (default {HEY_CONNECTIONS}; -q is per connection, so their requests "
        "leave together and queue behind each other in Envoy: 1 spaces them evenly, as bench/compare_cost.py can)",
    )
    ap.add_argument("--quick", action="store_true", help="a smoke run: 3 s phases, 1 repeat")
    ap.add_argument("--output", type=Path, default=RESULTS, help="where latest.{md,json,png} go")
    add_keep_work_argument(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.repeats = 3, 1
    rates = tuple(int(r) for r in args.rates.split(","))
    if TARGET_RATE not in rates:
        rates = tuple(sorted({*rates, TARGET_RATE}))
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    unknown = [t for t in transports if t not in TRANSPORTS]
    if unknown:
        sys.exit(f"bench: unknown transport(s) {', '.join(unknown)}; known: {', '.join(TRANSPORTS)}")
    check_tools()
    with work_folder("mirror-sampler-bench-", args.keep_work) as workdir:
        return run_bench(args, argv, rates, transports, workdir)


def run_bench(args: argparse.Namespace, argv: list[str] | None, rates: tuple[int, ...], transports: list[str], workdir: Path) -> int:
    code = code_state()
    policy = bench_policy()
    free_binary, free_note = (None, "skipped (--no-free-processor)") if args.no_free_processor else build_free_processor(workdir)
    if free_binary is None:
        print(f"bench: free-processor row skipped: {free_note}", file=sys.stderr, flush=True)
    vs = variants(transports, [int(w) for w in args.workers.split(",") if w.strip()], free_binary is not None)
    print(
        f"bench: {os.cpu_count()} cores, Envoy --concurrency {args.concurrency}, {args.duration:g} s phases, {args.repeats} repeat(s), "
        f"variants {', '.join(v.name for v in vs)}; logs in {workdir} (kept if the run fails, or with --keep-work)",
        flush=True,
    )

    upstream_ports = {PRIMARY: free_port(), MIRROR: free_port()}
    upstream = start_envoy("upstream", upstream_yaml(upstream_ports, 0), workdir, args.upstream_concurrency)
    runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in vs}
    orders: list[list[str]] = []
    started = time.time()
    try:
        for rep in range(args.repeats):
            order = vs[rep % len(vs) :] + vs[: rep % len(vs)]
            orders.append([v.name for v in order])
            for v in order:
                stack = start_stack(v, policy, upstream_ports, workdir, args.concurrency, free_binary)
                try:
                    pid = stack.processor_pid
                    rss_start = rss_mib(pid) if pid else 0.0
                    r = measure(stack, args.duration, rates, args.hey_connections)
                    if pid:
                        r["rss_start"], r["rss_end"] = rss_start, rss_mib(pid)
                    runs[v.name].append(r)
                    line = f"  [{rep + 1}/{args.repeats}] {v.name:<15} wrk {r['rps']:7.0f} req/s"
                    line += "".join(f"  @{rate}: p50 {r[f'hey{rate}']['p50']:.2f} p99 {r[f'hey{rate}']['p99']:.2f}" for rate in rates)
                    if pid:
                        line += f"  cpu {r['cpu_us_per_req_wrk']:.0f} µs/req"
                    line += f"  envoy {r['envoy_cpu_us_per_req_wrk']:.0f} µs/req"
                    line += f"  mirrored {r['mirrored_share']:.0%}  fail-open {r['fail_open']}"
                    print(line, flush=True)
                finally:
                    stack.stop()
    finally:
        upstream.stop()

    summary = summarise(runs, rates)
    rss: dict[str, tuple[float, float]] = {}
    for name, rs in runs.items():
        if "rss_start" in rs[0]:
            rss[name] = (med([r["rss_start"] for r in rs]), med([r["rss_end"] for r in rs]))
    info = machine()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    tbl = table(summary, rates, rss)
    target_tbl, target_data = targets(summary, free_note)
    head = (
        f"Machine: {info['nproc']} cores, {info['cpu']}, Linux {info['kernel']}, Python {info['python']}. "
        f"Envoy --concurrency {args.concurrency} (upstream {args.upstream_concurrency}); wrk -t1 -c{WRK_CONNECTIONS} and "
        f"hey -c{args.hey_connections} at fixed rates, {args.duration:g} s phases, medians of {args.repeats} repeat(s), each repeat in a "
        f"rotated order; {PERCENT}% mirrored. Load generators, both Envoys and the processor share the same cores. Code: {code}."
    )
    print()
    print(head)
    print(tbl)
    print()
    print(target_tbl)
    args.output.mkdir(parents=True, exist_ok=True)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    free_line = (
        "`free-processor`: Envoy with ext_proc to `bench/free_processor.c` (C, epoll, one thread), which decodes nothing and answers "
        'each stream with precomputed frames: the sampler\'s own serialised answers, alternating by stream id between "mirror to slot 0" '
        'and "no mirror". Alternating rather than always mirroring keeps Envoy\'s mirroring work at the same 50% as every other row, '
        "so the row isolates what ext_proc itself costs Envoy. Its configuration is render()'s with the sampler cluster's health check "
        "dropped (it has no health service)."
        if free_binary is not None
        else f"`free-processor`: row skipped: {free_note}."
    )
    md = [
        "# Benchmark: native Envoy mirroring vs Envoy + mirror-sampler",
        "",
        f"Date: {date}. Command: `{('.venv/bin/python bench/run.py ' + command).strip()}` ({time.time() - started:.0f} s).",
        "",
        head,
        "",
        tbl,
        "",
        "`vs native`, `vs free processor`: wrk throughput as a share of that row's, paired within each repeat, median over repeats. "
        "`+p50/+p99/+p99.9`: latency added over native at that rate, paired within each repeat, median over repeats (the native row "
        "shows its absolute values). `mirrored`: share of requests Envoy mirrored "
        f"(target {PERCENT}%). `fail-open`: requests ext_proc let through unanswered (timeouts, errors): should be 0. Processor CPU: "
        "utime+stime of the sampler (all its processes) or of the free processor, per request Envoy sent to the primary, during the "
        "wrk phase; median (each repeat). Envoy CPU: the same for the Envoy under test (its own ext_proc work included). "
        "RSS: sampler resident memory at start and after its phases (with workers: supervisor and "
        "workers together); memory over time: `bench/soak.py`, results/soak.md. hey reports latency in 0.1 ms steps. "
        "Where the time goes: bench/PROFILE.md.",
        "",
        free_line,
        "",
        "`native`: render()'s configuration without the sampler's filters and cluster, keeping only the routes named by a rule id, each "
        "mirroring the rule's targets with `runtime_fraction`. `inline`: the decision in Envoy (generated Lua), no processor. "
        "`module`: the decision in Envoy by the dynamic module, no processor.",
        "",
        "## Targets",
        "",
        target_tbl,
        "",
        "Repeat orders: " + "; ".join(" → ".join(o) for o in orders) + ".",
        "",
        "![throughput, processor CPU and added latency](latest.png)",
        "",
    ]
    (args.output / "latest.md").write_text("\n".join(md))
    (args.output / "latest.json").write_text(
        json.dumps(
            {
                "date": date,
                "machine": info,
                "code": code,
                "args": {k: str(v) for k, v in vars(args).items()},
                "orders": orders,
                "runs": runs,
                "summary": summary,
                "targets": target_data,
                "free_processor": free_note or "answers alternate by stream id: mirror slot 0 / no mirror",
            },
            indent=1,
        )
    )
    written = "latest.json"
    try:
        chart(
            summary,
            rates,
            args.output / "latest.png",
            f"mirror-sampler bench, {date}, {info['nproc']} cores ({info['cpu']}), Envoy --concurrency {args.concurrency}",
        )
        written += ", latest.png"
    except ImportError:
        print("bench: matplotlib missing, no chart: `make bench` installs it (pip install -e '.[bench]')", file=sys.stderr)
    print(f"\nwrote {args.output / 'latest.md'}, {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
