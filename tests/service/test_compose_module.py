"""envoy/envoy-module.yaml (docker compose's module engine) accepted by the real Envoy,
with the module built here standing in at the path the compose volume provides."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from extproc.envoy.module import COMPOSE_MODULE_PATH
from extproc.module.build import build_module
from extproc.stack.envoy import validate
from tests.support.docker import compose_v2
from tests.support.paths import REPO


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_envoy_accepts_the_compose_module_configuration(tmp_path: Path) -> None:
    text = (REPO / "envoy" / "envoy-module.yaml").read_text(encoding="utf-8")
    assert text.count(COMPOSE_MODULE_PATH) >= 2  # the filter and each rule's routes
    config = tmp_path / "envoy.yaml"
    config.write_text(text.replace(COMPOSE_MODULE_PATH, str(build_module(tmp_path / "cache"))), encoding="utf-8")
    checked = validate(config)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_compose_merges_the_module_file_as_intended() -> None:
    """Compose's own merge (`config`, v2 where built, else docker-compose 1.29): Envoy reads
    envoy-module.yaml instead of envoy.yaml, mounts the built module, and waits for the build."""
    compose = compose_v2() or ((shutil.which("docker-compose") or "docker-compose"),)
    if shutil.which(compose[0]) is None:
        pytest.skip("needs Compose: `make owners-tools` builds v2 (no daemon needed)")
    done = subprocess.run(
        [*compose, "-f", "docker-compose.yml", "-f", "docker-compose.module.yml", "config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    merged = yaml.safe_load(done.stdout)
    envoy = merged["services"]["envoy"]
    volumes = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in envoy["volumes"]]
    targets = {v.split(":")[1]: v.split(":")[0] for v in volumes}
    assert targets["/etc/envoy/envoy.yaml"].endswith("envoy/envoy-module.yaml")
    assert targets[str(Path(COMPOSE_MODULE_PATH).parent)] == "mirror-sampler-module"
    assert envoy["depends_on"]["module-build"]["condition"] == "service_completed_successfully"  # v2 adds required: true
    assert "module-build" in merged["services"]
