"""What one decision costs the dynamic module, in C, against the sampler's Python
decision on the same requests, in one run, alternating.

    .venv/bin/python bench/module_decision.py [--rounds 7] [--passes 2000]

bench/module_decision.c runs the module's own ``ms_decide`` (decision.c, config.c,
json.c, built with the module's flags) over 1,024 requests whose key header holds
``user-0`` .. ``user-1023`` among typical request headers, for the default policy (one
rule, one target at 50%): ns per decision (key lookup, hash, threshold) and ns per hash.
The reference is ``Plan.answer`` (bench/plan_answer.py's ``default`` case, the serving
hot path of the ext_proc sampler, answer bytes included). Medians over rounds; each round
measures both. Envoy's CPU per request with the module in the data path is
bench/module_cpu.py's and bench/run.py's ``module`` row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.plan_answer import measure as plan_answer_us  # noqa: E402
from extproc.config.build import build_policy  # noqa: E402
from extproc.config.settings import Settings  # noqa: E402
from extproc.envoy.module import rule_settings, to_json  # noqa: E402
from extproc.module.build import MODULE_FLAGS, SOURCE_DIR, SOURCES, compile_c  # noqa: E402

BENCH_SOURCE = Path(__file__).with_name("module_decision.c")
# The module's flags but an executable, not a shared object.
FLAGS = tuple(f for f in MODULE_FLAGS if f not in ("-fPIC", "-shared", "-fvisibility=hidden"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--passes", type=int, default=2000, help="passes over the 1,024 requests per C measurement")
    args = parser.parse_args()
    policy = build_policy(Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "50"}))
    (rule,) = policy.rules
    key = policy.key_chain[0]
    assert key.kind.value == "header", key
    with tempfile.TemporaryDirectory(prefix="module-decision-") as tmp:
        core = [SOURCE_DIR / name for name in SOURCES if name != "mirror_sampler.c"]
        binary = compile_c(Path(tmp) / "module-decision", [BENCH_SOURCE, *core], FLAGS)
        c_runs, py_runs = [], []
        for _ in range(args.rounds):
            done = subprocess.run(
                [str(binary), to_json(rule_settings(policy, rule)), key.name, str(args.passes)],
                capture_output=True,
                text=True,
                check=True,
            )
            c_runs.append(json.loads(done.stdout))
            py_runs.append(plan_answer_us(number=20)["default"])
    decide = statistics.median(r["decide_ns"] for r in c_runs)
    hashed = statistics.median(r["hash_ns"] for r in c_runs)
    python = statistics.median(py_runs) * 1000
    mirrored = c_runs[0]["mirrored_per_pass"]
    print(f"module decision, C: {decide:.1f} ns per decision ({hashed:.1f} ns of it the hash)")
    print(f"mirrored {mirrored:g} of {c_runs[0]['keys']} keys (user-0 .. user-{c_runs[0]['keys'] - 1}) per pass")
    print(f"sampler decision, Python Plan.answer: {python:.0f} ns per answer; C/Python = {decide / python:.4f}")
    per_round_c = [round(r["decide_ns"], 1) for r in c_runs]
    per_round_py = [round(p * 1000) for p in py_runs]
    print(f"(medians of {args.rounds} rounds; per round: C {per_round_c} ns, Python {per_round_py} ns)")


if __name__ == "__main__":
    main()
