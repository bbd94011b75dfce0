"""The observer's writer ceiling: pairs stored a second from a backlog
(docs/compare.md "Cost"), this tree against other commits' writers, alternating.

    .venv/bin/python bench/compare_writer.py [--pairs 5000] [--repeats 5] [--baseline COMMIT ...]

Each measurement is a process of its own running one tree's ``Writer`` on a
fresh SQLite file: ``--pairs`` requests' primary and shadow captures (a small
JSON body, a few headers, every other shadow differing in one field) are
queued before the writer starts, so what is timed is the writer alone (no
transport, no parsing), from its start until every capture is stored. Under
a saturating load this is what bounds the compared requests a second; past
it the queue's bound drops captures (``queue_full``). Figures: pairs a second
(wall clock) and the writer thread's CPU per pair (its schedstat, so the
creation of its store included); medians over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.compare_cost import COMPARE_YAML  # noqa: E402
from bench.compare_http2 import export  # noqa: E402
from bench.testbed import add_keep_work_argument, work_folder  # noqa: E402

CHILD = """
import json, sys, time
from pathlib import Path
from extproc.compare.capture import Writer
from extproc.compare.cli import parse_config_text
from extproc.compare.metrics import CompareMetrics
from extproc.compare.records import Capture, Side
from extproc.compare.store import CompareStore

pairs, db, text = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
config = parse_config_text(text, str(db.with_suffix(".yaml")))
headers = (("content-type", "application/json"), ("x-envoy-upstream-service-time", "1"), ("server", "envoy"))
def body(n, differs):
    return json.dumps({"id": n, "user": {"name": "u%d" % n, "plan": "pro"}, "items": list(range(8)), "v": 2 if differs else 1}).encode()
def side(n, s, target, differs=False):
    targets = ("mirror",) if s is Side.PRIMARY else (target,)
    return Capture("req-%d" % n, "simple", s, targets, "GET", "/x/%d" % n, 200, headers, body(n, differs), False, 1.0, False, time.time())
writer = Writer(lambda: CompareStore(db, config), CompareMetrics(), bound=2 * pairs + 1, byte_bound=2**40)
for n in range(pairs):
    writer.offer(side(n, Side.PRIMARY, ""))
    writer.offer(side(n, Side.SHADOW, "mirror", differs=n % 2 == 0))
wall0 = time.monotonic()
writer.start()
while writer.queued_bytes:
    time.sleep(0.002)
wall = time.monotonic() - wall0
# The writer thread's own CPU (it waits for the next capture, still alive).
cpu = int(Path("/proc/self/task/%d/schedstat" % writer.thread.native_id).read_text().split()[0]) / 1e9
writer.queue.put(None)
writer.thread.join(timeout=30)
print(json.dumps({"pairs": pairs, "wall_s": wall, "cpu_s": cpu}))
"""


def measure(tree: Path, pairs: int, workdir: Path, name: str) -> dict[str, float]:
    db = workdir / f"{name}-{time.monotonic_ns()}.db"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    argv = [sys.executable, "-c", CHILD, str(pairs), str(db), COMPARE_YAML]
    out = subprocess.run(argv, env=env, cwd=tree, check=True, capture_output=True, text=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=5000, help="requests (primary and shadow captures) in the backlog (default 5000)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of every tree (default 5)")
    ap.add_argument("--baseline", action="append", default=[], help="also the writer of this commit (repeatable)")
    add_keep_work_argument(ap)
    args = ap.parse_args(argv)
    if args.pairs <= 0:
        ap.error(f"--pairs: {args.pairs} is not a positive number")
    with work_folder("mirror-sampler-writer-bench-", args.keep_work) as workdir:
        return compare(args, argv, workdir)


def compare(args: argparse.Namespace, argv: list[str] | None, workdir: Path) -> int:
    trees = {"this tree": REPO, **{c: export(c, workdir) for c in args.baseline}}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    names = list(trees)
    for rep in range(args.repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            r = measure(trees[name], args.pairs, workdir, name.replace(" ", "-"))
            runs[name].append(r)
            rate, cpu = r["pairs"] / r["wall_s"], r["cpu_s"] / r["pairs"] * 1e6
            print(f"  [{rep + 1}/{args.repeats}] {name:<12} {rate:7.0f} pairs/s  {cpu:5.0f} µs CPU/pair", flush=True)
    print(f"\n`python bench/compare_writer.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n")
    print("| writer | pairs/s (from a backlog) | CPU µs/pair |")
    print("|---|---|---|")
    for name, rs in runs.items():
        rate = statistics.median(r["pairs"] / r["wall_s"] for r in rs)
        cpu = statistics.median(r["cpu_s"] / r["pairs"] * 1e6 for r in rs)
        print(f"| {name} | {rate:,.0f} | {cpu:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
