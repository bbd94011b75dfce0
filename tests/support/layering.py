"""What the layering tests agree on: the pure packages and the modules that
do I/O (the shell's business)."""

from __future__ import annotations

from tests.support.paths import REPO

PURE_PACKAGES = ("core", "config")
# The comparison's pure modules (extproc/compare/): the configuration reads
# spec.compare through compare.config, which uses only these.
PURE_COMPARE_MODULES = ("records", "entries", "paths", "differ", "noise", "judge", "config")
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


def is_io(name: str) -> bool:
    return any(name == io or name.startswith(io + ".") for io in IO_MODULES)
