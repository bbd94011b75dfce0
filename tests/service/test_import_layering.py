"""The shape the tree promises, checked in a fresh interpreter (everything
that importing a module loads, transitively): a pure core and configuration
that load no I/O module, and commands that read configuration without loading
gRPC. The static half (what each module imports, by name) is
tests/unit/test_layering.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.layering import is_io, pure_modules
from tests.support.paths import CONFORMANCE, REPO


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return set(out.stdout.split())


def test_pure_packages_load_no_io_module_transitively() -> None:
    loaded = _loaded_after("\n".join(f"import {m}" for m in pure_modules()))
    assert sorted(n for n in loaded if is_io(n)) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["check-config", "--config", str(CONFORMANCE)],
        ["explain", "--config", str(CONFORMANCE), "--path", "/percent-mirror", "--header", "x-request-id=alice"],
    ],
    ids=["check-config", "explain"],
)
def test_reading_commands_do_not_load_grpc(argv: list[str]) -> None:
    loaded = _loaded_after(
        "from extproc.cli import main\nimport contextlib, io\n"
        f"with contextlib.redirect_stdout(io.StringIO()):\n    assert main({argv!r}) == 0"
    )
    assert not [n for n in loaded if n == "grpc" or n.startswith("grpc.")]
    # Reading the file is config.source's business, not the sampler's store's; nothing watches it.
    assert not {"extproc.server.store", "extproc.watch", "watchfiles"} & loaded
