"""envoy/envoy-module.yaml (docker compose's module engine) accepted by the real Envoy,
with the module built here standing in at the path the compose volume provides."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from extproc.envoy.module import COMPOSE_MODULE_PATH
from extproc.module.build import build_module
from extproc.stack.envoy import validate
from tests.support.paths import REPO


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_envoy_accepts_the_compose_module_configuration(tmp_path: Path) -> None:
    text = (REPO / "envoy" / "envoy-module.yaml").read_text(encoding="utf-8")
    assert text.count(COMPOSE_MODULE_PATH) >= 2  # the filter and each rule's routes
    config = tmp_path / "envoy.yaml"
    config.write_text(text.replace(COMPOSE_MODULE_PATH, str(build_module(tmp_path / "cache"))), encoding="utf-8")
    checked = validate(config)
    assert checked.returncode == 0, checked.stdout + checked.stderr
