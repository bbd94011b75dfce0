"""The sampler's own Kubernetes objects, and the YAML plumbing the converters
share (pure: documents in, text out).

``sampler_objects`` is what ``convert envoy-gateway`` and ``convert istio``
both deploy next to the rewritten routes: a ConfigMap holding the sampler's
HTTPRoute configuration, a Deployment, a Service, a PodDisruptionBudget and,
on request, a HorizontalPodAutoscaler. ``SamplerDeployment`` is what both
converters are told about that sampler.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config.errors import ConfigError
from ..config.manifest_yaml import ManifestLoader, yaml_problem
from ..config.settings import Settings
from ..envoy.render import LiteralDumper
from . import ConvertError

DEFAULT_IMAGE = "mirror-sampler:latest"
DEFAULT_SERVICE = "mirror-sampler"
GRPC_PORT = 50051
METRICS_PORT = 9464
CONFIG_DIR = "/etc/mirror-sampler"
CONFIG_KEY = "routes.yaml"
MAX_CONFIGMAP_BYTES = 1_000_000  # Kubernetes' limit is 1 MiB, object metadata included

# Readiness is probed every READINESS_PERIOD s and NOT_SERVING is acted on
# after READINESS_FAILURES probes: the drain delay must outlast both, so that
# every Envoy has stopped sending new streams before the sampler refuses them.
READINESS_PERIOD = 5
READINESS_FAILURES = 2
DRAIN_DELAY = 15
SHUTDOWN_GRACE = 10
# Kubernetes kills the pod at the end of this: leave room after drain + grace.
TERMINATION_GRACE = DRAIN_DELAY + SHUTDOWN_GRACE + 10

Document = dict[str, Any]
_SERVICE_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# Settings.load wants route or simple mode; any file name picks route mode, and
# only the slot settings are read from the result.
_ROUTE_MODE = {"MIRROR_CONFIG": CONFIG_KEY}
# The sampler's settings for which its container needs an environment variable
# when they differ from the default: the rewritten routes name these headers.
_SLOT_VARIABLES = (("slots", "MIRROR_SLOTS"), ("slot_prefix", "MIRROR_SLOT_PREFIX"), ("marker_header", "MIRROR_MARKER_HEADER"))


@dataclass(frozen=True)
class SamplerDeployment:
    """What every Kubernetes converter is told about the sampler it deploys:
    where and how it runs, and the slot settings it and the rewritten routes
    must agree on."""

    namespace: str | None = None  # None: the converted routes' namespace
    image: str = DEFAULT_IMAGE
    hpa: bool = False
    sampler_service: str = DEFAULT_SERVICE  # the Service's name, also naming the other sampler objects
    slots: int = 2
    slot_prefix: str = "x-mirror-cluster-"
    marker_header: str = "x-mirror-rule"
    message_timeout_ms: int = 200

    def settings(self) -> Settings:
        """The slot settings as the sampler will read them: validated and
        normalised by its own loader, so the routes name the headers it sets."""
        try:
            return Settings.load(
                {
                    **_ROUTE_MODE,
                    "MIRROR_SLOTS": str(self.slots),
                    "MIRROR_SLOT_PREFIX": self.slot_prefix,
                    "MIRROR_MARKER_HEADER": self.marker_header,
                }
            )
        except ConfigError as e:
            raise ConvertError(e.problems) from None

    def slot_environment(self) -> dict[str, str]:
        """The slot settings the sampler's container must be given: those that
        differ from the sampler's defaults."""
        settings, defaults = self.settings(), Settings.load(_ROUTE_MODE)
        return {var: str(getattr(settings, name)) for name, var in _SLOT_VARIABLES if getattr(settings, name) != getattr(defaults, name)}


# Every converter's default; frozen, so one shared instance is safe as a default argument.
DEFAULT_DEPLOYMENT = SamplerDeployment()


def load_documents(text: str, source: str) -> list[Document]:
    """The mapping documents of a multi-document YAML text (empty ones dropped)."""
    try:
        docs = list(yaml.load_all(text, Loader=ManifestLoader))
    except yaml.YAMLError as e:
        raise ConvertError([yaml_problem(source, e)]) from None
    out: list[Document] = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise ConvertError([f"{source} (document {i + 1}): must be a mapping with apiVersion and kind, got {type(doc).__name__}"])
        out.append(doc)
    return out


def read_sources(paths: Sequence[Path]) -> list[tuple[str, str]]:
    """(name, text) of each input file; the only I/O of a conversion."""
    sources = []
    problems = []
    for path in paths:
        try:
            sources.append((str(path), Path(path).read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as e:
            problems.append(f"{path}: cannot read: {e}")
    if problems:
        raise ConvertError(problems)
    if not sources:
        raise ConvertError(["no input files"])
    return sources


def dump_documents(docs: Iterable[Document], header: str) -> str:
    """Multi-document YAML; ``header`` is a comment block (each line starting with #)."""
    body = "---\n".join(yaml.dump(d, Dumper=LiteralDumper, sort_keys=False, width=120) for d in docs)
    return header + body


def generated_header(command: str, comment: str = "") -> str:
    text = f"# Generated by `mirror-sampler {command}`: regenerate from the original manifests rather than editing this file.\n"
    return text + "".join(f"# {line}".rstrip() + "\n" for line in comment.splitlines()) if comment else text


def metadata(name: str, namespace: str | None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    if labels:
        meta["labels"] = dict(labels)
    return meta


def sampler_labels(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "mirror-sampler", "app.kubernetes.io/instance": name}


def sampler_objects(config_text: str, options: SamplerDeployment, *, replicas: int = 2, max_replicas: int = 10) -> list[Document]:
    """ConfigMap, Deployment, Service, PodDisruptionBudget and (``hpa``) a
    HorizontalPodAutoscaler for a sampler reading ``config_text``, in
    ``options.namespace`` (None: no namespace in their metadata). The
    container gets the slot settings of ``options``, as the rewritten routes do.
    """
    namespace, image, hpa, name = options.namespace, options.image, options.hpa, options.sampler_service
    problems = []
    if not _SERVICE_NAME.match(name):
        problems.append(
            f"--sampler-service: a Service name is a DNS-1035 label (a-z, 0-9, '-', starting with a letter, at most 63), got {name!r}"
        )
    if namespace is not None and not _LABEL.match(namespace):
        problems.append(f"--namespace: must be a DNS-1123 label, got {namespace!r}")
    if len(config_text.encode()) > MAX_CONFIGMAP_BYTES:
        problems.append(f"the sampler's configuration is {len(config_text.encode())} bytes, over a ConfigMap's 1 MiB")
    if not image.strip():
        problems.append("--image: must not be empty")
    if problems:
        raise ConvertError(problems)
    if replicas < 2:
        # One replica means every rollout or node drain is a window of no mirroring.
        raise ConvertError([f"replicas: at least 2 sampler replicas, got {replicas}"])
    labels = sampler_labels(name)
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(f"{name}-routes", namespace, labels),
        "data": {CONFIG_KEY: config_text},
    }
    environment = {
        # Mounted as a directory (not subPath): Kubernetes swaps the whole
        # directory on a ConfigMap change, and the sampler reloads the file.
        "MIRROR_CONFIG": f"{CONFIG_DIR}/{CONFIG_KEY}",
        "MIRROR_LISTEN": f"0.0.0.0:{GRPC_PORT}",
        "MIRROR_METRICS_LISTEN": f"0.0.0.0:{METRICS_PORT}",
        "MIRROR_LOG_FORMAT": "json",
        "MIRROR_DRAIN_DELAY": str(DRAIN_DELAY),
        "MIRROR_SHUTDOWN_GRACE": str(SHUTDOWN_GRACE),
        **options.slot_environment(),
    }
    container = {
        "name": "sampler",
        "image": image,
        "args": ["serve"],
        "ports": [
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "env": [{"name": k, "value": v} for k, v in environment.items()],
        # grpc.health.v1 on the ext_proc port: NOT_SERVING during the drain delay
        # takes the pod out of the Service before it stops taking streams.
        "readinessProbe": {
            "grpc": {"port": GRPC_PORT},
            "periodSeconds": READINESS_PERIOD,
            "failureThreshold": READINESS_FAILURES,
            "timeoutSeconds": 2,
        },
        # Slower than readiness and longer than drain + grace, so a draining
        # sampler is never restarted for reporting NOT_SERVING.
        "livenessProbe": {
            "grpc": {"port": GRPC_PORT},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "failureThreshold": (DRAIN_DELAY + SHUTDOWN_GRACE) // 10 + 2,
            "timeoutSeconds": 2,
        },
        "resources": {"requests": {"cpu": "100m", "memory": "96Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": {
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "routes", "mountPath": CONFIG_DIR, "readOnly": True}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    # With an HPA the Deployment leaves replicas out: re-applying it would
    # otherwise reset the count the autoscaler chose.
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(name, namespace, labels),
        "spec": {
            **({} if hpa else {"replicas": replicas}),
            "selector": {"matchLabels": dict(labels)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {
                    "terminationGracePeriodSeconds": TERMINATION_GRACE,
                    # The image's user (Dockerfile: uid 10001).
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 10001,
                        "runAsGroup": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "automountServiceAccountToken": False,
                    "topologySpreadConstraints": [
                        {
                            "maxSkew": 1,
                            "topologyKey": "kubernetes.io/hostname",
                            "whenUnsatisfiable": "ScheduleAnyway",
                            "labelSelector": {"matchLabels": dict(labels)},
                        }
                    ],
                    "containers": [container],
                    "volumes": [
                        {"name": "routes", "configMap": {"name": f"{name}-routes"}},
                        # Writable scratch space with a read-only root file system.
                        {"name": "tmp", "emptyDir": {"sizeLimit": "16Mi"}},
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(name, namespace, labels),
        "spec": {
            "type": "ClusterIP",
            "selector": dict(labels),
            "ports": [
                # appProtocol grpc: Envoy Gateway and Istio both talk HTTP/2 to it.
                {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
                {"name": "http-metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP", "appProtocol": "http"},
            ],
        },
    }
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(name, namespace, labels),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": dict(labels)}},
    }
    objects: list[Document] = [config_map, deployment, service, pdb]
    if hpa:
        objects.append(
            {
                "apiVersion": "autoscaling/v2",
                "kind": "HorizontalPodAutoscaler",
                "metadata": metadata(name, namespace, labels),
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                    "minReplicas": replicas,
                    "maxReplicas": max(max_replicas, replicas),
                    "metrics": [
                        {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}
                    ],
                    # Scale down slowly: each removed pod drains for DRAIN_DELAY seconds.
                    "behavior": {
                        "scaleDown": {"stabilizationWindowSeconds": 300, "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]}
                    },
                },
            }
        )
    return copy.deepcopy(objects)


def sampler_manifest(config_text: str, options: SamplerDeployment, command: str) -> str:
    """sampler.yaml: ``sampler_objects`` under a header saying what they are."""
    return dump_documents(
        sampler_objects(config_text, options),
        generated_header(
            command,
            f"The sampler: ConfigMap (its HTTPRoute configuration), Deployment, Service,\n"
            f"PodDisruptionBudget{', HorizontalPodAutoscaler' if options.hpa else ''}. Image: {options.image}.",
        ),
    )
