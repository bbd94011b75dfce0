"""How the dynamic module's ``.so`` reaches an Envoy in Kubernetes, for every converter
that writes ``--inline module`` (Envoy Gateway's Envoy, Istio's proxies): compiled in the
proxy's own pod, so that it is built for that node's architecture and libc, from the
module's own C sources (pure: documents in, documents out).

A ConfigMap holds the sources (package data, a few tens of KB); an init container (a
compiler image on Debian 12; the module asks glibc for nothing newer than 2.17, so it loads
in distroless and Ubuntu-based proxy images alike) compiles them into an emptyDir with the
same command line as ``module/build.py``; the proxy container mounts that volume read-only,
and the proxy's configuration loads the file from MODULE_PATH. Nothing to serve, no sha256
to keep in step with builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..module.build import DEFAULT_BUILDER_IMAGE, HEADERS, SOURCE_DIR, SOURCES, compile_command
from .kubernetes import MAX_CONFIGMAP_BYTES, Document, metadata

MODULE_DIR = "/etc/envoy/mirror-sampler"
MODULE_FILE = "libmirror_sampler.so"
MODULE_PATH = f"{MODULE_DIR}/{MODULE_FILE}"
SOURCE_MOUNT = "/src/mirror-sampler"
BUILD_DIR = "/build"
SOURCES_VOLUME = "mirror-sampler-module-src"
MODULE_VOLUME = "mirror-sampler-module"
BUILD_CONTAINER = "build-mirror-sampler-module"


@dataclass(frozen=True)
class ModuleEngine:
    """How `--inline module` builds the module for the proxies' pods."""

    builder_image: str = DEFAULT_BUILDER_IMAGE


def source_config_map(name: str, namespace: str | None) -> Document:
    data = {file: (SOURCE_DIR / file).read_text(encoding="utf-8") for file in (*SOURCES, *HEADERS)}
    size = sum(len(v) for v in data.values())
    assert size < MAX_CONFIGMAP_BYTES, f"the module's sources ({size} bytes) no longer fit a ConfigMap"
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(name, namespace), "data": data}


def build_container(builder_image: str) -> dict[str, Any]:
    """The init container that compiles the module for the node the proxy runs on."""
    command = compile_command("cc", f"{BUILD_DIR}/{MODULE_FILE}", SOURCE_MOUNT, [f"{SOURCE_MOUNT}/{s}" for s in SOURCES])
    return {
        "name": BUILD_CONTAINER,
        "image": builder_image,
        "command": command,
        "volumeMounts": [
            {"name": SOURCES_VOLUME, "mountPath": SOURCE_MOUNT, "readOnly": True},
            {"name": MODULE_VOLUME, "mountPath": BUILD_DIR},
        ],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
    }


def module_volumes(sources_config_map: str) -> list[dict[str, Any]]:
    """The pod's volumes: the sources, and the emptyDir the module is built into."""
    return [
        {"name": SOURCES_VOLUME, "configMap": {"name": sources_config_map}},
        {"name": MODULE_VOLUME, "emptyDir": {"sizeLimit": "16Mi"}},
    ]


def module_mount() -> dict[str, Any]:
    """The proxy container's mount: the built module at MODULE_PATH, read-only."""
    return {"name": MODULE_VOLUME, "mountPath": MODULE_DIR, "readOnly": True}
