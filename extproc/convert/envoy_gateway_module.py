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

How the ``.so`` reaches Envoy Gateway's Envoy: ``module_delivery`` (a ConfigMap of the C
sources, an init container compiling them in the pod); the EnvoyProxy carries those pod
changes and allowlists the built file as a ``Local`` source.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..core.policy import Policy, Rule
from ..envoy.module import MODULE_NAME, filter_settings, rule_settings
from .kubernetes import Document, metadata
from .module_delivery import MODULE_PATH, build_container, module_mount, module_volumes

EG_API = "gateway.envoyproxy.io/v1alpha1"
GATEWAY_GROUP = "gateway.networking.k8s.io"
# EnvoyProxy dynamicModules[].name = EnvoyExtensionPolicy dynamicModule[].name.
MODULE_ENTRY = "mirror-sampler"


def rule_section_name(rule_index: int) -> str:
    """The name given to a mirror rule that has none (sectionName needs one); the converter
    adds ``-2``, ``-3``... where the route already has a rule of that name."""
    return f"mirror-sampler-{rule_index}"


def envoy_proxy(name: str, namespace: str | None, sources_config_map: str, builder_image: str) -> Document:
    """The allowlist entry, and the pod changes that put the module at MODULE_PATH."""
    deployment = {
        "initContainers": [build_container(builder_image)],
        "pod": {"volumes": module_volumes(sources_config_map)},
        "container": {"volumeMounts": [module_mount()]},
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
