"""The sampler's Kubernetes objects: valid against Kubernetes' own schemas
(kubernetes-validate ships them: no cluster needed), and the operational
properties the sampler depends on (probes, drain timing, mounted config)."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

from extproc.config.build import build_policy
from extproc.config.settings import Settings
from extproc.convert import ConvertError
from extproc.convert.kubernetes import CONFIG_DIR, DEFAULT_IMAGE, GRPC_PORT, METRICS_PORT, SamplerDeployment, sampler_objects
from extproc.core.slots import SlotHeaders
from tests.support.paths import CONFORMANCE

# A recent Kubernetes the package ships schemas for, and the oldest we claim
# (gRPC probes are GA from 1.27).
K8S_VERSIONS = ("1.27", "1.34")


def validate(obj: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        # strict: unknown fields are errors, as `kubectl apply --validate=strict` makes them.
        kubernetes_validate.validate(obj, version, strict=True)


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objects}


CONFIG = CONFORMANCE.read_text()


@pytest.mark.parametrize("hpa", [False, True])
def test_every_object_passes_the_kubernetes_schema(hpa: bool) -> None:
    objects = sampler_objects(CONFIG, SamplerDeployment(namespace="mirroring", hpa=hpa))
    assert [o["kind"] for o in objects] == [
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        *(["HorizontalPodAutoscaler"] if hpa else []),
    ]
    for obj in objects:
        validate(obj)
        assert obj["metadata"]["namespace"] == "mirroring"


def test_schema_validation_is_strict() -> None:
    """The check above would catch a misspelt field."""
    deployment = by_kind(sampler_objects(CONFIG, SamplerDeployment()))["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = by_kind(objects)["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def test_deployment_probes_security_and_drain_timing() -> None:
    objects = sampler_objects(CONFIG, SamplerDeployment())
    deployment = by_kind(objects)["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    c = container(objects)
    assert deployment["spec"]["replicas"] >= 2
    assert c["image"] == DEFAULT_IMAGE == "mirror-sampler:latest"
    assert c["readinessProbe"]["grpc"] == {"port": GRPC_PORT}
    assert c["livenessProbe"]["grpc"] == {"port": GRPC_PORT}
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    security = c["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True

    env = {e["name"]: e["value"] for e in c["env"]}
    settings = Settings.load(env)  # the container's environment is a valid sampler configuration
    readiness = c["readinessProbe"]
    # Draining: NOT_SERVING must be seen (and acted on) before new streams are refused...
    assert settings.drain_delay > readiness["periodSeconds"] * readiness["failureThreshold"]
    # ...and Kubernetes must not kill the pod before drain and grace are over.
    assert pod["terminationGracePeriodSeconds"] > settings.drain_delay + settings.shutdown_grace
    # Liveness must not restart a sampler that reports NOT_SERVING while draining.
    liveness = c["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > settings.drain_delay + settings.shutdown_grace


def test_configmap_is_mounted_as_a_directory_and_is_the_config() -> None:
    """A directory mount (not subPath): Kubernetes updates it in place and the
    sampler reloads; MIRROR_CONFIG names the file inside."""
    objects = sampler_objects(CONFIG, SamplerDeployment(namespace="ns"))
    kinds = by_kind(objects)
    c = container(objects)
    env = {e["name"]: e["value"] for e in c["env"]}
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == CONFIG_DIR)
    assert "subPath" not in mount and mount["readOnly"] is True
    volume = next(v for v in kinds["Deployment"]["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    config_map = kinds["ConfigMap"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    directory, _, key = env["MIRROR_CONFIG"].rpartition("/")
    assert directory == CONFIG_DIR
    assert config_map["data"][key] == CONFIG
    settings = Settings.load(env)
    assert [r.id for r in build_policy(settings, config_map["data"][key]).rules] == [
        "gateway-conformance-infra/request-percentage-mirror/0",
        "gateway-conformance-infra/request-percentage-mirror/1",
        "gateway-conformance-infra/request-percentage-mirror/2",
    ]


def test_service_ports_and_selector() -> None:
    objects = sampler_objects(CONFIG, SamplerDeployment(namespace="ns", sampler_service="sampler-a"))
    kinds = by_kind(objects)
    service = kinds["Service"]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == GRPC_PORT and ports["grpc"]["appProtocol"] == "grpc"
    assert ports["http-metrics"]["port"] == METRICS_PORT
    labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container_ports = {p["name"]: p["containerPort"] for p in container(objects)["ports"]}
    assert container_ports[ports["grpc"]["targetPort"]] == GRPC_PORT
    assert container_ports[ports["http-metrics"]["targetPort"]] == METRICS_PORT
    assert service["metadata"]["name"] == "sampler-a"


def test_hpa_targets_the_deployment_and_owns_the_replica_count() -> None:
    kinds = by_kind(sampler_objects(CONFIG, SamplerDeployment(hpa=True, image="registry.example/sampler:1.2")))
    hpa = kinds["HorizontalPodAutoscaler"]
    deployment = kinds["Deployment"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in deployment["spec"]  # re-applying would fight the autoscaler
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/sampler:1.2"


def test_slot_settings_other_than_the_defaults_reach_the_container() -> None:
    env = container(sampler_objects(CONFIG, SamplerDeployment(slot_headers=SlotHeaders(count=3))))["env"]
    assert {"name": "MIRROR_SLOTS", "value": "3"} in env
    assert not {e["name"] for e in env} & {"MIRROR_SLOT_PREFIX", "MIRROR_MARKER_HEADER"}
    env = container(sampler_objects(CONFIG, SamplerDeployment()))["env"]
    assert not {e["name"] for e in env} & {"MIRROR_SLOTS", "MIRROR_SLOT_PREFIX", "MIRROR_MARKER_HEADER"}


def test_one_replica_is_refused() -> None:
    with pytest.raises(ConvertError, match="at least 2"):
        sampler_objects(CONFIG, SamplerDeployment(), replicas=1)


def test_objects_round_trip_through_yaml() -> None:
    from extproc.convert.kubernetes import dump_documents

    objects = sampler_objects(CONFIG, SamplerDeployment(namespace="ns", hpa=True))
    text = dump_documents(objects, "# header\n")
    assert text.startswith("# header\n")
    assert list(yaml.safe_load_all(text)) == objects


@pytest.mark.parametrize(
    ("deployment", "flag"),
    [
        (SamplerDeployment(sampler_service="Mirror.Sampler"), "--sampler-service"),
        (SamplerDeployment(namespace="a/b"), "--namespace"),
        (SamplerDeployment(image=" "), "--image"),
    ],
)
def test_names_kubernetes_would_refuse_are_refused(deployment: SamplerDeployment, flag: str) -> None:
    with pytest.raises(ConvertError, match=flag):
        sampler_objects(CONFIG, deployment)
