"""`convert envoy-gateway --inline module`: the decision inside Envoy Gateway's Envoy,
as the C dynamic module, instead of the ext_proc sampler (pure: documents in, documents out).

Envoy Gateway (v1.8+) offers dynamic modules through two objects:
``EnvoyProxy.spec.dynamicModules[]``, the allowlist (a name and where the ``.so`` is),
and ``EnvoyExtensionPolicy.spec.dynamicModule[]`` (name, filterName, config), which adds
the module as an HTTP filter. Its translator (internal/xds/translator/dynamicmodules.go)
makes each policy entry a filter of its own, disabled on the listener and enabled on
every route the policy targets with an empty per-route config, and passes ``config`` as
the filter config. There is no per-route config: each policy's filter config carries the
rule it decides (the module's optional ``rule``), so there is one policy per mirror rule,
targeting exactly that rule's routes (its variant rules and its plain rule, by
``sectionName``). Every such rule gets a name, since a sectionName names a rule.

How the ``.so`` reaches Envoy Gateway's Envoy: compiled where it runs, so that it is built
for that node's architecture and libc, from the module's own C sources. A ConfigMap holds
the sources (package data, a few tens of KB); the EnvoyProxy adds an init container (a
compiler image on Debian 12; the module asks glibc for nothing newer than 2.17, so it loads
in Envoy Gateway's distroless Envoy image) that compiles them into an emptyDir with the same
command line as ``module/build.py``, mounted read-only into the Envoy container, and
allowlists that file as a ``Local`` source. Nothing to serve, no sha256 to keep in step,
and the module is built for the node's architecture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..core.policy import Policy, Rule
from ..envoy.module import MODULE_NAME, filter_settings, rule_settings
from ..module.build import DEFAULT_BUILDER_IMAGE, HEADERS, SOURCE_DIR, SOURCES, compile_command
from .kubernetes import MAX_CONFIGMAP_BYTES, Document, metadata

__all__ = ["DEFAULT_BUILDER_IMAGE"]  # the converter's default, defined with the build

EG_API = "gateway.envoyproxy.io/v1alpha1"
GATEWAY_GROUP = "gateway.networking.k8s.io"
# EnvoyProxy dynamicModules[].name = EnvoyExtensionPolicy dynamicModule[].name.
MODULE_ENTRY = "mirror-sampler"
MODULE_DIR = "/etc/envoy/mirror-sampler"
MODULE_FILE = "libmirror_sampler.so"
MODULE_PATH = f"{MODULE_DIR}/{MODULE_FILE}"
SOURCE_MOUNT = "/src/mirror-sampler"
BUILD_DIR = "/build"
SOURCES_VOLUME = "mirror-sampler-module-src"
MODULE_VOLUME = "mirror-sampler-module"


def rule_section_name(rule_index: int) -> str:
    """The name given to a mirror rule that has none (sectionName needs one)."""
    return f"mirror-sampler-{rule_index}"


def source_config_map(name: str, namespace: str | None) -> Document:
    data = {file: (SOURCE_DIR / file).read_text(encoding="utf-8") for file in (*SOURCES, *HEADERS)}
    size = sum(len(v) for v in data.values())
    assert size < MAX_CONFIGMAP_BYTES, f"the module's sources ({size} bytes) no longer fit a ConfigMap"
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(name, namespace), "data": data}


def build_container(builder_image: str) -> dict[str, Any]:
    """The init container that compiles the module for the node Envoy runs on."""
    command = compile_command("cc", f"{BUILD_DIR}/{MODULE_FILE}", SOURCE_MOUNT, [f"{SOURCE_MOUNT}/{s}" for s in SOURCES])
    return {
        "name": "build-mirror-sampler-module",
        "image": builder_image,
        "command": command,
        "volumeMounts": [
            {"name": SOURCES_VOLUME, "mountPath": SOURCE_MOUNT, "readOnly": True},
            {"name": MODULE_VOLUME, "mountPath": BUILD_DIR},
        ],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
    }


def envoy_proxy(name: str, namespace: str | None, sources_config_map: str, builder_image: str) -> Document:
    """The allowlist entry, and the pod changes that put the module at MODULE_PATH."""
    deployment = {
        "initContainers": [build_container(builder_image)],
        "pod": {
            "volumes": [
                {"name": SOURCES_VOLUME, "configMap": {"name": sources_config_map}},
                {"name": MODULE_VOLUME, "emptyDir": {"sizeLimit": "16Mi"}},
            ]
        },
        "container": {"volumeMounts": [{"name": MODULE_VOLUME, "mountPath": MODULE_DIR, "readOnly": True}]},
    }
    return {
        "apiVersion": EG_API,
        "kind": "EnvoyProxy",
        "metadata": metadata(name, namespace),
        "spec": {
            "provider": {"type": "Kubernetes", "kubernetes": {"envoyDeployment": deployment}},
            "dynamicModules": [{"name": MODULE_ENTRY, "source": {"type": "Local", "local": {"path": MODULE_PATH}}}],
        },
    }


def module_config(policy: Policy, rule: Rule) -> dict[str, Any]:
    """The filter config of one rule's filter: the module's filter settings with the rule."""
    return {**filter_settings(policy), "rule": rule_settings(policy, rule)}


def rule_policy(name: str, namespace: str | None, route_name: str, sections: Sequence[str], policy: Policy, rule: Rule) -> Document:
    """One EnvoyExtensionPolicy for one mirror rule: the module on its routes only."""
    return {
        "apiVersion": EG_API,
        "kind": "EnvoyExtensionPolicy",
        "metadata": metadata(name, namespace),
        "spec": {
            "targetRefs": [{"group": GATEWAY_GROUP, "kind": "HTTPRoute", "name": route_name, "sectionName": s} for s in sections],
            "dynamicModule": [{"name": MODULE_ENTRY, "filterName": MODULE_NAME, "config": module_config(policy, rule)}],
        },
    }


def parameters_ref(envoy_proxy_name: str) -> dict[str, str]:
    """What a Gateway's spec.infrastructure.parametersRef must say to use the EnvoyProxy."""
    return {"group": "gateway.envoyproxy.io", "kind": "EnvoyProxy", "name": envoy_proxy_name}


ENVOY_PROXY_COMMENT = """\
The dynamic module for Envoy Gateway's Envoy (Envoy Gateway v1.8+; its Envoy must be
1.39 or 1.40: Envoy Gateway 1.9 ships 1.39). The ConfigMap holds the module's C
sources; the EnvoyProxy's init container compiles them on the node (the same command
as `mirror-sampler envoy-config --inline module` runs locally) into a volume the Envoy
container mounts read-only, and allowlists that file (spec.dynamicModules).
Make each Gateway use it: spec.infrastructure.parametersRef:
  {group: gateway.envoyproxy.io, kind: EnvoyProxy, name: <this EnvoyProxy>}
(or the GatewayClass's parametersRef). If the Gateway already has an EnvoyProxy,
merge dynamicModules, the init container, the volumes and the volume mount into it."""

POLICY_COMMENT = """\
The module as an HTTP filter, one policy per mirror rule: Envoy Gateway gives a
dynamic module no per-route config, so each policy's config carries its rule, and
targets that rule's variant and plain rules by sectionName. The decision, the
stripping of client-sent slot and marker headers and the decision counters
(Envoy stats, dynamicmodulescustom.mirror_sampler_decisions) run in Envoy; no
sampler is deployed. To change a percentage, edit the original HTTPRoutes and
convert again."""
