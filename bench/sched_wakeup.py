"""What an observer's priority does to Envoy's wake-ups where the two share a
core (docs/compare.md "Cost"), with nothing else of the stack involved.

    .venv/bin/python bench/sched_wakeup.py [--wakeups 3000] [--repeats 3] [--cpu N]

A sleeper (this process, standing for Envoy's worker: it sleeps 5 ms and
wakes, as a worker waits for its next request) and a busy process (standing
for an observer in a batch; a loop that never sleeps) share one core. The busy
process runs in a session of its own, as a supervisor starts an observer
(and `up` and the bench's testbed did until 2026-12-04), so under Linux's
autogroups it is a scheduling group of its own. Variants, alternating in rotated order:

- ``alone``: no busy process (the machine's own floor);
- ``busy``: the busy process at its inherited priority;
- ``busy-nice``: the busy process after ``os.nice(10)`` (what the observer
  did before extproc/priority.py);
- ``busy-lowered``: after ``lower_cpu_priority(10)`` (what it does now:
  the session group's nice value too);
- ``busy-idle``: that and Linux's SCHED_IDLE policy (measured for the
  observer and not chosen: docs/compare.md, "With the observers' priority
  counting").

Figures: how late the sleeper woke (ms past its 5 ms; p50, p99, p99.9) and
how many wake-ups in a thousand were more than 1 ms late, medians over
repeats. Whether the kernel groups sessions is printed first
(``kernel.sched_autogroup_enabled``); without autogroups ``busy-nice`` and
``busy-lowered`` are the same.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.run import med, percentile  # noqa: E402

BUSY = """
import os, sys
os.sched_setaffinity(0, {{{cpu}}})
{lower}
group = open("/proc/self/autogroup").read().strip() if os.path.exists("/proc/self/autogroup") else "(no autogroups)"
print("ready", group, flush=True)
while True:
    pass
"""
LOWER = {
    "busy": "",
    "busy-nice": "os.nice(10)",
    "busy-lowered": "from extproc.priority import lower_cpu_priority; lower_cpu_priority(10)",
    "busy-idle": "from extproc.priority import lower_cpu_priority; lower_cpu_priority(10)\n"
    "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))",
}
VARIANTS = ("alone", *LOWER)
SLEEP_S = 0.005


def busy(variant: str, cpu: int) -> subprocess.Popen[str] | None:
    if variant == "alone":
        return None
    code = BUSY.format(cpu=cpu, lower=LOWER[variant])
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert child.stdout is not None
    ready, _, group = child.stdout.readline().strip().partition(" ")
    assert ready == "ready", variant
    print(f"  {variant}: {group}", flush=True)  # the group's nice value, as the kernel shows it
    return child


def late_wakeups(count: int) -> list[float]:
    late = []
    for _ in range(count):
        started = time.perf_counter()
        time.sleep(SLEEP_S)
        late.append((time.perf_counter() - started - SLEEP_S) * 1e3)
    return sorted(late)


def figures(late: list[float]) -> dict[str, float]:
    quantiles = {f"p{q:g}": percentile(late, q) for q in (50, 99, 99.9)}
    return {**quantiles, "over 1 ms per 1000": 1000 * sum(x > 1 for x in late) / len(late)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wakeups", type=int, default=3000, help="sleeper wake-ups per variant and repeat (5 ms each)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)), help="the core both share (default: the last)")
    args = ap.parse_args()
    grouped = Path("/proc/sys/kernel/sched_autogroup_enabled")
    print(f"kernel.sched_autogroup_enabled: {grouped.read_text().strip() if grouped.exists() else 'absent'}; core {args.cpu}")
    os.sched_setaffinity(0, {args.cpu})
    results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for repeat in range(args.repeats):
        for variant in VARIANTS[repeat % len(VARIANTS) :] + VARIANTS[: repeat % len(VARIANTS)]:
            child = busy(variant, args.cpu)
            try:
                results[variant].append(figures(late_wakeups(args.wakeups)))
            finally:
                if child is not None:
                    child.kill()
                    child.wait()
                    assert child.stdout is not None
                    child.stdout.close()
            print(f"repeat {repeat + 1} {variant}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[variant][-1].items()), flush=True)
    columns = list(results["alone"][0])
    print("\n| variant | " + " | ".join(f"{c} (ms)" if c.startswith("p") else c for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for variant, runs in results.items():
        print(f"| {variant} | " + " | ".join(f"{med([r[c] for r in runs]):.3f}" for c in columns) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
