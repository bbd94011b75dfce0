"""The primary's latency with the comparison on and off, interleaved: issue
17's target (p99 within 1 ms of comparison off), measured so that the other
tenants of a shared machine fall on every side alike (docs/compare.md "Cost").

    .venv/bin/python bench/compare_latency.py [--minutes 10] [--window 3] [--settle 0.5] [--rate 100]
        [--observers 2] [--also on-sink|on-no-idle|on-own-sessions|off-own-sessions|on-no-hop|on-upstream-capture-sink|... ...]
        [--bootstrap 2000] [--output DIR] [--keep-work] [--raw FILE]
    .venv/bin/python bench/compare_latency.py --versus RAW SIDE

bench/compare_cost.py runs each variant in a stack of its own for 20 s phases,
one after the other, and takes the median over repeats of each repeat's p99
difference. On this project's shared machines the other tenants come and go
by the second: between two such phases `off`'s own p99 has moved by more
than the 1 ms the target allows, and five runs of seven to eleven repeats
gave medians from -0.5 to +2.4 ms. This bench gives up throughput figures
for a latency figure that the noise reaches on every side:

- Every side's stack runs for the whole run (bench/testbed.py's: each its own
  sampler and Envoy ``--concurrency 1``, one rule mirroring ``--percent`` of
  requests; one upstream Envoy answering 200 for all): ``off``, the
  configuration ``envoy-config`` renders without spec.compare; ``on``, with
  the capture points, every mirror compared, logged to ``--observers``
  observers on a SQLite file of its own; and the ``--also`` sides: ``on-sink``
  (``on`` logging to a sink that counts bytes: Envoy's whole share without
  the observers, bench/access_log.py), ``on-no-idle`` (``on`` with every
  thread of its observers put back under Linux's normal policy by this
  bench: nice 10 alone, in the stack's scheduling group),
  ``on-own-sessions`` and ``off-own-sessions`` (``on``, ``off``, with the
  side's Envoy, sampler and observers each in a session of its own, as `up`
  started them before 2026-12-04, instead of in this bench's session with
  hey, as `up` starts them now: under autogroups a session is a scheduling
  group, and only inside one does a SCHED_IDLE thread give way at once;
  compare the two with ``--versus``),
  ``on-no-*`` (``on`` less one part, bench/compare_parts.py) and
  ``on-<part or alternative>-sink`` (that configuration logging to the sink,
  as ``on-sink`` does; the alternatives, bench/compare_parts.py
  ``ALTERNATIVES``, only so: the observers do not read what they log, e.g.
  ``on-upstream-capture-sink``, the shadow captured by an upstream filter of
  a cluster of its own instead of the internal listener's pass); each other
  ``on`` side with observers of its own.
- hey drives one stack at a time, at ``--rate`` req/s on one connection (a
  request every 10 ms by default), for ``--window`` seconds; then the next.
  A round gives each side one window, in an order drawn at random (seeded by
  ``--seed``) each round, so that no side follows the same one most of the
  time (the runs of 2026-12-03 rotated the order instead, which for three
  sides or more keeps each side's predecessor in most rounds).
- The first ``--settle`` seconds of every window are left out, on every
  side: they hold the new connection's first request and whatever the
  previous side's stack still does after its window (Envoy's last batch of
  entries, the observers judging it).
- Figures: each side's p50, p99 and p99.9 over all its requests (nearest
  rank); each side minus ``off`` two ways, over all requests (the p99 read
  literally: the noisiest rounds set it) and as the median over rounds of
  the difference within a round (the machine in its typical state), each
  with a 95% interval by bootstrap over rounds (a round is resampled whole,
  so that a noisy stretch of seconds stays on every side; a round with a
  side's window empty is left out); and the verdict on the target: met when
  the interval lies at or under 1 ms, missed when it lies over, otherwise
  not told apart. With about 250 requests in a window, a window's p99 is its
  third-longest request and its p99.9 its longest.
- What made the noisy windows: around each window the bench reads the
  machine's steal time and CPU pressure (bench/procstat.py ``machine_cpu``),
  the CPU of what it started itself and of every side's observers; each
  side's noisiest windows (the 5% with the longest p99) are set against the
  rest with those witnesses, and with the share of the side's tail over all
  requests they hold (``noisiest_windows``).

Also counted: requests that did not answer 200; requests hey did not send
of the rate asked for (its ticker skips sends while a request is slow, so a
slow side is sampled less and its tail understated; it also leaves out
requests that found no connection); and ``on``'s judged pairs against the
requests it served (the comparison was running, not failing).
Writes ``--output``/compare_latency.{md,json} (bench/results/ by default;
each window's percentiles) and, with ``--raw FILE``, every latency;
``--versus RAW SIDE`` measures nothing and prints, from such a file, every
other side minus SIDE (two sides measured together compared directly: the
observers' share is ``on`` minus ``on-sink``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from bench.access_log import start_sink  # noqa: E402
from bench.compare_cost import COMPARE_YAML, Observers  # noqa: E402
from bench.compare_parts import ALTERNATIVES, EDITS, PARTS  # noqa: E402
from bench.procstat import code_state, for_each_thread, machine, machine_cpu, own_cpu_seconds  # noqa: E402
from bench.run import percentile  # noqa: E402
from bench.testbed import (  # noqa: E402
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
from extproc.compare.cli import parse_config_text  # noqa: E402
from extproc.compare.config import CompareConfig  # noqa: E402
from extproc.compare.envoy import render_with_capture  # noqa: E402
from extproc.core.policy import Policy  # noqa: E402
from extproc.envoy.render import Address, Topology, render  # noqa: E402
from extproc.stack.observer import ObserverProcess  # noqa: E402

# A side whose processes each run in a session of their own, not in this bench's
# session (one scheduling group under autogroups), as `up` starts its children.
OWN_SESSIONS = "-own-sessions"

# Beside off and on: on logging to a sink that counts bytes (Envoy's whole share,
# no observers), on with its observers' threads back under the normal policy,
# off and on with their processes in sessions of their own, on less one part (or that
# logging to the sink), and on with one part done another way, logging to the
# sink (bench/compare_parts.py: the observers do not read what it logs).
EXTRA_SIDES = (
    "on-sink",
    "on-no-idle",
    *(f"{side}{OWN_SESSIONS}" for side in ("off", "on")),
    *(f"on-{part}{sink}" for part in PARTS for sink in ("", "-sink")),
    *(f"on-{name}-sink" for name in ALTERNATIVES),
)
PERCENTILES = (50.0, 99.0, 99.9)
TARGET_MS = 1.0


@dataclass
class Window:
    side: str
    round: int
    latencies_ms: list[float]  # the requests after the settling time, in order
    left_out: int  # requests of the settling time
    errors: int  # answers other than 200 (kept out of the latencies)
    not_sent: int = 0  # of the requests the rate asks for after the settling time
    # What else ran during the whole window, in ms (None in runs before 2026-12-04's tenth session):
    steal_ms: float | None = None  # the hypervisor's: CPU given to other machines
    waited_ms: float | None = None  # runnable tasks waiting for a CPU (pressure stall, "some")
    others_ms: float | None = None  # CPU of processes this bench did not start
    observers_ms: float | None = None  # CPU of every side's observers


def run_window(url: str, rate: int, seconds: float, settle: float) -> tuple[list[float], int, int, int]:
    """hey at ``rate`` req/s on one connection for ``seconds`` (``read_window``), and
    how many requests it did not send of the ``rate`` a second it was asked for
    after ``settle``: hey leaves out requests it could not connect for, and skips
    sends while a request is slow (its ticker drops ticks), so a slow side is
    sampled less; a hey that fails is a window with nothing in it."""
    command = ["hey", "-z", f"{round(seconds * 1000)}ms", "-c", "1", "-q", str(rate), "-o", "csv", url]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    latencies, left_out, errors = read_window(done.stdout if done.returncode == 0 else "", settle)
    return latencies, left_out, errors, max(0, round(rate * (seconds - settle)) - len(latencies) - errors)


def measured_window(side: str, round_: int, url: str, args: argparse.Namespace, observers: Sequence[Observers]) -> Window:
    """One side's window (``run_window``) and what else ran on the machine meanwhile:
    the witnesses of what made a noisy window (``noisiest_windows``)."""
    machine0, own0, observed0 = machine_cpu(), own_cpu_seconds(), sum(o.cpu() for o in observers)
    window = Window(side, round_, *run_window(url, args.rate, args.window, args.settle))
    spent, own = machine_cpu() - machine0, own_cpu_seconds() - own0
    window.steal_ms = round(spent.steal * 1000, 1)
    window.waited_ms = None if spent.waited is None else round(spent.waited * 1000, 1)
    # Both sides counted in clock ticks per process: a few ticks either way.
    window.others_ms = round(max(0.0, spent.busy - own) * 1000, 1)
    window.observers_ms = round((sum(o.cpu() for o in observers) - observed0) * 1000, 1)
    return window


def read_window(csv: str, settle: float) -> tuple[list[float], int, int]:
    """hey's CSV: the latencies (ms) of the requests sent ``settle`` seconds or
    more after the start and answered 200, in order; how many were sent before;
    how many after did not answer 200."""
    latencies, left_out, errors = [], 0, 0
    for line in csv.splitlines()[1:]:
        # response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset
        parts = line.split(",")
        if len(parts) < 8:
            continue
        if float(parts[7]) < settle:
            left_out += 1
        elif parts[6] != "200":
            errors += 1
        else:
            latencies.append(round(float(parts[0]) * 1000, 3))  # hey writes seconds to 4 places
    return latencies, left_out, errors


def percentiles(values: list[float]) -> list[float]:
    ordered = sorted(values)
    return [percentile(ordered, p) for p in PERCENTILES]


def pooled(windows: list[Window], side: str, rounds: Sequence[int] | None = None) -> list[float]:
    """The latencies of ``side``'s windows in ``rounds`` (each as often as it is named; None: every round)."""
    by_round = {w.round: w.latencies_ms for w in windows if w.side == side}
    out: list[float] = []
    for round_ in sorted(by_round) if rounds is None else rounds:
        out.extend(by_round[round_])
    return out


def pooled_added(windows: list[Window], side: str, rounds: Sequence[int] | None = None, reference: str = "off") -> list[float]:
    """``side``'s percentiles over all its requests minus ``reference``'s."""
    measured, base = percentiles(pooled(windows, side, rounds)), percentiles(pooled(windows, reference, rounds))
    return [a - b for a, b in zip(measured, base, strict=True)]


def per_round_added(windows: list[Window], side: str, reference: str = "off") -> list[list[float]]:
    """For each round, ``side``'s percentiles in its window minus ``reference``'s in the same round."""
    by_round: dict[int, dict[str, list[float]]] = {}
    for w in windows:
        by_round.setdefault(w.round, {})[w.side] = percentiles(w.latencies_ms)
    return [[a - b for a, b in zip(r[side], r[reference], strict=True)] for _, r in sorted(by_round.items())]


def interval(samples: list[list[float]], i: int) -> tuple[float, float]:
    spread = sorted(s[i] for s in samples)
    return percentile(spread, 2.5), percentile(spread, 97.5)


def differences(windows: list[Window], side: str, bootstrap: int, seed: int, reference: str = "off") -> dict[str, dict[str, float]]:
    """``side`` minus ``reference`` at each percentile, two ways, each with a 95% interval
    by bootstrap over rounds (a round is resampled whole):

    - ``ms``: over all requests of the run (pooled), the issue's p99 read literally;
      the noisiest rounds, where both sides' tails are longest, set it;
    - ``round_ms``: the median over rounds of the difference in each round: the
      difference in the machine's typical state."""
    rounds = sorted({w.round for w in windows})
    rng = random.Random(seed)
    draws = [rng.choices(range(len(rounds)), k=len(rounds)) for _ in range(bootstrap)]
    pooled_samples = [pooled_added(windows, side, [rounds[i] for i in draw], reference) for draw in draws]
    each = per_round_added(windows, side, reference)
    round_samples = [[statistics.median(each[i][k] for i in draw) for k in range(len(PERCENTILES))] for draw in draws]
    out = {}
    for k, (p, d) in enumerate(zip(PERCENTILES, pooled_added(windows, side, reference=reference), strict=True)):
        low, high = interval(pooled_samples, k)
        round_low, round_high = interval(round_samples, k)
        out[f"p{p:g}"] = {
            "ms": d,
            "low_ms": low,
            "high_ms": high,
            "round_ms": statistics.median(r[k] for r in each),
            "round_low_ms": round_low,
            "round_high_ms": round_high,
        }
    return out


def difference_table(diffs: dict[str, dict[str, dict[str, float]]], reference: str) -> list[str]:
    """Markdown rows: each side's ``differences`` from ``reference``."""
    return [
        f"| minus {reference} | all requests: ms | 95% interval | median of the rounds: ms | 95% interval |",
        "|---|---|---|---|---|",
        *(
            f"| {side} {name} | {d['ms']:+.2f} | {d['low_ms']:+.2f} to {d['high_ms']:+.2f} | "
            f"{d['round_ms']:+.2f} | {d['round_low_ms']:+.2f} to {d['round_high_ms']:+.2f} |"
            for side, by_percentile in diffs.items()
            for name, d in by_percentile.items()
        ),
    ]


def versus(raw: Path, reference: str, bootstrap: int, seed: int) -> list[str]:
    """Every other side of a run's saved latencies (``--raw``) minus ``reference``'s,
    as the run itself reports them against ``off``."""
    windows = [Window(**w) for w in json.loads(raw.read_text())]
    sides = list(dict.fromkeys(w.side for w in windows))
    if reference not in sides:
        sys.exit(f"bench: {raw} has no side {reference!r} (it has {', '.join(sides)})")
    diffs = {side: differences(windows, side, bootstrap, seed, reference) for side in sides if side != reference}
    rounds = len({w.round for w in windows})
    noisy = noisiest_table(noisiest_windows(windows, sides))
    return [
        f"`{raw}`, {rounds} rounds; intervals: {bootstrap} bootstrap resamples (seed {seed}).",
        "",
        *difference_table(diffs, reference),
        *(["", NOISIEST_CAPTION, "", *noisy] if noisy else []),
    ]


WITNESSES = ("steal_ms", "waited_ms", "others_ms", "observers_ms")
NOISIEST_SHARE = 0.05
NOISIEST_CAPTION = (
    f"Each side's noisiest windows (the {NOISIEST_SHARE:.0%} with the longest p99) against the rest, with what else ran in "
    "them (means per window: steal, the hypervisor's time given to other machines; waited, runnable tasks waiting for a "
    "CPU; others' CPU, processes this bench did not start; observers' CPU, every side's), and the share of the side's "
    "requests over its p99 over all requests that they hold:"
)


def noisiest_windows(windows: list[Window], sides: Sequence[str], share: float = NOISIEST_SHARE) -> dict[str, dict[str, dict[str, float]]]:
    """What each side's noisiest windows (the ``share`` with the longest p99) had
    that the rest did not: the mean of every witness (``measured_window``), the
    median window's p99, and how much of the side's tail over all requests (its
    requests over its pooled p99) they hold. Witnesses a run did not record are
    left out."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for side in sides:
        # (window p99, window), longest first
        own = sorted(((percentiles(w.latencies_ms)[1], w) for w in windows if w.side == side), key=lambda pw: pw[0], reverse=True)
        noisy_count = max(1, round(len(own) * share))
        threshold = percentiles(pooled(windows, side))[1]
        tail = sum(1 for _, w in own for latency in w.latencies_ms if latency > threshold)
        out[side] = {}
        for name, ranked in {"noisiest": own[:noisy_count], "rest": own[noisy_count:]}.items():
            if not ranked:
                continue
            group = [w for _, w in ranked]
            figures = {
                "windows": float(len(group)),
                "p99_ms": statistics.median(p99 for p99, _ in ranked),
                "tail_share": sum(1 for w in group for latency in w.latencies_ms if latency > threshold) / max(tail, 1),
            }
            for witness in WITNESSES:
                values = [getattr(w, witness) for w in group]
                if all(v is not None for v in values):
                    figures[witness] = statistics.fmean(values)
            out[side][name] = figures
    return out


def noisiest_table(noisy: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Markdown rows of ``noisiest_windows``; none where the run recorded no witness."""
    if not any("steal_ms" in group for by_group in noisy.values() for group in by_group.values()):
        return []

    def cell(group: dict[str, float], key: str) -> str:
        return f"{group[key]:.0f}" if key in group else "-"

    return [
        "| side, windows | windows | median window p99 ms | share of the tail over all requests "
        "| steal ms | waited ms | others' CPU ms | observers' CPU ms |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {side}, {name} | {group['windows']:.0f} | {group['p99_ms']:.2f} | {group['tail_share']:.0%} | "
            + " | ".join(cell(group, witness) for witness in WITNESSES)
            + " |"
            for side, by_group in noisy.items()
            for name, group in by_group.items()
        ),
    ]


def verdict(low: float, high: float) -> str:
    """Within the target includes it; rounded first, so that 1.0 made of hey's
    0.1 ms steps (2.8 - 1.8 is 0.9999999999999998) is 1.0."""
    low, high = round(low, 6), round(high, 6)
    if high <= TARGET_MS:
        return "met"
    if low > TARGET_MS:
        return "missed"
    return "not told apart"


def complete_rounds(windows: list[Window], sides: Sequence[str]) -> list[Window]:
    """The windows of the rounds in which every side has latencies: a round with an
    empty window (hey failed, or nothing answered 200) tells nothing apart."""
    filled = {(w.round, w.side) for w in windows if w.latencies_ms}
    kept = {w.round for w in windows if all((w.round, side) in filled for side in sides)}
    return [w for w in windows if w.round in kept]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10, help="length of the measured run (default 10)")
    ap.add_argument("--window", type=float, default=3, help="seconds hey drives one side before the next (default 3)")
    ap.add_argument("--settle", type=float, default=0.5, help="seconds left out at the start of every window (default 0.5)")
    ap.add_argument("--rate", type=int, default=100, help="requests per second on the one connection (default 100)")
    ap.add_argument("--percent", type=int, default=100, help="share of requests mirrored (default 100: every request is compared)")
    ap.add_argument("--observers", type=int, default=2, help="observer processes of each side that has them (default 2)")
    ap.add_argument("--also", action="append", default=[], choices=sorted(EXTRA_SIDES), help="another side (repeatable)")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the intervals (default 2000)")
    ap.add_argument("--seed", type=int, default=17, help="the bootstrap's random seed (default 17)")
    ap.add_argument("--output", type=Path, default=RESULTS, help="where compare_latency.{md,json} go")
    ap.add_argument("--raw", type=Path, help="also write every window's latencies here (JSON; the results keep percentiles)")
    ap.add_argument(
        "--versus",
        nargs=2,
        metavar=("RAW", "SIDE"),
        help="measure nothing: print every side of a run's --raw latencies minus SIDE's (the same arithmetic, another reference)",
    )
    add_keep_work_argument(ap)
    args = ap.parse_args(argv)
    if args.versus is not None:
        raw, reference = args.versus
        print("\n".join(versus(Path(raw), reference, args.bootstrap, args.seed)))
        return 0
    if not 0 <= args.settle < args.window:
        ap.error("--settle must be at least 0 and less than --window")
    check_tools()
    with work_folder("mirror-sampler-compare-latency-", args.keep_work) as workdir:
        return run(args, argv, workdir)


def run(args: argparse.Namespace, argv: list[str] | None, workdir: Path) -> int:
    command = "python bench/compare_latency.py " + " ".join(sys.argv[1:] if argv is None else argv)
    load_start = os.getloadavg()[0]
    sides = ["off", "on", *dict.fromkeys(args.also)]
    policy = bench_policy(args.percent)
    settings = workdir / "compare.yaml"
    settings.write_text(COMPARE_YAML)
    compare = parse_config_text(COMPARE_YAML, str(settings))
    observers: dict[str, Observers] = {}
    stacks: dict[str, Stack] = {}
    upstream, sink = None, None
    sink_port = free_port()
    try:
        for side in sides:
            if side.endswith("-sink"):
                observers[side] = Observers([], [Address(LOOPBACK, sink_port)])
            elif side.removesuffix(OWN_SESSIONS) != "off":
                (workdir / side).mkdir()
                started = [
                    ObserverProcess(
                        str(settings),
                        workdir / side / "compare.db",
                        routes=None,
                        log_path=workdir / f"{side}-observer-{i}.log",
                        own_session=side.endswith(OWN_SESSIONS),
                    )
                    for i in range(args.observers)
                ]
                observers[side] = Observers(started, [Address(LOOPBACK, o.port) for o in started])
                if side == "on-no-idle":
                    for process in started:
                        normal_policy(process.pid)
        if any(side.endswith("-sink") for side in sides):
            sink = start_sink(sink_port, workdir / "sink.bytes")
        upstream_ports = {PRIMARY: free_port(), MIRROR: free_port()}
        upstream = start_envoy("upstream", upstream_yaml(upstream_ports, 0), workdir, 1)
        for side in sides:
            base = side.removesuffix(OWN_SESSIONS)
            renderer = render if base == "off" else capture_renderer(base, compare, observers[side].addresses)
            variant = Variant(side, renderer, processor="sampler", percent=args.percent, own_session=side.endswith(OWN_SESSIONS))
            stacks[side] = start_stack(variant, policy, upstream_ports, workdir, 1)
        for side in sides:  # warm-up: connections, caches, the observers' first joins
            run_window(stacks[side].url, args.rate, 2, 0)
        for o in observers.values():
            o.settled()
        for process in observers["on-no-idle"].processes if "on-no-idle" in sides else []:
            normal_policy(process.pid)  # again: threads started since
        compared0 = observers["on"].compared()
        served0 = primary_requests(stacks["on"].envoy.stats())
        windows: list[Window] = []
        deadline = time.monotonic() + args.minutes * 60
        round_ = 0
        order = random.Random(args.seed)
        try:
            while time.monotonic() < deadline:
                # A fresh order each round: no side follows the same one most of the time.
                for side in order.sample(sides, len(sides)):
                    windows.append(measured_window(side, round_, stacks[side].url, args, list(observers.values())))
                shown = {w.side: percentiles(w.latencies_ms) for w in windows[-len(sides) :]}
                figures = "  ".join(f"{side} {p[0]:.1f}/{p[1]:.1f}" for side, p in shown.items())
                print(f"  [round {round_ + 1}] {figures} ms (p50/p99)", flush=True)
                round_ += 1
        except KeyboardInterrupt:
            print("  interrupted: the rounds so far are reported", flush=True)
            windows = [w for w in windows if w.round < round_]
        observers["on"].settled()
        compared = observers["on"].compared() - compared0
        served = primary_requests(stacks["on"].envoy.stats()) - served0
    finally:
        for stack in stacks.values():
            stack.stop()
        if upstream is not None:
            upstream.stop()
        if sink is not None:
            sink.terminate()
            sink.wait(timeout=30)
        for o in observers.values():
            o.stop()
    measured = complete_rounds(windows, sides)
    dropped_rounds = round_ - len({w.round for w in measured})
    if not measured:
        sys.exit(f"bench: no round with latencies on every side, of {round_}: see the work folder's logs")
    windows = measured
    totals = {
        side: dict(zip((f"p{p:g}" for p in PERCENTILES), percentiles(pooled(windows, side)), strict=True))
        | {
            "requests": sum(len(w.latencies_ms) for w in windows if w.side == side),
            "left_out": sum(w.left_out for w in windows if w.side == side),
            "errors": sum(w.errors for w in windows if w.side == side),
            "not_sent": sum(w.not_sent for w in windows if w.side == side),
        }
        for side in sides
    }
    diffs = {side: differences(windows, side, args.bootstrap, args.seed) for side in sides[1:]}
    info = machine()
    md = [
        f"# Comparing the shadow: the primary's latency, interleaved ({datetime.date.today().isoformat()})",
        "",
        f"`{command}`",
        "",
        f"{info['nproc']} cores ({info['cpu']}), Python {info['python']}; load average (1 min) {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (other work on the machine). Code: {code_state()}.",
        f"Every side's stack running throughout; hey -c1 at {args.rate} req/s on one of them for {args.window:g} s, then the next: "
        f"{round_} rounds, each side's window once per round, in an order drawn each round ({dropped_rounds} left out: a side's "
        f"window empty); the first {args.settle:g} s of every "
        f"window left out. {args.percent}% of requests mirrored; every mirror compared, by {args.observers} observer(s) on one "
        "SQLite file per side (`on-sink`: a sink that counts bytes).",
        "",
        "| side | requests | p50 ms | p99 ms | p99.9 ms | not 200 | not sent |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {side} | {t['requests']} | {t['p50']:.2f} | {t['p99']:.2f} | {t['p99.9']:.2f} | {t['errors']} | {t['not_sent']} |"
            for side, t in totals.items()
        ),
        "",
        *difference_table(diffs, "off"),
        "",
        f"Target, `on`'s p99 within {TARGET_MS:g} ms of `off`'s: over all requests, "
        f"{verdict(diffs['on']['p99']['low_ms'], diffs['on']['p99']['high_ms'])}; in the median round, "
        f"{verdict(diffs['on']['p99']['round_low_ms'], diffs['on']['p99']['round_high_ms'])} "
        "(met: the whole interval at or under it; missed: the whole interval over it). "
        f"Intervals: {args.bootstrap} bootstrap resamples of the {round_ - dropped_rounds} rounds (seed {args.seed}). "
        "`not sent`: requests hey did not send of the rate asked for (it skips sends while a request is slow, "
        "so a slow side is sampled less, and leaves out requests that found no connection). "
        f"`on`'s observers compared {compared} pairs; `on` served {served} requests (warm-up excluded).",
    ]
    noisy = noisiest_windows(windows, sides)
    if rows := noisiest_table(noisy):
        md += ["", NOISIEST_CAPTION, "", *rows]
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "compare_latency.md").write_text("\n".join(md) + "\n")
    record = {
        "command": command,
        "machine": info,
        "sides": totals,
        "added": diffs,
        "compared": compared,
        "served": served,
        "noisiest": noisy,
        "windows": [
            {
                "side": w.side,
                "round": w.round,
                "requests": len(w.latencies_ms),
                "left_out": w.left_out,
                "errors": w.errors,
                "not_sent": w.not_sent,
            }
            | {witness: getattr(w, witness) for witness in WITNESSES}
            | dict(zip((f"p{p:g}" for p in PERCENTILES), percentiles(w.latencies_ms), strict=True))
            for w in windows
        ],
    }
    (args.output / "compare_latency.json").write_text(json.dumps(record) + "\n")
    if args.raw is not None:
        args.raw.write_text(json.dumps([dataclasses.asdict(w) for w in windows]) + "\n")
    print("\n".join(md))
    return 0


def normal_policy(pid: int) -> None:
    """Every thread of ``pid`` back under Linux's normal policy (the observers take
    SCHED_IDLE themselves, extproc/priority.py): `on` as it was before that."""
    for_each_thread(pid, lambda thread: os.sched_setscheduler(thread, os.SCHED_OTHER, os.sched_param(0)))


def capture_renderer(side: str, compare: CompareConfig, observers: list[Address]) -> Callable[[Policy, Topology], str]:
    """The configuration of an ``on`` side: ``render_with_capture``, less a part for
    ``on-no-*``, with a part done another way for ``on-<alternative>-sink``."""
    edit = EDITS.get(side.removeprefix("on-").removesuffix("-sink"))

    def rendered(policy: Policy, topology: Topology) -> str:
        config = render_with_capture(policy, topology, compare, observers)
        return config if edit is None else yaml.safe_dump(edit(yaml.safe_load(config)))

    return rendered


if __name__ == "__main__":
    sys.exit(main())
