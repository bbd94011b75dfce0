"""Every manifest the project writes, and every manifest it is tested with,
passes kubectl-validate with the real CRDs (Gateway API experimental, Envoy
Gateway's, Istio's) and Kubernetes' own schemas: what the API server would
say on `kubectl apply`, CEL rules included."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from extproc.convert.istio_module import GATEWAY_PATCH, SIDECAR_PATCH
from tests.owners.kubectl_validate import validate
from tests.support.paths import CONFORMANCE, DATA, EG_SEED, GEP_SEED
from tests.support.seeds import httproute_manifests, seed_text
from tests.unit.test_convert_envoy_gateway import EDGE_NAMES, GRPC_ROUTE, SERVICE, manifests, mirrored_rule, route_manifest
from tests.unit.test_convert_istio_module import patched_deployment
from tests.unit.test_envoyconf import render_cli

pytestmark = pytest.mark.e2e

EG_INPUTS = (DATA / "convert" / "envoy-gateway" / "shop.yaml", CONFORMANCE)
ISTIO_INPUTS = tuple(sorted((DATA / "convert" / "istio").glob("*.yaml")))


def convert(kind: str, inputs: list[Path], out: Path, *options: str) -> list[Path]:
    """`mirror-sampler convert KIND INPUTS -o OUT`; the files written. The CLI's
    own function in this process (its messages are in the test's output): the
    command as a process is tests/service/test_cli.py's, and a dozen interpreter
    start-ups here would only add their imports."""
    status = render_cli(["convert", kind, *map(str, inputs), "--output", str(out), *options], {})
    assert status == 0, f"convert {kind} exited {status}"
    written = sorted(out.glob("*.yaml"))
    assert written
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


def istio_module_objects(out: Path) -> list[Path]:
    """`convert istio --inline module`'s objects, and a Deployment with each of its
    Deployment patches merged (a patch alone is no object to validate)."""
    written = convert("istio", list(ISTIO_INPUTS), out, "--inline", "module")
    patches = [p for p in written if p.name in (GATEWAY_PATCH, SIDECAR_PATCH)]
    assert len(patches) == 2
    for patch in patches:
        deployment = patched_deployment(yaml.safe_load(patch.read_text()))
        (out / f"patched-{patch.name}").write_text(yaml.safe_dump(deployment))
    return [*(p for p in written if p not in patches), *(out / f"patched-{p.name}" for p in patches)]


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
    written += istio_module_objects(tmp_path / "istio-module")
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


def test_the_names_convert_envoy_gateway_gives_are_valid(tmp_path: Path) -> None:
    """Rule and object names at the edges (a user rule named as a variant would be, rule,
    route and Gateway names near the 253-character limit), with both engines: the CRDs'
    rules (unique rule names, maxLength) and metadata.name's (a DNS-1123 subdomain)."""
    inputs = []
    grpc = manifests(route_manifest("web", [mirrored_rule("/")]), GRPC_ROUTE, SERVICE)
    module_clash = manifests(route_manifest("clash", [mirrored_rule("/a"), mirrored_rule("/b", "mirror-sampler-0", mirrors=0)]))
    for case, sources in {**EDGE_NAMES, "module-rule-name-clash": module_clash, "grpc-route": grpc}.items():
        ((_, text),) = sources
        inputs.append(tmp_path / "inputs" / f"{case}.yaml")
        inputs[-1].parent.mkdir(exist_ok=True)
        inputs[-1].write_text(text, encoding="utf-8")
    written: list[Path] = []
    for source in inputs:
        written += convert("envoy-gateway", [source], tmp_path / source.stem)
        written += convert("envoy-gateway", [source], tmp_path / f"{source.stem}-module", "--inline", "module")
    verdicts = validate([*inputs, *written])
    invalid = {str(v.path.relative_to(tmp_path)): v.errors for v in verdicts.values() if not v.valid}
    assert not invalid, invalid
