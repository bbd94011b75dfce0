"""Every manifest the project writes, and every manifest it is tested with,
passes kubectl-validate with the real CRDs (Gateway API experimental, Envoy
Gateway's, Istio's) and Kubernetes' own schemas: what the API server would
say on `kubectl apply`, CEL rules included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.owners.kubectl_validate import validate
from tests.support.paths import CONFORMANCE, DATA, EG_SEED, GEP_SEED, REPO
from tests.support.seeds import httproute_manifests, seed_text

pytestmark = pytest.mark.e2e

EG_INPUTS = (DATA / "convert" / "envoy-gateway" / "shop.yaml", CONFORMANCE)
ISTIO_INPUTS = tuple(sorted((DATA / "convert" / "istio").glob("*.yaml")))


def convert(kind: str, inputs: list[Path], out: Path, *options: str) -> list[Path]:
    """`mirror-sampler convert KIND INPUTS -o OUT`, as a user runs it; the files written."""
    run = subprocess.run(
        [sys.executable, "-m", "extproc", "convert", kind, *map(str, inputs), "--output", str(out), *options],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    written = sorted(out.glob("*.yaml"))
    assert written, run.stderr
    return written


def seed_files(tmp: Path) -> list[Path]:
    """The seeds' manifests (Envoy Gateway's mirroring guide, GEP-3171), one file each."""
    tmp.mkdir(parents=True, exist_ok=True)
    files = []
    for seed in (EG_SEED, GEP_SEED):
        for i, text in enumerate(httproute_manifests(seed_text(seed))):
            path = tmp / f"{Path(seed).stem}-{i}.yaml"
            path.write_text(text, encoding="utf-8")
            files.append(path)
    return files


def test_every_manifest_the_project_writes_is_valid(tmp_path: Path) -> None:
    seeds = seed_files(tmp_path / "seeds")
    written: list[Path] = []
    # The seeds' steps reuse route names: one conversion each.
    for source in (EG_INPUTS[0], CONFORMANCE, *seeds):
        written += convert("envoy-gateway", [source], tmp_path / f"envoy-gateway-{source.stem}")
    # The autoscaler, a chosen namespace and Service name: the options that change the objects.
    options = ("--hpa", "--namespace", "mirroring", "--sampler-service", "sampler")
    written += convert("envoy-gateway", [EG_INPUTS[0]], tmp_path / "envoy-gateway-options", *options)
    written += convert("istio", list(ISTIO_INPUTS), tmp_path / "istio")
    written += convert("istio", list(ISTIO_INPUTS), tmp_path / "istio-options", *options)
    kinds = {line.split(":", 1)[1].strip() for f in written for line in f.read_text().splitlines() if line.startswith("kind:")}
    # What a conversion writes, all of it checked (a witness that the files are not empty).
    for kind in ("HTTPRoute", "EnvoyExtensionPolicy", "ClientTrafficPolicy", "ReferenceGrant", "VirtualService", "EnvoyFilter"):
        assert kind in kinds, kind
    for kind in ("ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
        assert kind in kinds, kind
    verdicts = validate(written)
    invalid = {str(v.path.relative_to(tmp_path)): v.errors for v in verdicts.values() if not v.valid}
    assert not invalid, invalid


def test_the_manifests_the_project_is_tested_with_are_valid(tmp_path: Path) -> None:
    """The inputs: a converter or parser test on a manifest the API server
    would refuse proves nothing about real clusters."""
    files = [*EG_INPUTS, *ISTIO_INPUTS, *seed_files(tmp_path)]
    verdicts = validate(files)
    invalid = {str(v.path): v.errors for v in verdicts.values() if not v.valid}
    assert not invalid, invalid
