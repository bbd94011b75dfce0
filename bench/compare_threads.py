"""Where the observers' CPU goes, per thread (docs/compare.md, "Where the
access log observer's time goes"): bench/compare_cost.py's ``on`` stack, then
hey at a fixed rate, each observer thread's CPU over the phase.

    .venv/bin/python bench/compare_threads.py [--tree DIR] [--seconds 15] [--rate 100] [--wrk-first]

``--tree``: run the observers of another checkout (``git worktree add``, or
bench/compare_http2.py's ``export``). ``--wrk-first``: an 8 s wrk phase first,
as the bench's repeat does, so the store holds what a repeat leaves (the sweep
reads it every second). The window runs until the compared count settles, as
the bench's does. CPU from /proc/PID/task/TID/schedstat (nanoseconds: utime and
stime count 10 ms ticks, too coarse for a thread that runs 1 ms a second);
threads by id (Python does not name them for the kernel): the main thread is
the event loop; the others, in the order they start, the metrics server, the
writer and watchfiles' worker (the settings watch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.compare_cost import COMPARE_YAML, Observers  # noqa: E402
from bench.procstat import thread_cpu  # noqa: E402
from bench.run import run_hey, run_wrk  # noqa: E402
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
from extproc.compare.cli import parse_config_text  # noqa: E402
from extproc.compare.envoy import render_with_capture  # noqa: E402
from extproc.envoy.render import Address  # noqa: E402
from extproc.stack.observer import ObserverProcess  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", type=Path, default=REPO, help="the checkout whose observers run (default this one)")
    ap.add_argument("--seconds", type=int, default=15, help="seconds of hey (default 15)")
    ap.add_argument("--rate", type=int, default=100, help="hey's rate, one connection (default 100 req/s)")
    ap.add_argument("--observers", type=int, default=2, help="observer processes (default 2, as the bench)")
    ap.add_argument("--wrk-first", action="store_true", help="an 8 s wrk phase before the measured one")
    add_keep_work_argument(ap)
    args = ap.parse_args(argv)
    check_tools()
    with work_folder("mirror-sampler-compare-threads-", args.keep_work) as workdir:
        return threads(args, args.tree.resolve(), workdir)


def threads(args: argparse.Namespace, tree: Path, workdir: Path) -> int:
    settings = workdir / "compare.yaml"
    settings.write_text(COMPARE_YAML)
    compare = parse_config_text(COMPARE_YAML, str(settings))
    (workdir / "store").mkdir()  # away from the watched settings folder, as the bench
    started = [
        ObserverProcess(str(settings), workdir / "store" / "compare.db", routes=None, env={"PYTHONPATH": str(tree)}, cwd=tree,
                        log_path=workdir / f"observer-{i}.log")
        for i in range(args.observers)
    ]  # fmt: skip
    observers = Observers(started, [Address("127.0.0.1", o.port) for o in started])
    upstreams = {PRIMARY: free_port(), MIRROR: free_port()}
    upstream = start_envoy("upstream", upstream_yaml(upstreams, 0), workdir, 1)
    variant = Variant("on", lambda p, t: render_with_capture(p, t, compare, observers.addresses), processor="sampler", percent=100)
    stack = None
    try:
        stack = start_stack(variant, bench_policy(100), upstreams, workdir, 1)
        run_hey(stack.url, args.rate, 2, 1)  # warm-up
        if args.wrk_first:
            run_wrk(stack.url, 8)
        compared0 = observers.settled()
        before = {o.pid: thread_cpu(o.pid) for o in started}
        latency = run_hey(stack.url, args.rate, args.seconds, 1)
        compared = observers.settled() - compared0
        after = {o.pid: thread_cpu(o.pid) for o in started}
    finally:
        if stack is not None:
            stack.stop()
        upstream.stop()
        observers.stop()
    print(f"{compared} compared at {args.rate} req/s; primary p50 {latency['p50']:.1f} ms, p99 {latency['p99']:.1f} ms; tree {tree}")
    total = 0.0
    for o in started:
        for tid, seconds in sorted(after[o.pid].items()):
            spent = seconds - before[o.pid].get(tid, 0.0)
            total += spent
            if spent < 1e-4:
                continue  # a short-lived thread (a reload, a metrics request) or one that waited throughout
            name = "event loop" if tid == o.pid else f"thread {tid}"
            print(f"  observer {o.pid} {name:<14} {spent * 1e3:8.1f} ms  {spent / max(compared, 1) * 1e6:6.0f} µs/compared")
    print(f"  all {total * 1e3:.1f} ms, {total / max(compared, 1) * 1e6:.0f} µs/compared")
    return 0


if __name__ == "__main__":
    sys.exit(main())
