"""docker-compose.module.yml (the module engine on top of docker-compose.yml) agrees with
the project, statically: the builder runs the module's own compile command on the
repository's C sources into the volume Envoy mounts where envoy/envoy-module.yaml loads
the module from; that file is fresh; the Envoy image is a version the module supports.
(No Docker here: docker-compose.module.yml needs a compiler image, docs/module.md.)"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

import yaml

from extproc.envoy.module import COMPOSE_MODULE_PATH
from extproc.module.build import DEFAULT_BUILDER_IMAGE, SOURCE_DIR, SOURCES, compile_command
from extproc.module.support import SUPPORTED
from tests.support.paths import REPO
from tests.unit.test_envoyconf import DEFAULT_CONFIG, render_cli

BASE = REPO / "docker-compose.yml"
OVERRIDE = REPO / "docker-compose.module.yml"
ENVOY_MODULE_YAML = REPO / "envoy" / "envoy-module.yaml"


def load(path: Any) -> dict[str, Any]:
    # Plain YAML, no compose v2 merge tags (!override, !reset): Debian's docker-compose 1.29 reads it too.
    loaded: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return loaded


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """container path -> (source, read-only)."""
    out = {}
    for v in service.get("volumes") or []:
        source, target, *mode = v.split(":")
        out[target] = (source, mode == ["ro"])
    return out


def test_builder_compiles_the_repository_sources_into_the_volume_envoy_loads_from() -> None:
    services = load(OVERRIDE)["services"]
    builder, envoy = services["module-build"], services["envoy"]
    assert builder["image"] == DEFAULT_BUILDER_IMAGE
    built = mounts(builder)
    source_dir = next(t for t, (s, _) in built.items() if (REPO / s).resolve() == SOURCE_DIR.resolve())
    assert built[source_dir][1], "sources mounted read-only"
    command = builder["command"]
    output = PurePosixPath(command[command.index("-o") + 1])
    assert command == compile_command("cc", str(output), source_dir, [f"{source_dir}/{s}" for s in SOURCES])
    volume = built[str(output.parent)][0]
    assert volume in load(OVERRIDE)["volumes"]
    module = PurePosixPath(COMPOSE_MODULE_PATH)
    assert module.name == output.name
    assert mounts(envoy)[str(module.parent)] == (volume, True)
    assert envoy["depends_on"]["module-build"] == {"condition": "service_completed_successfully"}
    # The base file is unchanged: Envoy there still reads the ext_proc configuration.
    base_envoy = load(BASE)["services"]["envoy"]
    target = next(t for t, (s, _) in mounts(base_envoy).items() if s.endswith("envoy/envoy.yaml"))
    assert mounts(envoy)[target] == ("./envoy/envoy-module.yaml", True)
    assert "module-build" not in load(BASE)["services"]


def test_the_envoy_image_loads_the_module() -> None:
    image = load(BASE)["services"]["envoy"]["image"]
    m = re.fullmatch(r"envoyproxy/envoy:v(\d+\.\d+)\.\d+", image)
    assert m and m.group(1) in SUPPORTED, f"{image}: the module supports Envoy {', '.join(SUPPORTED)}"


def test_envoy_module_yaml_is_fresh(tmp_path: Any) -> None:
    out = tmp_path / "envoy-module.yaml"
    argv = ["envoy-config", "--for", "compose", "--inline", "module", "--config", DEFAULT_CONFIG, "-o", str(out)]
    assert render_cli(argv, {}) == 0
    assert ENVOY_MODULE_YAML.read_bytes() == out.read_bytes(), "envoy/envoy-module.yaml is stale: run `make envoy-config` and commit it"
    assert COMPOSE_MODULE_PATH in out.read_text()
    recipe = re.search(r"^envoy-config:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(encoding="utf-8"), re.M)
    assert recipe and f"--inline module --config {DEFAULT_CONFIG} --output envoy/envoy-module.yaml" in recipe.group(1)
