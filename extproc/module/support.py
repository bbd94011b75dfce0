"""Which Envoy versions load the module, and the module for one Envoy.

What gates loading is symbols, not the ABI version string: Envoy resolves the hooks by
name and the module its callbacks by name. A callback that kept its name but changed its
signature is not detected and crashes Envoy (1.36's define_counter), so only the versions
the tests run the module on are accepted.
"""

from __future__ import annotations

import re
import subprocess

from ..config.errors import ConfigError
from .build import ModuleBuildError, build_module

SUPPORTED = ("1.39", "1.40")
_VERSION = re.compile(r"/(\d+)\.(\d+)\.(\d+)/")


class UnsupportedEnvoy(RuntimeError):
    """This Envoy cannot load the module; the message names the alternatives."""


def parse_version(text: str) -> str:
    """``envoy --version`` output -> "1.40.0"."""
    m = _VERSION.search(text)
    if m is None:
        raise UnsupportedEnvoy(f"cannot read Envoy's version from {text.strip()[:200]!r}")
    return ".".join(m.groups())


def check_supported(version: str) -> None:
    minor = ".".join(version.split(".")[:2])
    if minor not in SUPPORTED:
        raise UnsupportedEnvoy(
            f"Envoy {version} is not supported by the dynamic module (supported: {', '.join(SUPPORTED)}): "
            "use --inline lua (generated Lua), or the ext_proc sampler (no --inline)"
        )


def installed_version(binary: str) -> str:
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except OSError as e:
        raise UnsupportedEnvoy(f"{binary} --version: {e.strerror}") from None
    return parse_version(done.stdout + done.stderr)


def check_envoy(binary: str) -> str:
    """The version of this Envoy binary, if it loads the module; else UnsupportedEnvoy."""
    version = installed_version(binary)
    check_supported(version)
    return version


def module_for(binary: str) -> str:
    """The module built for the Envoy at ``binary``, after checking that this Envoy
    loads it: its path, or a ConfigError saying why not and what to use instead."""
    try:
        check_envoy(binary)
        return str(build_module())
    except (UnsupportedEnvoy, ModuleBuildError) as e:
        raise ConfigError([f"--inline module (MIRROR_INLINE=module): {e}"]) from None


def module_for_installed_envoy() -> str:
    """``module_for`` the Envoy that `up` runs and `envoy-config` renders for (the venv's)."""
    from ..stack.envoy import EnvoyError, envoy_binary

    try:
        binary = envoy_binary()
    except EnvoyError as e:
        raise ConfigError([f"--inline module (MIRROR_INLINE=module): cannot check which Envoy will load the module: {e}"]) from None
    return module_for(binary)
