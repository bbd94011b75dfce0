"""The HTTP/2 transport's protocol is sans-IO: every module of the package but
the asyncio adapter (and the package's front door) imports nothing that
listens, connects, schedules or serves, and nothing of the adapter."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from extproc.server.transports import http2

PACKAGE = Path(http2.__file__).parent
SHELL = {"adapter.py", "__init__.py"}
IO_MODULES = {"asyncio", "socket", "ssl", "selectors", "select", "threading", "time", "grpc", "grpc_health", "prometheus_client"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


@pytest.mark.parametrize("module", sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in SHELL))
def test_protocol_modules_do_no_io(module: str) -> None:
    imported = _imports(PACKAGE / module)
    assert not {name for name in imported if name.split(".")[0] in IO_MODULES}, imported
    assert ".adapter" not in imported
    ours = {name for name in imported if name.startswith("extproc.")}
    assert all(name.startswith(("extproc.core.", "extproc.server.health", "extproc.wire")) for name in ours), ours


def test_the_clock_is_an_argument() -> None:
    """No module of the protocol reads the time: ``now`` is passed in."""
    for path in PACKAGE.glob("*.py"):
        if path.name not in SHELL:
            assert "monotonic" not in path.read_text(), path.name
