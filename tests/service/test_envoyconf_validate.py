"""Every `envoy-config` rendering accepted by the real Envoy: the
validations of all of them run side by side in one batch (each `envoy --mode
validate` is a separate process, about a second of CPU each). Processes, so
not in tests/unit, whose renderings (tests/unit/test_envoyconf.py) this
reuses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from extproc.envoy.module import COMPOSE_MODULE_PATH
from extproc.module.build import build_module
from tests.unit.test_envoyconf import CASES, SNIPPET_CASES, Rendered, rendered, snippet_bootstrap

__all__ = ["rendered"]  # the fixture

ENVOY = Path(sys.executable).parent / "envoy"


@pytest.fixture(scope="module")
def validations(rendered: dict[str, Rendered], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """`envoy --mode validate` of every rendering, all at once."""
    tmp = tmp_path_factory.mktemp("validate")
    files: dict[str, Path] = {}
    for name, r in rendered.items():
        if r.path is None:
            continue
        if name in SNIPPET_CASES:
            assert r.policy is not None
            files[name] = tmp / f"{name}-bootstrap.yaml"
            files[name].write_text(yaml.safe_dump(snippet_bootstrap(yaml.safe_load(r.text), r.policy), sort_keys=False), encoding="utf-8")
        elif COMPOSE_MODULE_PATH in r.text:
            # The module built here stands in at the path the compose volume provides.
            files[name] = tmp / f"{name}.yaml"
            files[name].write_text(r.text.replace(COMPOSE_MODULE_PATH, str(build_module())), encoding="utf-8")
        else:
            files[name] = r.path
    procs = {
        name: subprocess.Popen(
            [str(ENVOY), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id", "--log-level", "warning"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, path in files.items()
    }
    results = {}
    for name, proc in procs.items():
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        results[name] = (proc.returncode, out)
    return results


def assert_valid(name: str, rendered: dict[str, Rendered], validations: dict[str, tuple[int, str]]) -> None:
    r = rendered[name]
    assert r.path is not None, f"rendering failed: {r.error}"
    rc, out = validations[name]
    # The reason is on the critical line; Envoy then dumps the whole config.
    reason = [line[:1500] for line in out.splitlines() if "critical" in line or "error" in line.lower()]
    assert rc == 0, f"Envoy rejects the {name} configuration ({r.path}):\n" + "\n".join(reason or [out[-3000:]])


@pytest.mark.parametrize("name", [n for n in CASES if n not in ("mirror-without-backend", "host-header-modifier")])
def test_envoy_accepts(name: str, rendered: dict[str, Rendered], validations: dict[str, tuple[int, str]]) -> None:
    assert_valid(name, rendered, validations)


def test_envoy_accepts_mirrors_on_a_rule_without_backends(rendered: dict[str, Rendered], validations: dict[str, tuple[int, str]]) -> None:
    """check-config accepts RequestMirror on a rule with no backendRefs (or only
    weight-0 ones): its plain route answers 500, and its variant routes must
    not carry an empty weighted_clusters, which Envoy refuses."""
    assert_valid("mirror-without-backend", rendered, validations)


def test_envoy_accepts_a_host_header_modifier(rendered: dict[str, Rendered], validations: dict[str, tuple[int, str]]) -> None:
    """check-config accepts RequestHeaderModifier on Host; Envoy refuses Host in
    request_headers_to_add/remove (':-prefixed or host headers may not be
    modified'). Either config refuses it or envoyconf renders it another way
    (host_rewrite_literal for set)."""
    assert_valid("host-header-modifier", rendered, validations)


def test_envoy_accepts_the_compose_comparison() -> None:
    """envoy/envoy-compare.yaml (docker compose with the capture points; fresh: tests/unit/test_envoyconf.py)."""
    from extproc.stack.envoy import validate
    from tests.support.paths import REPO

    checked = validate(REPO / "envoy" / "envoy-compare.yaml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
