"""Envoy Gateway's own translator (egctl x translate) on what `convert
envoy-gateway` writes, and its xDS turned into a static Envoy configuration
on loopback.

egctl reads Gateway API objects from one multi-document file, ignores
EndpointSlices (a Service becomes its clusterIP and port) and reports
translation errors only in the objects' status. Its xDS is a config dump:
EDS clusters, RDS routes over ADS. A bare Envoy gets the same listeners,
clusters and routes inline, each Service endpoint rewritten to the loopback
port of the process that plays it.
"""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.owners.tools import egctl

Doc = dict[str, Any]
CONTROLLER = "gateway.envoyproxy.io/gatewayclass-controller"
HCM = "envoy.filters.network.http_connection_manager"


@dataclass(frozen=True, slots=True)
class Service:
    """A Service the routes and policies name, and the loopback port that plays it."""

    namespace: str
    name: str
    port: int  # the Service port the manifests name
    local_port: int  # where the process listens on 127.0.0.1

    def cluster_ip(self, index: int) -> str:
        # Never reached: every endpoint is rewritten to 127.0.0.1:local_port.
        return f"127.1.{index // 250}.{index % 250 + 1}"


def gateway_objects(gateways: Iterable[tuple[str, str, Iterable[str]]]) -> list[Doc]:
    """A GatewayClass and, per (namespace, name, listener names), an HTTP Gateway."""
    docs: list[Doc] = [
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GatewayClass",
            "metadata": {"name": "eg"},
            "spec": {"controllerName": CONTROLLER},
        }
    ]
    for namespace, name, listeners in gateways:
        spec = {"gatewayClassName": "eg", "listeners": [{"name": n, "protocol": "HTTP", "port": 80} for n in listeners]}
        docs.append(
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": {"name": name, "namespace": namespace},
                "spec": spec,
            }
        )
    return docs


def service_objects(services: Iterable[Service]) -> list[Doc]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": s.name, "namespace": s.namespace},
            "spec": {"clusterIP": s.cluster_ip(i), "ports": [{"name": "port", "port": s.port, "protocol": "TCP"}]},
        }
        for i, s in enumerate(services)
    ]


def translate(documents: list[Doc], workdir: Path) -> Doc:
    """egctl x translate, Gateway API to Gateway API (with status) and xDS."""
    source = workdir / "egctl-input.yaml"
    source.write_text(yaml.safe_dump_all(documents, sort_keys=False), encoding="utf-8")
    run = subprocess.run(
        [str(egctl()), "x", "translate", "-f", str(source), "--from", "gateway-api", "--to", "gateway-api,xds", "-t", "all", "-o", "yaml"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, f"egctl x translate failed: {run.stderr[-3000:]}"
    (workdir / "egctl-output.yaml").write_text(run.stdout, encoding="utf-8")
    result: Doc = yaml.safe_load(run.stdout)
    return result


def status_problems(result: Doc) -> list[str]:
    """Every condition egctl set to False (or a policy not Accepted), by object."""
    found = []
    for key, objects in result.items():
        if key in ("xds", "infraIR", "xdsIR") or not isinstance(objects, (list, dict)):
            continue
        for obj in objects if isinstance(objects, list) else [objects]:
            if not isinstance(obj, dict):
                continue
            meta = obj.get("metadata", {})
            who = f"{obj.get('kind')} {meta.get('namespace', '')}/{meta.get('name')}"
            status = obj.get("status") or {}
            conditions = list(status.get("conditions") or [])
            for holder in (*(status.get("parents") or []), *(status.get("ancestors") or []), *(status.get("listeners") or [])):
                conditions += holder.get("conditions") or []
            for c in conditions:
                if c.get("status") != "True" and c.get("type") not in ("Overlapping",):
                    found.append(f"{who}: {c.get('type')}={c.get('status')} ({c.get('reason')}): {c.get('message')}")
    return found


def unaccepted(result: Doc, kinds: tuple[str, ...] = ("httpRoutes", "envoyExtensionPolicies", "clientTrafficPolicies")) -> list[str]:
    """Routes and policies without an Accepted=True condition (for each parent or ancestor)."""
    found = []
    for kind in kinds:
        for obj in result.get(kind) or []:
            status = obj.get("status") or {}
            holders = [*(status.get("parents") or []), *(status.get("ancestors") or [])]
            if not holders or not all(
                any(c.get("type") == "Accepted" and c.get("status") == "True" for c in h.get("conditions") or []) for h in holders
            ):
                found.append(f"{kind} {obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}")
    return found


def _config(dump: Doc, kind: str) -> Doc:
    for config in dump["configs"]:
        if config["@type"].endswith(kind):
            found: Doc = config
            return found
    return {}


def _unwrapped(message: Doc) -> Doc:
    """A resource of the dump (an Any: its ``@type`` inline) as the message itself."""
    return {k: copy.deepcopy(v) for k, v in message.items() if k != "@type"}


def static_bootstrap(result: Doc, services: Iterable[Service]) -> Doc:
    """The one Gateway's xDS as a bootstrap for a bare Envoy: listeners on
    ports the kernel picks, routes inline, EDS clusters static at the
    loopback ports of the processes that play the Services."""
    (dump,) = result["xds"].values()
    by_address = {(s.cluster_ip(i), s.port): s.local_port for i, s in enumerate(services)}
    route_dump = _config(dump, "RoutesConfigDump").get("dynamicRouteConfigs", [])
    routes = {r["routeConfig"]["name"]: _unwrapped(r["routeConfig"]) for r in route_dump}
    endpoints = {
        e["endpointConfig"]["clusterName"]: e["endpointConfig"]
        for e in _config(dump, "EndpointsConfigDump").get("dynamicEndpointConfigs", [])
    }
    listeners = []
    for item in _config(dump, "ListenersConfigDump").get("dynamicListeners", []):
        listener = _unwrapped(item["activeState"]["listener"])
        listener["address"]["socketAddress"] = {"address": "127.0.0.1", "portValue": 0}
        chains = [*listener.get("filterChains", []), *([listener["defaultFilterChain"]] if "defaultFilterChain" in listener else [])]
        for chain in chains:
            for flt in chain.get("filters", []):
                if flt["name"] == HCM and "rds" in flt["typedConfig"]:
                    name = flt["typedConfig"].pop("rds")["routeConfigName"]
                    flt["typedConfig"]["routeConfig"] = routes[name]
        listeners.append(listener)
    clusters = []
    for item in _config(dump, "ClustersConfigDump").get("dynamicActiveClusters", []):
        cluster = _unwrapped(item["cluster"])
        if cluster.get("type") == "EDS" or "edsClusterConfig" in cluster:
            service_name = cluster.pop("edsClusterConfig", {}).get("serviceName", cluster["name"])
            assignment = _unwrapped(endpoints[service_name])
            for group in assignment.get("endpoints", []):
                for lb in group.get("lbEndpoints", []):
                    socket = lb["endpoint"]["address"]["socketAddress"]
                    local = by_address[(socket["address"], socket["portValue"])]
                    lb["endpoint"]["address"]["socketAddress"] = {"address": "127.0.0.1", "portValue": local}
            assignment["clusterName"] = cluster["name"]
            cluster["type"] = "STATIC"
            cluster["loadAssignment"] = assignment
        clusters.append(cluster)
    boot = _config(dump, "BootstrapConfigDump").get("bootstrap", {})
    return {
        # Envoy Gateway's proxies have a node identity; some route features require one.
        "node": {"id": "egctl-translation", "cluster": next(iter(result["xds"]))},
        "admin": {"address": {"socketAddress": {"address": "127.0.0.1", "portValue": 0}}},
        "layeredRuntime": boot.get("layeredRuntime", {}),
        "staticResources": {"listeners": listeners, "clusters": clusters},
    }


def sampler_config(converted: Path) -> str:
    """The routes the sampler decides from: the ConfigMap `convert` wrote."""
    for doc in yaml.safe_load_all((converted / "sampler.yaml").read_text(encoding="utf-8")):
        if doc and doc.get("kind") == "ConfigMap":
            text: str = doc["data"]["routes.yaml"]
            return text
    raise AssertionError("sampler.yaml has no ConfigMap")


def converted_objects(converted: Path) -> list[Doc]:
    """What `convert envoy-gateway` wrote for Envoy Gateway (routes and
    policies), without the sampler's own Kubernetes objects."""
    docs: list[Doc] = []
    for name in ("httproutes.yaml", "envoy-extension-policy.yaml", "client-traffic-policy.yaml"):
        docs += [d for d in yaml.safe_load_all((converted / name).read_text(encoding="utf-8")) if d]
    return docs
