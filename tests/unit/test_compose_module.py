"""docker-compose.module.yml (the module engine on top of docker-compose.yml) agrees with
the project, statically: the builder is the Dockerfile's module stage, where the
project's own build code compiles the module from the package's sources only, and it
installs that file into the volume Envoy mounts where envoy/envoy-module.yaml loads the
module from; that file is fresh; the Envoy image is a version the module supports.
(Run with Docker: tests/e2e/test_docker_compose.py.)"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

import yaml

from extproc.envoy.module import COMPOSE_MODULE_PATH
from extproc.module.build import SOURCE_DIR
from extproc.module.support import SUPPORTED
from tests.support.docker import dockerfile_stages
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


def test_builder_installs_the_dockerfile_built_module_into_the_volume_envoy_loads_from() -> None:
    services = load(OVERRIDE)["services"]
    builder, envoy = services["module-build"], services["envoy"]
    assert (REPO / builder["build"]["context"]).resolve() == REPO and "dockerfile" not in builder["build"]
    stage = dockerfile_stages(REPO / "Dockerfile")[builder["build"]["target"]]
    # Debian's compiler, then the package's __init__ and module/ only: the build code
    # needs nothing else (tests/service/test_module_build.py runs it that way).
    (apt,) = [args for word, args in stage if word == "RUN" and "apt-get install" in args]
    assert {"gcc", "libc6-dev"} <= set(apt.split())
    copies = [args.split() for word, args in stage if word == "COPY"]
    assert copies == [["extproc/__init__.py", "extproc/"], [str(SOURCE_DIR.relative_to(REPO)), "extproc/module/"]]
    (run,) = [args.split() for word, args in stage if word == "RUN" and "extproc.module.build" in args]
    assert run[:3] == ["python", "-m", "extproc.module.build"]
    built = run[3]
    command = builder["command"]
    assert command[:2] == ["install", built], "installs (a new file, mode 0755) what the stage built"
    output = PurePosixPath(command[2])
    volume = mounts(builder)[str(output.parent)][0]
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


def test_the_module_file_pulls_no_image() -> None:
    """Only the Dockerfile's base image and the base file's images are pulled: the ones
    tests/support/docker.py can stand in for."""
    for name, service in load(OVERRIDE)["services"].items():
        assert "build" in service or "image" not in service, f"{name}: pulls {service.get('image')}"


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
