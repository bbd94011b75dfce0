"""The shape the tree promises: a pure core and configuration that do no I/O,
checked statically (what each module imports, by name). The same checked in
a fresh interpreter (everything that importing a module loads, transitively),
and commands that read configuration without loading gRPC:
tests/service/test_import_layering.py."""

from __future__ import annotations

import ast

import pytest

from tests.support.layering import PURE_COMPARE_MODULES, PURE_PACKAGES, is_io, pure_modules
from tests.support.paths import REPO


def _imported_names(path: str) -> set[str]:
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", pure_modules())
def test_pure_module_imports_no_io_module(module: str) -> None:
    path = module.replace(".", "/") + ("/__init__.py" if module.count(".") == 1 else ".py")
    assert not [n for n in _imported_names(path) if is_io(n)]
    # Nor does anything it imports, in relative imports up and out of the pure packages.
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level >= 2:
            target = (node.module or "").split(".")[0]
            pure_compare = node.module in {f"compare.{m}" for m in PURE_COMPARE_MODULES}
            assert target in (*PURE_PACKAGES, "wire") or pure_compare, f"{module} imports from extproc.{target}, outside the pure core"


def test_the_stack_reads_configuration_through_config_not_the_server() -> None:
    for path in sorted((REPO / "extproc" / "stack").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module:
                assert node.module != "server.store", f"{path.name} imports the sampler's store"
