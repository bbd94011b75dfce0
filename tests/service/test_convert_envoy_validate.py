"""`convert envoy`'s output accepted by the real Envoy (`envoy --mode
validate`): processes, so not in tests/unit; the conversion itself is tested
there (tests/unit/test_convert_envoy.py, whose fixtures this reuses)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from extproc.config.schema import MAX_BACKEND_REFS_PER_RULE
from extproc.convert import Conversion
from extproc.convert.envoy import convert_envoy
from extproc.core.slots import SlotHeaders
from tests.unit.test_convert_envoy import (
    bootstrap,
    cluster,
    convert_dict,
    converted,
    inputs,
    lone_values_route,
    many_routes,
    to_sampler,
    weighted_route,
    with_users_sampler_cluster,
    write,
)

__all__ = ["converted", "inputs"]  # fixtures

ENVOY = Path(sys.executable).parent / "envoy"


def test_envoy_accepts_the_converted_configuration(converted: tuple[Conversion, Path], inputs: Path, tmp_path: Path) -> None:
    _, out = converted
    variants = {"default": out / "envoy.yaml"}
    # A sampler found by DNS, three slots: a second configuration.
    other = tmp_path / "other"
    conversion = convert_envoy([inputs / "envoy.yaml"], output_dir=other, sampler="localhost:50051", slot_headers=SlotHeaders(count=3))
    write(conversion, other)
    variants["dns-three-slots"] = other / "envoy.yaml"
    # Envoy deciding with the generated Lua (`--inline lua`; the module's is run in tests/e2e).
    lua = tmp_path / "lua"
    write(convert_envoy([inputs / "envoy.yaml"], output_dir=lua, lua=True), lua)
    variants["lua"] = lua / "envoy.yaml"
    validate(variants)


def validate(configurations: dict[str, Path]) -> None:
    """Each configuration accepted by `envoy --mode validate` (run side by side)."""
    procs = {
        name: subprocess.Popen(
            [str(ENVOY), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id", "--log-level", "error"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for name, path in configurations.items()
    }  # fmt: skip
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name}: {output[-3000:]}"


def test_envoy_accepts_what_gateway_apis_limits_lone_values_and_a_users_mirror_sampler_cluster_make(tmp_path: Path) -> None:
    """More rules or weighted clusters than an HTTPRoute takes (policy.yaml splits or
    cuts, Envoy's routes stay whole), lone values where Envoy takes a list (each of them
    as Envoy reads it, the input included), and a cluster of the user's named
    mirror-sampler that --inline keeps."""
    boot = bootstrap([*many_routes(20), weighted_route("many", MAX_BACKEND_REFS_PER_RULE + 1), lone_values_route()])
    boot["static_resources"]["clusters"] += [cluster(f"w-{i}", 19000 + i) for i in range(MAX_BACKEND_REFS_PER_RULE + 1)]
    cases = {
        "limits-and-lone-values": convert_dict(boot),
        "limits-and-lone-values-lua": convert_dict(boot, lua=True),
        "users-mirror-sampler-lua": convert_dict(with_users_sampler_cluster([to_sampler("p"), *many_routes(1)]), lua=True),
    }
    configurations = {}
    (tmp_path / "input.yaml").write_text(yaml.safe_dump(boot, sort_keys=False), encoding="utf-8")
    configurations["input"] = tmp_path / "input.yaml"
    for name, conversion in cases.items():
        write(conversion, tmp_path / name)
        configurations[name] = tmp_path / name / "envoy.yaml"
    validate(configurations)
