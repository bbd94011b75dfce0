"""istioctl analyze, offline (no cluster), on what `convert istio` writes, for the
ext_proc sampler and for `--inline module` (its objects, and Deployments with its
patches merged): nothing above Info."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.owners.test_kubectl_validate import ISTIO_INPUTS, convert, istio_module_objects
from tests.owners.tools import istioctl

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("engine", ["ext_proc", "module"])
def test_istioctl_analyze_finds_nothing_above_info(tmp_path: Path, engine: str) -> None:
    binary = istioctl()
    written = convert("istio", list(ISTIO_INPUTS), tmp_path / "istio") if engine == "ext_proc" else istio_module_objects(tmp_path / "istio")
    run = subprocess.run(
        [str(binary), "analyze", "--use-kube=false", "--failure-threshold", "Warning", "--output-threshold", "Info", *map(str, written)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = run.stdout + run.stderr
    # Exit 0: nothing at or above the failure threshold; 79 (Warning) or 80 (Error) otherwise.
    assert run.returncode == 0, report
    assert "Error [" not in report and "Warning [" not in report, report
