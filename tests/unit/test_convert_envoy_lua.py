"""`convert envoy --inline lua`, read back: the anti-spoof and decide Lua filters ahead
of the router where ext_proc was, each mirror rule's routes (variants and plain)
carrying exactly the script `envoy-config --inline lua` would give that rule, as the
sampler would decide it from policy.yaml (with MIRROR_KEY and MIRROR_SALT from the
environment), nothing of the sampler left (pure: no Envoy). What `--inline` alone means
for each converter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config.build import build_policy
from extproc.config.settings import Settings
from extproc.convert import ConvertError
from extproc.convert.envoy import convert_envoy
from extproc.envoy.lua import DECIDE_FILTER, rule_script
from extproc.envoy.module import MODULE_FILTER
from extproc.envoy.render import ANTI_SPOOF_FILTER
from tests.support.paths import CONFORMANCE, DATA
from tests.unit.test_convert_envoy import bootstrap, convert_dict, many_routes
from tests.unit.test_convert_envoy_module import SOURCE, routes

REVIEWS = DATA / "convert" / "istio" / "reviews.yaml"

ENVIRON = {"MIRROR_KEY": "cookie:session,header:x-request-id", "MIRROR_SALT": "v2"}


def test_lua_replaces_the_sampler_and_routes_carry_their_rules_scripts() -> None:
    lua_run = convert_envoy([SOURCE], lua=True, decision_environ=ENVIRON)
    ext_proc_run = convert_envoy([SOURCE])
    assert any("is no longer in effect" in n and "convert the original again" in n and "policy.yaml" not in n for n in lua_run.notes)
    assert set(lua_run.files) == set(ext_proc_run.files) - {"policy.yaml"}
    assert lua_run.files["envoy.yaml"].startswith("# Converted by `mirror-sampler convert envoy --inline lua`")
    boot = yaml.safe_load(lua_run.files["envoy.yaml"])
    assert "mirror-sampler" not in [c["name"] for c in boot["static_resources"]["clusters"]]
    for listener in boot["static_resources"]["listeners"]:
        names = [f["name"] for f in listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]]
        router = names.index("envoy.filters.http.router")
        assert names[router - 2 : router] == [ANTI_SPOOF_FILTER, DECIDE_FILTER], names
        assert "mirror-sampler.ext_proc" not in names and MODULE_FILTER not in names
    policy = build_policy(Settings.load({**ENVIRON, "MIRROR_CONFIG": "policy.yaml"}), ext_proc_run.files["policy.yaml"])
    carried: dict[str, list[bool]] = {}
    for route in routes(boot):
        per_filter = route.get("typed_per_filter_config") or {}
        assert "mirror-sampler.ext_proc" not in per_filter
        ours = route.get("metadata", {}).get("filter_metadata", {}).get("mirror-sampler")
        if ours is None:
            assert DECIDE_FILTER not in per_filter, route.get("name")
            continue
        variant = "variant" in ours
        script = per_filter[DECIDE_FILTER]["source_code"]["inline_string"]
        assert script == rule_script(policy, policy.rules_by_id[ours["rule"]], variant)
        assert 'local CHAIN = {{"cookie", "session"}' in script and 'local PREFIX = "v2\\000"' in script
        carried.setdefault(ours["rule"], []).append(variant)
    # Every rule of the front listener: 1 mirror -> variant + plain; 2 mirrors -> 3 variants + plain.
    assert sorted(carried.values(), key=len) == [[True, False], [True, False], [True, True, True, False]]


def test_one_engine_at_a_time() -> None:
    with pytest.raises(ConvertError, match="one engine"):
        convert_envoy([SOURCE], lua=True, module_path="/opt/m.so")


def test_converting_between_engines_starts_from_the_users_routes(tmp_path: Path) -> None:
    """Lua again, then the module, then the sampler: each as from the original."""
    first = convert_envoy([SOURCE], lua=True, output_dir=tmp_path)
    for name, text in first.files.items():
        (tmp_path / name).write_text(text)
    converted = tmp_path / "envoy.yaml"
    body = [line for line in first.files["envoy.yaml"].splitlines() if not line.startswith("#")]
    again = convert_envoy([converted], lua=True, output_dir=tmp_path).files["envoy.yaml"]
    assert [line for line in again.splitlines() if not line.startswith("#")] == body
    module = convert_envoy([converted], module_path="/opt/m.so", output_dir=tmp_path).files["envoy.yaml"]
    assert DECIDE_FILTER not in module and ANTI_SPOOF_FILTER not in module and MODULE_FILTER in module
    assert module == convert_envoy([SOURCE], module_path="/opt/m.so", output_dir=tmp_path).files["envoy.yaml"]
    ext_proc = convert_envoy([converted], output_dir=tmp_path).files["envoy.yaml"]
    assert DECIDE_FILTER not in ext_proc and "mirror-sampler.ext_proc" in ext_proc


INPUTS = {"envoy": SOURCE, "envoy-gateway": CONFORMANCE, "istio": REVIEWS}


@pytest.mark.parametrize(
    ("source", "inline", "engine"),
    [
        ("envoy", [], "the ext_proc sampler"),
        ("envoy", ["--inline"], "lua"),
        ("envoy", ["--inline", "lua"], "lua"),
        ("envoy", ["--inline", "module", "--module-path", "/opt/m.so"], "module"),
        ("envoy", ["--inline", "--module-path", "/opt/m.so"], "module"),
        ("envoy-gateway", ["--inline"], "module"),
        ("envoy-gateway", ["--inline", "module"], "module"),
        ("istio", ["--inline"], "module"),
    ],
)
def test_inline_alone_is_lua_where_lua_is_offered_and_the_module_elsewhere(
    source: str, inline: list[str], engine: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from extproc.cli import main

    monkeypatch.delenv("MIRROR_INLINE", raising=False)
    assert main(["convert", source, str(INPUTS[source]), "-o", str(tmp_path), *inline]) == 0
    written = "\n".join(p.read_text() for p in sorted(tmp_path.iterdir()))
    if engine == "lua":
        assert DECIDE_FILTER in written and MODULE_FILTER not in written
    elif engine == "module":
        assert MODULE_FILTER in written or "dynamicModule" in written
        assert DECIDE_FILTER not in written
    else:
        assert "mirror-sampler.ext_proc" in written and DECIDE_FILTER not in written


def test_mirror_inline_on_follows_the_same_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from extproc.cli import main

    monkeypatch.setenv("MIRROR_INLINE", "on")
    assert main(["convert", "envoy", str(SOURCE), "-o", str(tmp_path / "envoy")]) == 0
    assert DECIDE_FILTER in (tmp_path / "envoy" / "envoy.yaml").read_text()
    assert main(["convert", "envoy-gateway", str(CONFORMANCE), "-o", str(tmp_path / "eg")]) == 0
    assert "dynamicModule" in "\n".join(p.read_text() for p in (tmp_path / "eg").iterdir())
    monkeypatch.setenv("MIRROR_INLINE", "lua")
    assert main(["convert", "envoy-gateway", str(CONFORMANCE), "-o", str(tmp_path / "eg2")]) == 2
    assert "--inline lua" in capsys.readouterr().err


def test_a_module_path_for_another_engine_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from extproc.cli import main

    monkeypatch.delenv("MIRROR_INLINE", raising=False)
    for inline in (["--inline", "lua"], []):
        assert main(["convert", "envoy", str(SOURCE), "-o", str(tmp_path), *inline, "--module-path", "/opt/m.so"]) == 2
        assert "--module-path" in capsys.readouterr().err


def test_more_than_16_mirroring_routes_in_a_virtual_host_each_carry_their_own_rule() -> None:
    """The rules come from the same policy.yaml the sampler would read, which holds at
    most 16 rules per HTTPRoute: the 17th route onwards is in a second one."""
    boot = bootstrap(many_routes(20))
    lua_run = convert_dict(boot, lua=True, decision_environ=ENVIRON)
    policy = build_policy(Settings.load({**ENVIRON, "MIRROR_CONFIG": "policy.yaml"}), convert_dict(boot).files["policy.yaml"])
    carried: dict[str, str] = {}
    for route in routes(yaml.safe_load(lua_run.files["envoy.yaml"])):
        ours = route["metadata"]["filter_metadata"]["mirror-sampler"]
        script = route["typed_per_filter_config"][DECIDE_FILTER]["source_code"]["inline_string"]
        assert script == rule_script(policy, policy.rules_by_id[ours["rule"]], "variant" in ours)
        carried.setdefault(ours["rule"], route["name"].split(" ")[0])
    assert len(carried) == 20 and carried["envoy/l-rc-vh-2/0"] == "r16"
