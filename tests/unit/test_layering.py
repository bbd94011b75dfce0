"""The shape the tree promises: a pure core and configuration that do no I/O,
and commands that read configuration without loading gRPC.

Checked twice: statically (what each module imports, by name) and in a fresh
interpreter (everything that importing the module loads, transitively)."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.support.paths import CONFORMANCE, REPO

PURE_PACKAGES = ("core", "config")
# Modules that listen, connect, spawn, watch or serve: the shell's business.
IO_MODULES = (
    "grpc",
    "grpc_health",
    "asyncio",
    "socket",
    "ssl",
    "selectors",
    "subprocess",
    "watchfiles",
    "prometheus_client",
    "http",
    "urllib.request",
)


def pure_modules() -> list[str]:
    out = []
    for package in PURE_PACKAGES:
        for path in sorted((REPO / "extproc" / package).glob("*.py")):
            out.append(f"extproc.{package}.{path.stem}".removesuffix(".__init__"))
    return out


def _imported_names(path: str) -> set[str]:
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _is_io(name: str) -> bool:
    return any(name == io or name.startswith(io + ".") for io in IO_MODULES)


@pytest.mark.parametrize("module", pure_modules())
def test_pure_module_imports_no_io_module(module: str) -> None:
    path = module.replace(".", "/") + ("/__init__.py" if module.count(".") == 1 else ".py")
    assert not [n for n in _imported_names(path) if _is_io(n)]
    # Nor does anything it imports, in relative imports up and out of the pure packages.
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 2:
            target = (node.module or "").split(".")[0]
            assert target in (*PURE_PACKAGES, "wire"), f"{module} imports from extproc.{target}, outside the pure core"


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
    assert sorted(n for n in loaded if _is_io(n)) == []


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


def test_the_stack_reads_configuration_through_config_not_the_server() -> None:
    for path in sorted((REPO / "extproc" / "stack").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module:
                assert node.module != "server.store", f"{path.name} imports the sampler's store"
