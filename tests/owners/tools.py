"""Where `make owners-tools` put the tools that own the formats, at the
versions pinned in tools/versions.env (read here, never repeated).

A missing tool skips the test with the command that builds it; with CI=true
it fails instead, since CI must run these checks.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.paths import REPO

VERSIONS_FILE = REPO / "tools" / "versions.env"
HOW = "run `make owners-tools` (needs Go 1.26+ and the Go module proxy; the first build takes several minutes)"


def versions() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pins[key.strip()] = value.strip()
    return pins


PINS = versions()


# Per machine, outside the work tree: a fresh clone (CI's) finds what an
# earlier run built. tools/owners.mk has the same default.
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mirror-sampler" / "tools"


def cache() -> Path:
    return (REPO / os.environ.get("OWNERS_TOOLS_DIR", str(DEFAULT_CACHE))).resolve()


def _need(path: Path, what: str, how: str = HOW, required_on_ci: bool = True) -> Path:
    if path.exists():
        return path
    message = f"{what} is not built ({path}): {how}"
    if required_on_ci and os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {message}")
    pytest.skip(message)


def _tool_path(name: str, version_key: str) -> Path:
    return cache() / f"{name}-{PINS[version_key]}" / name


def tool(name: str, version_key: str) -> Path:
    """A binary built by `make owners-tools`: ``.tools/NAME-VERSION/NAME``."""
    return _need(_tool_path(name, version_key), f"{name} {PINS[version_key]}")


def built(name: str, version_key: str) -> Path | None:
    """The same binary, or None where it was not built (for callers with a fallback)."""
    path = _tool_path(name, version_key)
    return path if path.exists() else None


def crds(name: str, version_key: str) -> Path:
    """A folder of CRDs copied from a module by `make owners-tools`."""
    folder = cache() / "crds" / f"{name}-{PINS[version_key]}"
    _need(folder / ".done", f"the {name} {PINS[version_key]} CRDs")
    return folder


def h2spec() -> Path:
    return tool("h2spec", "H2SPEC_VERSION")


def kubectl_validate() -> Path:
    return tool("kubectl-validate", "KUBECTL_VALIDATE_VERSION")


def egctl() -> Path:
    return tool("egctl", "ENVOY_GATEWAY_VERSION")


def istioctl() -> Path:
    """Optional even on CI: `make istioctl` (not part of owners-tools: a very long build)."""
    path = cache() / f"istioctl-{PINS['ISTIO_VERSION']}" / "istioctl"
    return _need(path, f"istioctl {PINS['ISTIO_VERSION']}", "run `make istioctl` (a build of well over 15 minutes)", required_on_ci=False)


def envoy_gateway_envoy() -> Path:
    """The Envoy release that the pinned Envoy Gateway ships."""
    return tool("envoy", "ENVOY_GATEWAY_ENVOY_VERSION")


def all_crds() -> list[Path]:
    """Gateway API (experimental), Envoy Gateway's own kinds, Istio's."""
    return [
        crds("gateway-api", "GATEWAY_API_VERSION"),
        crds("envoy-gateway", "ENVOY_GATEWAY_VERSION"),
        crds("istio", "ISTIO_VERSION"),
    ]
