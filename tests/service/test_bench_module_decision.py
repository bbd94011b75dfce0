"""bench/module_decision.py builds and runs against the module's current C API, and
its loop decides like the reference decision (so its figure is a decision's cost)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from extproc.config.build import build_policy
from extproc.config.settings import Settings
from extproc.core.policy import Outcome
from tests.support.decision import reference_outcomes
from tests.support.paths import REPO


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_the_decision_bench_mirrors_exactly_the_keys_the_reference_samples() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "module_decision.py"), "--rounds", "1", "--passes", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    found = re.search(r"mirrored (\d+) of (\d+) keys", done.stdout)
    assert found, done.stdout
    policy = build_policy(Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "50"}))
    header = policy.key_chain[0].name
    keys = int(found[2])
    expected = sum(
        outcome is Outcome.MIRRORED
        for i in range(keys)
        for _, outcome in reference_outcomes(policy, {":method": b"GET", ":path": b"/percent-mirror", header: f"user-{i}".encode()})
    )
    assert int(found[1]) == expected
    assert re.search(r"C: [\d.]+ ns per decision", done.stdout), done.stdout
