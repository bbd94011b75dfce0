"""`convert envoy --inline module`, read back: the module's filter ahead of the router
where ext_proc was, each mirror rule's routes (variants and plain) carrying the rule's
module settings as the sampler would decide from policy.yaml (with MIRROR_KEY and
MIRROR_SALT from the environment), nothing of the sampler left (pure: no Envoy)."""

from __future__ import annotations

import json
from typing import Any

import yaml

from extproc.config.build import build_policy
from extproc.config.settings import Settings
from extproc.convert.envoy import convert_envoy
from extproc.core.slots import DEFAULT_SLOT_HEADERS
from extproc.envoy.module import MODULE_FILTER, MODULE_NAME, rule_settings, slot_settings
from tests.support.paths import DATA

SOURCE = DATA / "convert" / "envoy" / "envoy.yaml"
MODULE = "/opt/mirror-sampler/libmirror_sampler.so"


def routes(boot: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return [r for vh in hcm["route_config"]["virtual_hosts"] for r in vh["routes"]]


def test_module_replaces_the_sampler_and_routes_carry_their_rules() -> None:
    environ = {"MIRROR_KEY": "cookie:session,header:x-request-id", "MIRROR_SALT": "v2", "MIRROR_CONFIG": "ignored"}
    module_run = convert_envoy([SOURCE], module_path=MODULE, decision_environ=environ)
    ext_proc_run = convert_envoy([SOURCE])
    assert set(module_run.files) == set(ext_proc_run.files) - {"policy.yaml"}
    boot = yaml.safe_load(module_run.files["envoy.yaml"])
    assert "mirror-sampler" not in [c["name"] for c in boot["static_resources"]["clusters"]]
    for listener in boot["static_resources"]["listeners"]:
        filters = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        names = [f["name"] for f in filters]
        assert names.index(MODULE_FILTER) == names.index("envoy.filters.http.router") - 1
        assert "mirror-sampler.ext_proc" not in names and "mirror-sampler.anti-spoof" not in names
        config = next(f for f in filters if f["name"] == MODULE_FILTER)["typed_config"]
        assert config["filter_name"] == MODULE_NAME
        assert config["dynamic_module_config"]["module"]["local"]["filename"] == MODULE
        assert json.loads(config["filter_config"]["value"]) == slot_settings(DEFAULT_SLOT_HEADERS)
    # The rules as the sampler would have run them: policy.yaml of the ext_proc conversion.
    policy = build_policy(Settings.load({**environ, "MIRROR_CONFIG": "policy.yaml"}), ext_proc_run.files["policy.yaml"])
    carried: dict[str, int] = {}
    for route in routes(boot):
        per_filter = route.get("typed_per_filter_config") or {}
        assert "mirror-sampler.ext_proc" not in per_filter
        ours = route.get("metadata", {}).get("filter_metadata", {}).get("mirror-sampler")
        if ours is None:
            assert MODULE_FILTER not in per_filter, route.get("name")
            continue
        settings = json.loads(per_filter[MODULE_FILTER]["filter_config"]["value"])
        assert settings == rule_settings(policy, policy.rules_by_id[ours["rule"]])
        assert settings["key_chain"][0] == {"kind": "cookie", "name": "session"} and settings["targets"][0]["salt_hex"]
        carried[ours["rule"]] = carried.get(ours["rule"], 0) + 1
    # Every rule of the front listener: 1 mirror -> variant + plain; 2 mirrors -> 3 variants + plain.
    assert sorted(carried.values()) == [2, 2, 4]


def test_cli_convert_envoy_inline_module_with_a_module_path(tmp_path: Any) -> None:
    from extproc.cli import main

    out = tmp_path / "out"
    assert main(["convert", "envoy", str(SOURCE), "-o", str(out), "--inline", "module", "--module-path", MODULE]) == 0
    assert not (out / "policy.yaml").exists()
    text = (out / "envoy.yaml").read_text()
    assert MODULE in text and "mirror-sampler.ext_proc" not in text
    assert text.startswith("# Converted by `mirror-sampler convert envoy --inline module`")
