"""The comparison's pure modules do no I/O (the shell is envoy, capture, store, metrics, report, cli)."""

from __future__ import annotations

import ast

import pytest

from tests.support.layering import PURE_COMPARE_MODULES
from tests.support.paths import REPO

PURE = PURE_COMPARE_MODULES
IO = ("grpc", "asyncio", "socket", "sqlite3", "subprocess", "prometheus_client", "http", "urllib", "threading", "queue", "os", "pathlib")


@pytest.mark.parametrize("module", PURE)
def test_pure_compare_module_imports_no_io(module: str) -> None:
    tree = ast.parse((REPO / "extproc" / "compare" / f"{module}.py").read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module if node.level == 0 else "." * node.level + node.module)
    assert not [n for n in names if n.split(".")[0] in IO or n.lstrip(".").split(".")[0] in {"store", "capture", "metrics", "envoy", "cli"}]
