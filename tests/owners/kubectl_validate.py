"""kubectl-validate, offline, with the CRDs copied from the upstream modules:
the verdict the API server would give (OpenAPI schema and CEL rules), per
file, many files per process."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.owners.tools import PINS, all_crds, kubectl_validate


@dataclass(frozen=True, slots=True)
class Verdict:
    """One file's verdict: valid when every document in it is."""

    path: Path
    errors: tuple[str, ...]

    @property
    def valid(self) -> bool:
        return not self.errors


def _messages(status: dict[str, Any]) -> list[str]:
    if status.get("status") == "Success":
        return []
    causes = (status.get("details") or {}).get("causes") or []
    return [f"{c.get('field', '')}: {c.get('message', '')}".strip(": ") for c in causes] or [str(status.get("message", status))]


def validate(files: Sequence[Path]) -> dict[Path, Verdict]:
    """kubectl-validate's verdict on each file (one process for all of them)."""
    binary = kubectl_validate()
    crd_args = [arg for folder in all_crds() for arg in ("--local-crds", str(folder))]
    run = subprocess.run(
        [str(binary), *map(str, files), *crd_args, "--version", PINS["KUBERNETES_VERSION"], "--output", "json"],
        capture_output=True,
        text=True,
        timeout=600,
        # No cluster: schemas come from the CRDs and the built-in Kubernetes ones.
        env={**os.environ, "KUBECONFIG": "/dev/null"},
    )
    # 0: all valid, 1: some invalid; 2 (bad arguments) and 3 (internal error) are the test's fault.
    assert run.returncode in (0, 1), f"kubectl-validate exit {run.returncode}: {run.stderr[-3000:]}{run.stdout[-3000:]}"
    report: dict[str, list[dict[str, Any]]] = json.loads(run.stdout)
    verdicts = {Path(p): Verdict(Path(p), tuple(m for s in statuses for m in _messages(s))) for p, statuses in report.items()}
    missing = [f for f in files if Path(f) not in verdicts]
    assert not missing, f"kubectl-validate said nothing about {missing}"
    assert (run.returncode == 0) == all(v.valid for v in verdicts.values()), run.stdout[-3000:]
    return verdicts
