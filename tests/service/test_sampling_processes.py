"""The decision across processes (restarts, workers, replicas): nothing in it
depends on PYTHONHASHSEED. Starts interpreters, so not in tests/unit."""

from __future__ import annotations

import os
import subprocess
import sys

from extproc.core.sampling import Fraction, decide
from tests.support.paths import REPO


def test_hash_is_stable_across_processes() -> None:
    """Same decision across restarts, workers and replicas: nothing depends on PYTHONHASHSEED."""
    code = (
        "from extproc.core.sampling import key_hash, decide, Fraction\n"
        "print(key_hash(b'', b'user-123'), key_hash(b'v2', b'alice'), decide(b's', b'k', Fraction(5, 1000)))"
    )
    root = REPO
    outputs = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(root)}
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
        outputs.add(out.stdout)
    expected = f"17646487862988728035 2539909752279064467 {decide(b's', b'k', Fraction(5, 1000))}\n"
    assert outputs == {expected}
