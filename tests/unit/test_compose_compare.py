"""docker-compose.compare.yml (the compare observer on top of docker-compose.yml) agrees
with the project, statically: the observer's service is the address envoy/envoy-compare.yaml
streams to, its command line is one the real CLI accepts (listening where Envoy reaches
it, its settings and routes the files the capture points were rendered from, its store
in a volume its user can write), and the report command the file's comment gives reads
that store. (Run with Docker: tests/e2e/test_docker_compose.py.)"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import PurePosixPath
from typing import Any

import yaml

from extproc import cli
from extproc.compare.cli import OBSERVER_PORT, cmd_capture, cmd_report, load_config
from extproc.compare.envoy import CAPTURE_SERVICE_CLUSTER
from extproc.compare.records import TAG_FIELD
from tests.support.docker import dockerfile_stages
from tests.support.paths import REPO
from tests.unit.test_compose import _host_file, _published
from tests.unit.test_compose_module import load, mounts
from tests.unit.test_envoyconf import COMPARE_ENVOY, COMPARE_ENVOY_ARGV, clusters_of, endpoint_of, snake

BASE = REPO / "docker-compose.yml"
OVERLAY = REPO / "docker-compose.compare.yml"
SERVICE = "mirror-sampler-compare"


def observer() -> dict[str, Any]:
    service: dict[str, Any] = load(OVERLAY)["services"][SERVICE]
    return service


def capture_args() -> Any:
    """The observer's command line as the image's entrypoint (`mirror-sampler`) gets it."""
    return cli.build_parser().parse_args(observer()["command"])


def envoy_compare() -> dict[str, Any]:
    loaded: dict[str, Any] = snake(yaml.safe_load(COMPARE_ENVOY.read_text(encoding="utf-8")))
    return loaded


def makefile_flag(flag: str) -> str:
    """A flag of the rendering of envoy/envoy-compare.yaml (`make envoy-config`)."""
    return COMPARE_ENVOY_ARGV[COMPARE_ENVOY_ARGV.index(flag) + 1]


def test_the_service_is_the_observer_cluster_envoy_streams_to() -> None:
    assert SERVICE == CAPTURE_SERVICE_CLUSTER
    cluster = clusters_of(envoy_compare())[CAPTURE_SERVICE_CLUSTER]
    # STRICT_DNS: Envoy resolves the service's name on the compose network.
    assert cluster["type"] == "STRICT_DNS"
    host, port = endpoint_of(cluster)
    assert (host, port) == (SERVICE, OBSERVER_PORT)
    assert makefile_flag("--observer") == f"{SERVICE}:{OBSERVER_PORT}"
    args = capture_args()
    assert args.func is cmd_capture
    listen_host, _, listen_port = args.listen.rpartition(":")
    assert listen_host in ("0.0.0.0", "::", "[::]"), f"--listen {args.listen} is unreachable from the envoy container"
    assert int(listen_port) == port
    assert str(port) in observer()["expose"]


def test_envoy_loads_the_capture_configuration_after_the_observer_is_up() -> None:
    envoy = load(OVERLAY)["services"]["envoy"]
    base_envoy = load(BASE)["services"]["envoy"]
    target = next(t for t, (s, _) in mounts(base_envoy).items() if s.endswith("envoy/envoy.yaml"))
    assert mounts(envoy)[target] == (f"./{COMPARE_ENVOY.relative_to(REPO)}", True)
    assert envoy["depends_on"][SERVICE] == {"condition": "service_healthy"}


def test_the_observer_reads_the_files_the_capture_points_come_from() -> None:
    """Its settings and routes are the files `make envoy-config` rendered the capture
    points from, mounted read-only; they load, and compare what Envoy captures."""
    args = capture_args()
    service = observer()
    files = {}
    for flag, value in (("--config", args.config), ("--routes", args.routes)):
        host = _host_file(service, value)
        assert host is not None and host.resolve() == (REPO / makefile_flag(flag)).resolve(), f"{flag} {value} is {host} on the host"
        files[flag] = str(host)
        assert mounts(service)[str(PurePosixPath(value).parent)][1], f"{flag} {value} is mounted read-write"
    config = load_config(files["--config"], files["--routes"])
    captured: dict[str, list[str]] = {}
    for text in re.findall(rf"\b{TAG_FIELD}: '(.*)'", COMPARE_ENVOY.read_text(encoding="utf-8")):
        tag = json.loads(text)
        if tag["side"] == "primary":
            captured[tag["rule"]] = tag["targets"]
    assert captured and captured == {rule: list(targets) for rule, targets in config.compared().items()}


def test_the_store_is_in_a_volume_the_images_user_owns() -> None:
    """A named volume starts as the image's directory, owner included: the Dockerfile
    makes it the user's the image runs as."""
    db = PurePosixPath(capture_args().db)
    source, read_only = mounts(observer())[str(db.parent)]
    assert source in load(OVERLAY)["volumes"] and not read_only
    final = list(dockerfile_stages(REPO / "Dockerfile").values())[-1]
    (user,) = [args for word, args in final if word == "USER"]
    uid, _, gid = user.partition(":")
    made = [args for word, args in final if word == "RUN" and str(db.parent) in args.split()]
    assert made and f"install -d -o {uid} -g {gid} {db.parent}" in made[0]


def test_it_runs_the_sampler_image_with_its_own_health_check() -> None:
    base_sampler = load(BASE)["services"]["mirror-sampler"]
    service = observer()
    # Built by the base file's sampler service (before it: compose builds in dependency order).
    assert "build" not in service and service["image"] == base_sampler["image"] and "build" in base_sampler
    assert "mirror-sampler" in service["depends_on"]
    final = list(dockerfile_stages(REPO / "Dockerfile").values())[-1]
    assert dict(final)["ENTRYPOINT"] == '["mirror-sampler"]'
    # The image's own check asks the sampler's gRPC health service, on the sampler's port.
    check = " ".join(service["healthcheck"]["test"])
    assert f"('127.0.0.1', {OBSERVER_PORT})" in check and "grpc_health" not in check


def test_the_metrics_port_is_published_on_loopback_and_movable() -> None:
    metrics_port = int(capture_args().metrics_listen.rpartition(":")[2])
    assert _published(observer()) == {metrics_port: metrics_port}
    (published,) = observer()["ports"]
    assert published == f"127.0.0.1:${{COMPARE_METRICS_PORT:-{metrics_port}}}:{metrics_port}"
    # A host port of its own: the base file publishes 9464, 10000 and 9901.
    assert metrics_port not in {host for service in load(BASE)["services"].values() for host in _published(service).values()}


def test_the_documented_report_reads_the_observers_store() -> None:
    (line,) = [line for line in OVERLAY.read_text(encoding="utf-8").splitlines() if "mirror-sampler compare report" in line]
    argv = shlex.split(line.partition("mirror-sampler compare report")[2])
    report = cli.build_parser().parse_args(["compare", "report", *argv])
    capture = capture_args()
    assert report.func is cmd_report
    assert (report.db, report.config, report.routes) == ([capture.db], capture.config, capture.routes)


def test_no_pulled_image() -> None:
    """yaml.safe_load read it (so no compose v2 merge tag: Debian's docker-compose 1.29 reads
    it too), and it pulls nothing tests/support/docker.py would have to stand in for."""
    for name, service in load(OVERLAY)["services"].items():
        assert "image" not in service or service["image"] == load(BASE)["services"]["mirror-sampler"]["image"], name
