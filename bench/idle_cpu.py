"""What an idle sampler and an idle observer cost: CPU milliseconds a second
with no traffic, this tree against other commits, alternating.

    .venv/bin/python bench/idle_cpu.py [--seconds 20] [--repeats 3] [--baseline COMMIT ...]

Each measurement starts one process of one tree (``serve --config
extproc/data/http-mirror.yaml``, or ``compare capture`` with one compared rule
and its store in a folder of its own), waits 4 s for its start-up to end, then
sums ``/proc/PID/task/*/schedstat`` (nanoseconds, every thread) over
``--seconds``. What remains is the process's timers: the sampler's event-loop
lag probe, the settings watch, the observer's sweep. Medians over repeats.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.compare_cost import COMPARE_YAML  # noqa: E402
from bench.compare_http2 import export  # noqa: E402
from bench.procstat import thread_cpu  # noqa: E402
from bench.testbed import add_keep_work_argument, work_folder  # noqa: E402

START_UP_S = 4.0


def command(kind: str, folder: Path) -> list[str]:
    if kind == "sampler":
        config = folder / "policy.yaml"
        shutil.copy(REPO / "extproc" / "data" / "http-mirror.yaml", config)
        return ["serve", "--config", str(config), "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]
    settings = folder / "compare.yaml"
    settings.write_text(COMPARE_YAML)
    (folder / "store").mkdir()
    return ["compare", "capture", "--config", str(settings), "--db", str(folder / "store" / "c.db"), "--listen", "127.0.0.1:0"]


def measure(tree: Path, kind: str, seconds: float) -> float:
    folder = Path(tempfile.mkdtemp(prefix=f"mirror-sampler-idle-{kind}-"))
    env = {**os.environ, "PYTHONPATH": str(tree)}
    args = [sys.executable, "-m", "extproc", *command(kind, folder)]
    process = subprocess.Popen(args, env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(START_UP_S)
        if process.poll() is not None:
            raise SystemExit(f"{kind} of {tree} exited at start-up ({process.returncode}): {' '.join(args)}")
        before, start = sum(thread_cpu(process.pid).values()), time.monotonic()
        time.sleep(seconds)
        after, end = sum(thread_cpu(process.pid).values()), time.monotonic()
        return (after - before) * 1e3 / (end - start)
    finally:
        process.terminate()
        process.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20, help="seconds measured per process (default 20)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every tree and process (default 3)")
    ap.add_argument("--baseline", action="append", default=[], help="also this commit's processes (repeatable)")
    add_keep_work_argument(ap)
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.repeats <= 0:
        ap.error(f"--seconds and --repeats must be positive (got {args.seconds:g} and {args.repeats})")
    with work_folder("mirror-sampler-idle-bench-", args.keep_work) as workdir:
        return compare(args, argv, workdir)


def compare(args: argparse.Namespace, argv: list[str] | None, workdir: Path) -> int:
    trees = {"this tree": REPO, **{c: export(c, workdir) for c in args.baseline}}
    runs: dict[tuple[str, str], list[float]] = {}
    names = list(trees)
    for rep in range(args.repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            for kind in ("sampler", "observer"):
                ms = measure(trees[name], kind, args.seconds)
                runs.setdefault((name, kind), []).append(ms)
                print(f"  [{rep + 1}/{args.repeats}] {name:<12} {kind:<8} {ms:5.2f} ms/s", flush=True)
    print(f"\n`python bench/idle_cpu.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    print("| tree | idle sampler, CPU ms/s | idle observer, CPU ms/s |")
    print("|---|---|---|")
    for name in names:
        sampler, observer = (statistics.median(runs[(name, kind)]) for kind in ("sampler", "observer"))
        print(f"| {name} | {sampler:.2f} | {observer:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
