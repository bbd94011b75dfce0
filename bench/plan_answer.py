"""Micro-benchmark of the serving hot path, ``Plan.answer``, in process.

Compares two source trees (for example the commit before a change of the
decision engine and the working tree) in one run: rounds alternate between
the trees, each round a fresh interpreter timing ``Plan.answer`` with
``timeit``, and the report gives each tree's median and the ratio, so a slow
moment of a shared machine hits both alike.

    .venv/bin/python bench/plan_answer.py --before /tmp/before --after . --rounds 7

``--measure`` (used by the rounds) times the tree on ``sys.path`` and prints
one JSON object: microseconds per answer for each case.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFORMANCE = REPO / "tests" / "data" / "conformance-percentage-mirror.yaml"
RULE_0 = "gateway-conformance-infra/request-percentage-mirror/0"


def _plan(policy: Any) -> Any:
    from extproc.core import plan
    from extproc.server.metrics import Metrics

    # Either side of the change that made the plan own its responder:
    # Plan(responder, counters) before, Plan(policy, counters) after.
    compile_plan: Any = plan.Plan
    if "responder" in inspect.signature(compile_plan).parameters:
        from extproc.core.responses import Responder

        return compile_plan(Responder(policy), Metrics())
    return compile_plan(policy, Metrics())


def cases() -> dict[str, tuple[Any, list[tuple[dict[str, bytes], str | None]]]]:
    from extproc.config.build import build_policy
    from extproc.config.settings import Settings

    default = build_policy(Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "50"}))
    multi = build_policy(Settings.load({"MIRROR_CONFIG": str(CONFORMANCE)}), CONFORMANCE.read_text())
    keys = [f"user-{i}".encode() for i in range(1000)]
    paths = [b"/percent-mirror", b"/percent-mirror-fraction/x", b"/percent-multi-mirror-and-modify-headers", b"/elsewhere"]

    def request(key: bytes, path: bytes = b"/") -> dict[str, bytes]:
        return {":method": b"GET", ":path": path, ":authority": b"gw.example", "user-agent": b"bench", "x-request-id": key}

    return {
        "default": (default, [(request(k), None) for k in keys]),
        "multi-matched": (multi, [(request(k, paths[i % 4]), None) for i, k in enumerate(keys)]),
        "multi-named": (multi, [(request(k, paths[0]), RULE_0) for k in keys]),
    }


def _runner(answer: Callable[..., bytes], requests: list[tuple[dict[str, bytes], str | None]]) -> Callable[[], None]:
    def run() -> None:
        for headers, rule_id in requests:
            answer(headers, None, rule_id)

    return run


def measure(number: int) -> dict[str, float]:
    out = {}
    for name, (policy, requests) in cases().items():
        best = min(timeit.repeat(_runner(_plan(policy).answer, requests), number=number, repeat=5))
        out[name] = best / (number * len(requests)) * 1e6
    return out


def compare(before: Path, after: Path, rounds: int, number: int) -> None:
    figures: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    for _ in range(rounds):
        for side, tree in (("before", before), ("after", after)):
            env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
            done = subprocess.run(
                [sys.executable, __file__, "--measure", "--number", str(number)], env=env, capture_output=True, text=True, check=True
            )
            for name, us in json.loads(done.stdout).items():
                figures[side].setdefault(name, []).append(us)
    print(f"Plan.answer, µs per call (median of {rounds} alternating rounds, each the best of 5 timeit repeats)")
    print(f"{'case':16} {'before':>8} {'after':>8} {'after/before':>13}")
    for name in figures["before"]:
        b, a = statistics.median(figures["before"][name]), statistics.median(figures["after"][name])
        print(f"{name:16} {b:8.3f} {a:8.3f} {a / b:13.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true", help="time the tree on sys.path and print JSON")
    parser.add_argument("--before", type=Path, help="source tree holding the extproc package before the change")
    parser.add_argument("--after", type=Path, default=REPO, help="source tree after (default: this repository)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=20, help="passes over the 1,000 requests per timeit repeat")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.number)))
    elif args.before is None:
        parser.error("--before is required (or --measure)")
    else:
        compare(args.before, args.after, args.rounds, args.number)


if __name__ == "__main__":
    main()
