"""`convert envoy`'s output accepted by the real Envoy (`envoy --mode
validate`): processes, so not in tests/unit; the conversion itself is tested
there (tests/unit/test_convert_envoy.py, whose fixtures this reuses)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from extproc.convert import Conversion
from extproc.convert.envoy import convert_envoy
from extproc.core.slots import SlotHeaders
from tests.unit.test_convert_envoy import converted, inputs, write

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
    procs = {
        name: subprocess.Popen(
            [str(ENVOY), "--mode", "validate", "-c", str(path), "--use-dynamic-base-id", "--log-level", "error"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for name, path in variants.items()
    }  # fmt: skip
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{name}: {output[-3000:]}"
