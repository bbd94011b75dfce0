"""What `convert envoy-gateway --inline module` writes, through the tools that consume it:
the init container's command builds the module from the ConfigMap's sources (run here with
this machine's compiler), and Envoy Gateway's own translator (`egctl x translate`, when
built: `make owners-tools`, or OWNERS_TOOLS_DIR naming a folder holding egctl-*/egctl)
accepts every object and puts each rule's module filter exactly on that rule's routes."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config.build import build_policy
from extproc.config.settings import Settings
from extproc.convert.envoy_gateway import ModuleEngine, convert_envoy_gateway
from extproc.convert.module_delivery import MODULE_PATH, SOURCE_MOUNT
from extproc.envoy.module import MODULE_NAME
from tests.owners.kubectl_validate import validate
from tests.owners.tools import egctl
from tests.support.module_elf import assert_needs_only_old_glibc, symbols
from tests.support.paths import CONFORMANCE
from tests.unit.test_convert_envoy_gateway import mirrored_rule, route_manifest

DYNAMIC_MODULE_FILTER = "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
NAMESPACE = "gateway-conformance-infra"
GATEWAY = "same-namespace"
# What egctl needs around the converted objects: the class, the Gateway using the
# EnvoyProxy (as the converter's note says), and the Services the routes name.
WORLD = f"""\
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: eg}}
spec: {{controllerName: gateway.envoyproxy.io/gatewayclass-controller}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: {GATEWAY}, namespace: {NAMESPACE}}}
spec:
  gatewayClassName: eg
  infrastructure:
    parametersRef: {{group: gateway.envoyproxy.io, kind: EnvoyProxy, name: mirror-sampler}}
  listeners: [{{name: http, protocol: HTTP, port: 80}}]
"""


def services(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ports: dict[str, set[int]] = {}
    for route in docs:
        for rule in route["spec"]["rules"]:
            refs = [*(rule.get("backendRefs") or [])]
            refs += [f["requestMirror"]["backendRef"] for f in rule.get("filters") or [] if f["type"] == "RequestMirror"]
            for ref in refs:
                ports.setdefault(ref["name"], set()).add(ref.get("port", 80))
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": n, "namespace": NAMESPACE},
            "spec": {
                "clusterIP": f"10.0.0.{i + 1}",
                "ports": [{"name": f"http-{p}", "port": p, "protocol": "TCP"} for p in sorted(ports[n])],
            },
        }
        for i, n in enumerate(sorted(ports))
    ]


def walk(node: Any) -> Any:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_the_init_container_command_builds_the_module_from_the_config_map(tmp_path: Path) -> None:
    conversion = convert_envoy_gateway([CONFORMANCE], module=ModuleEngine())
    config_map, proxy = yaml.safe_load_all(conversion.files["envoy-proxy.yaml"])
    source = tmp_path / "src"
    source.mkdir()
    for name, text in config_map["data"].items():
        (source / name).write_text(text)
    (init,) = proxy["spec"]["provider"]["kubernetes"]["envoyDeployment"]["initContainers"]
    output = init["command"][init["command"].index("-o") + 1]
    built = tmp_path / "build" / Path(output).name
    built.parent.mkdir()
    command = [str(built) if a == output else a.replace(SOURCE_MOUNT, str(source)) for a in init["command"]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Path(MODULE_PATH).name == built.name
    assert "envoy_dynamic_module_on_http_filter_request_headers" in symbols(built, "--defined-only")
    # Built on Debian 12, loaded by Envoy Gateway's distroless Envoy.
    assert_needs_only_old_glibc(built)


def assert_each_rule_has_its_own_module_filter_on_its_routes(tmp_path: Path, source: Path) -> None:
    """egctl accepts every object `convert envoy-gateway --inline module` writes for ``source``
    (routes in NAMESPACE on GATEWAY), and each mirror rule's filter is on exactly its routes."""
    binary = egctl()
    conversion = convert_envoy_gateway([source], module=ModuleEngine())
    routes = list(yaml.safe_load_all(conversion.files["httproutes.yaml"]))
    converted = [d for text in conversion.files.values() for d in yaml.safe_load_all(text) if d]
    world = [*yaml.safe_load_all(WORLD), *services(routes), *converted]
    (tmp_path / "in.yaml").write_text(yaml.safe_dump_all(world))
    translate = ["x", "translate", "-f", str(tmp_path / "in.yaml"), "--from", "gateway-api", "--to", "gateway-api,xds"]
    done = subprocess.run(
        [str(binary), *translate, "-t", "all", "-o", "yaml"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = [d for d in yaml.safe_load_all(done.stdout) if d]
    # Translation errors do not change egctl's exit code: they are conditions in the objects' status.
    refused = [c for d in out for node in walk(d) if isinstance(node, dict) and node.get("status") == "False" for c in [node]]
    assert refused == []
    accepted = [n for d in out for n in walk(d) if isinstance(n, dict) and n.get("reason") == "Accepted"]
    assert len(accepted) >= 5  # the policies, the EnvoyProxy, the route, the Gateway ...

    filters = [n for d in out for n in walk(d) if isinstance(n, dict) and n.get("typedConfig", {}).get("@type") == DYNAMIC_MODULE_FILTER]
    policy = build_policy(Settings.load({"MIRROR_CONFIG": "x"}), source.read_text())
    mirror_rules = [r for r in policy.rules if r.mirrors]
    # One filter per mirror rule: two policies with one name would be one object, one rule unmirrored.
    assert len(filters) == len(mirror_rules)
    by_rule = {}
    for f in filters:
        # Disabled on the listener, enabled per route; the module from the allowlisted path.
        assert f["disabled"] is True
        config = f["typedConfig"]
        assert config["filterName"] == MODULE_NAME
        assert config["dynamicModuleConfig"]["module"]["local"]["filename"] == MODULE_PATH
        settings = json.loads(config["filterConfig"]["value"])
        by_rule[settings["rule"]["rule"]] = f["name"]
    assert sorted(by_rule) == sorted(r.id for r in mirror_rules)

    xds_routes = [n for d in out for n in walk(d) if isinstance(n, dict) and "match" in n and str(n.get("name")).startswith("httproute/")]
    policies = list(yaml.safe_load_all(conversion.files["envoy-extension-policy.yaml"]))
    # Which mirror rule each targeted rule name belongs to: the rule its policy's module config decides.
    rule_of = {t["sectionName"]: p["spec"]["dynamicModule"][0]["config"]["rule"]["rule"] for p in policies for t in p["spec"]["targetRefs"]}
    assert len(rule_of) == sum(len(p["spec"]["targetRefs"]) for p in policies)
    for r in xds_routes:
        section = r["metadata"]["filterMetadata"]["envoy-gateway"]["resources"][0]["sectionName"]
        enabled = set(r.get("typedPerFilterConfig") or {})
        # Exactly its own rule's filter (another rule's config would decide for the wrong rule); none on a rule without mirrors.
        assert enabled == ({by_rule[rule_of[section]]} if section in rule_of else set()), section
    assert {r["metadata"]["filterMetadata"]["envoy-gateway"]["resources"][0]["sectionName"] for r in xds_routes} >= set(rule_of)


def test_envoy_gateway_translates_each_rule_to_its_own_module_filter_on_its_routes(tmp_path: Path) -> None:
    assert_each_rule_has_its_own_module_filter_on_its_routes(tmp_path, CONFORMANCE)


def test_long_names_and_a_user_rule_named_like_ours_keep_each_rule_on_its_own_filter(tmp_path: Path) -> None:
    """A route name near the 253-character limit (each rule's policy name is cut: they must
    still differ) and a user rule named as the converter names an unnamed mirror rule."""
    rules = [mirrored_rule("/a"), mirrored_rule("/b", "mirror-sampler-0", mirrors=0), mirrored_rule("/c", mirrors=2)]
    route = route_manifest("r" * 240, rules, gateway=GATEWAY)
    route["metadata"]["namespace"] = NAMESPACE
    (tmp_path / "routes.yaml").write_text(yaml.safe_dump(route))
    assert_each_rule_has_its_own_module_filter_on_its_routes(tmp_path, tmp_path / "routes.yaml")


def test_every_object_validates_against_envoy_gateway_and_gateway_api_crds(tmp_path: Path) -> None:
    """kubectl-validate with Envoy Gateway's and Gateway API's CRDs (CEL rules included)."""
    conversion = convert_envoy_gateway([CONFORMANCE], module=ModuleEngine())
    files = []
    for name, text in conversion.files.items():
        (tmp_path / name).write_text(text)
        files.append(tmp_path / name)
    verdicts = validate(files)
    assert {p.name: v.errors for p, v in verdicts.items() if not v.valid} == {}
    assert len(verdicts) == len(conversion.files)
