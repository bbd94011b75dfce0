"""`convert envoy-gateway --inline module`: the rewritten HTTPRoutes route like the
originals, with every mirrored rule named; one EnvoyExtensionPolicy per mirror rule,
targeting exactly that rule's variant and plain rules by sectionName, whose module config
decides as the original rule (the settings the module reads, from the originals' Policy);
the EnvoyProxy allowlists the file its init container builds with the module's own command
line from the ConfigMap's sources (the package's C files, unchanged). Nothing here runs
Envoy Gateway or a compiler (tests/service/test_convert_envoy_gateway_module.py does)."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from extproc.cli import main
from extproc.config.build import build_policy
from extproc.convert import Conversion
from extproc.convert.envoy_gateway import ModuleEngine, convert_envoy_gateway, convert_envoy_gateway_sources
from extproc.convert.envoy_gateway_module import MODULE_ENTRY
from extproc.convert.kubernetes import SamplerDeployment
from extproc.convert.module_delivery import MODULE_DIR, MODULE_PATH, SOURCE_MOUNT
from extproc.envoy.module import MODULE_NAME, filter_settings, rule_settings
from extproc.module.build import DEFAULT_BUILDER_IMAGE, HEADERS, SOURCE_DIR, SOURCES, compile_command
from tests.support.paths import CONFORMANCE
from tests.unit.test_convert_envoy_gateway import (
    EDGE_NAMES,
    IDS,
    INPUTS,
    LONG_ROUTE_NAME,
    SETTINGS,
    assert_names_valid,
    docs,
    manifests,
    matcher_policy,
    mirrored_rule,
    original_text,
    route_manifest,
    sample_requests,
)

MODULE = ModuleEngine()


def convert(sources: list[tuple[str, str]], **options: Any) -> Conversion:
    return convert_envoy_gateway_sources(sources, SamplerDeployment(**options), MODULE)


def routes_by_name(conversion: Conversion) -> dict[tuple[str | None, str], dict[str, Any]]:
    return {(d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in docs(conversion.files["httproutes.yaml"])}


@pytest.mark.parametrize(("name", "sources"), INPUTS, ids=IDS)
def test_rewritten_routes_route_like_the_originals(name: str, sources: list[tuple[str, str]]) -> None:
    conversion = convert(sources)
    original = build_policy(SETTINGS, original_text(sources))
    rewritten = matcher_policy(conversion.files["httproutes.yaml"])
    for request in sample_requests(list(original.routes)):
        before, after = original.match(request), rewritten.match(request)
        assert (before is None) == (after is None), request
        if before is not None and after is not None:
            assert after.backends == before.backends and after.mirrors == ()


@pytest.mark.parametrize(("name", "sources"), INPUTS, ids=IDS)
def test_one_policy_per_mirror_rule_on_exactly_its_rules_deciding_as_the_original(name: str, sources: list[tuple[str, str]]) -> None:
    conversion = convert(sources)
    original = build_policy(SETTINGS, original_text(sources))
    routes = routes_by_name(conversion)
    policies = docs(conversion.files["envoy-extension-policy.yaml"])
    mirror_rules = [r for r in original.rules if r.mirrors]
    assert len(policies) == len(mirror_rules)
    targeted: dict[tuple[str | None, str], list[str]] = {}
    for policy_doc, rule in zip(policies, mirror_rules, strict=True):
        assert policy_doc["kind"] == "EnvoyExtensionPolicy"
        ns = policy_doc["metadata"].get("namespace")
        spec = policy_doc["spec"]
        assert set(spec) == {"targetRefs", "dynamicModule"}
        # No per-route config in Envoy Gateway: the filter config carries the rule.
        config = {**filter_settings(original), "rule": rule_settings(original, rule)}
        assert spec["dynamicModule"] == [{"name": MODULE_ENTRY, "filterName": MODULE_NAME, "config": config}]
        route_names = {ref["name"] for ref in spec["targetRefs"]}
        assert len(route_names) == 1 and all(ref["kind"] == "HTTPRoute" for ref in spec["targetRefs"])
        sections = [ref["sectionName"] for ref in spec["targetRefs"]]
        targeted.setdefault((ns, route_names.pop()), []).extend(sections)
        # The rule's variants (one per non-empty subset of its targets), then its plain rule.
        assert len(sections) == 2 ** len(rule.mirrors)
    for key, route in routes.items():
        rules = route["spec"]["rules"]
        names = [r.get("name") for r in rules]
        assert len([n for n in names if n]) == len(set(n for n in names if n)), f"rule names must be unique in {key}"
        mirrored = {r["name"] for r in rules if r.get("name") in targeted.get(key, [])}
        assert mirrored == set(targeted.get(key, []))
        # A rule no policy targets has no mirror left to decide.
        for r in rules:
            if r.get("name") not in mirrored:
                assert not any(f.get("type") == "RequestMirror" for f in r.get("filters") or [])


def test_conformance_exact_policy_and_rule_names() -> None:
    conversion = convert_envoy_gateway([CONFORMANCE], module=MODULE)
    rules = docs(conversion.files["httproutes.yaml"])[0]["spec"]["rules"]
    # Three unnamed mirror rules (one with two mirrors): each named, its variants after it.
    assert [r["name"] for r in rules] == [
        *("mirror-sampler-0-mirror-0", "mirror-sampler-0", "mirror-sampler-1-mirror-0", "mirror-sampler-1"),
        *("mirror-sampler-2-mirror-0-1", "mirror-sampler-2-mirror-0", "mirror-sampler-2-mirror-1", "mirror-sampler-2"),
    ]
    policies = docs(conversion.files["envoy-extension-policy.yaml"])
    assert [p["metadata"]["name"] for p in policies] == [f"mirror-sampler-request-percentage-mirror-{i}" for i in range(3)]
    assert policies[2]["spec"]["targetRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "request-percentage-mirror", "sectionName": s}
        for s in ("mirror-sampler-2-mirror-0-1", "mirror-sampler-2-mirror-0", "mirror-sampler-2-mirror-1", "mirror-sampler-2")
    ]
    assert set(conversion.files) == {"httproutes.yaml", "envoy-extension-policy.yaml", "envoy-proxy.yaml", "client-traffic-policy.yaml"}
    assert any("parametersRef" in n and "EnvoyProxy mirror-sampler" in n for n in conversion.notes)


def test_envoy_proxy_builds_and_allowlists_the_module() -> None:
    conversion = convert_envoy_gateway([CONFORMANCE], SamplerDeployment(), ModuleEngine(builder_image="reg.example/gcc:14"))
    config_map, proxy = docs(conversion.files["envoy-proxy.yaml"])
    ns = "gateway-conformance-infra"  # the Gateway's: an EnvoyProxy serves Gateways of its namespace
    assert config_map["metadata"] == {"name": "mirror-sampler-module-src", "namespace": ns}
    assert config_map["data"] == {f: (SOURCE_DIR / f).read_text() for f in (*SOURCES, *HEADERS)}
    kubernetes_validate.validate(config_map, "1.34", strict=True)
    assert proxy["metadata"] == {"name": "mirror-sampler", "namespace": ns}
    spec = proxy["spec"]
    assert spec["dynamicModules"] == [{"name": MODULE_ENTRY, "source": {"type": "Local", "local": {"path": MODULE_PATH}}}]
    deployment = spec["provider"]["kubernetes"]["envoyDeployment"]
    (init,) = deployment["initContainers"]
    volumes = {v["name"]: v for v in deployment["pod"]["volumes"]}
    mounts = {m["mountPath"]: m for m in init["volumeMounts"]}
    # The sources from the ConfigMap, compiled with the same command line as on this machine,
    # into the volume the Envoy container mounts read-only where the allowlist points.
    assert volumes[mounts[SOURCE_MOUNT]["name"]]["configMap"] == {"name": "mirror-sampler-module-src"}
    output = init["command"][init["command"].index("-o") + 1]
    build_dir, _, file_name = output.rpartition("/")
    assert init["command"] == compile_command("cc", output, SOURCE_MOUNT, [f"{SOURCE_MOUNT}/{s}" for s in SOURCES])
    assert init["image"] == "reg.example/gcc:14"
    (envoy_mount,) = deployment["container"]["volumeMounts"]
    assert envoy_mount == {"name": mounts[build_dir]["name"], "mountPath": MODULE_DIR, "readOnly": True}
    assert f"{MODULE_DIR}/{file_name}" == MODULE_PATH
    assert "emptyDir" in volumes[envoy_mount["name"]]
    assert DEFAULT_BUILDER_IMAGE.endswith("bookworm")  # Debian 12, as Envoy Gateway's distroless Envoy


def test_no_gateway_no_client_traffic_policy_and_proxy_in_the_sampler_namespace() -> None:
    route = CONFORMANCE.read_text().replace("  parentRefs:\n  - name: same-namespace\n", "")
    assert "parentRefs" not in route
    conversion = convert([("r.yaml", route)], namespace="mirroring")
    assert "client-traffic-policy.yaml" not in conversion.files
    assert {d["metadata"]["namespace"] for d in docs(conversion.files["envoy-proxy.yaml"])} == {"mirroring"}


def test_cli_writes_the_module_objects_and_refuses_other_engines(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["convert", "envoy-gateway", str(CONFORMANCE), "-o", str(out), "--inline", "module"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "client-traffic-policy.yaml",
        "envoy-extension-policy.yaml",
        "envoy-proxy.yaml",
        "httproutes.yaml",
    ]
    assert "dynamicModule" in (out / "envoy-extension-policy.yaml").read_text()
    capsys.readouterr()
    assert main(["convert", "envoy-gateway", str(CONFORMANCE), "-o", str(out), "--inline", "lua"]) == 2
    assert "--inline lua" in capsys.readouterr().err


def test_rule_names_given_avoid_the_route_s_own() -> None:
    # A user rule already named as the converter would name the unnamed mirror rule.
    sources = manifests(route_manifest("clash", [mirrored_rule("/a"), mirrored_rule("/b", "mirror-sampler-0", mirrors=0)]))
    conversion = convert(sources)
    assert_names_valid(conversion)
    (route,) = docs(conversion.files["httproutes.yaml"])
    assert [r["name"] for r in route["spec"]["rules"]] == ["mirror-sampler-0-2-mirror-0", "mirror-sampler-0-2", "mirror-sampler-0"]
    (policy,) = docs(conversion.files["envoy-extension-policy.yaml"])
    # The policy reaches the mirror rule's routes, not the user's rule.
    assert [t["sectionName"] for t in policy["spec"]["targetRefs"]] == ["mirror-sampler-0-2-mirror-0", "mirror-sampler-0-2"]


@pytest.mark.parametrize("sources", EDGE_NAMES.values(), ids=EDGE_NAMES.keys())
def test_names_are_unique_valid_and_stable(sources: list[tuple[str, str]]) -> None:
    conversion = convert(sources)
    assert_names_valid(conversion)
    test_one_policy_per_mirror_rule_on_exactly_its_rules_deciding_as_the_original("edge", sources)
    assert convert(sources).files == conversion.files


def test_policies_of_a_long_route_name_are_distinct() -> None:
    conversion = convert(LONG_ROUTE_NAME)
    policies = docs(conversion.files["envoy-extension-policy.yaml"])
    names = [p["metadata"]["name"] for p in policies]
    # Cut to 253 with a hash of the whole: one name would make the second policy replace the first.
    assert len(set(names)) == 2 and all(len(n) == 253 for n in names)
    assert [[t["sectionName"] for t in p["spec"]["targetRefs"]] for p in policies] == [
        ["mirror-sampler-0-mirror-0", "mirror-sampler-0"],
        ["mirror-sampler-1-mirror-0", "mirror-sampler-1"],
    ]
