"""What a built module (a shared library) exports and asks of the machine that loads it,
read with binutils' ``nm`` and ``objdump``: wherever it was built (here, in the
Dockerfile's ``module`` stage, in Envoy Gateway's init container), it must load in
another glibc image (envoyproxy/envoy, Envoy Gateway's distroless Envoy)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

# Older than any glibc an Envoy image of the supported versions runs on.
GLIBC_CEILING = (2, 17)


def symbols(so: Path, *flags: str) -> set[str]:
    out = subprocess.run(["nm", "-D", *flags, str(so)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def glibc_versions(so: Path) -> set[tuple[int, ...]]:
    """The glibc symbol versions the library imports."""
    imports = subprocess.run(["objdump", "-T", str(so)], capture_output=True, text=True, check=True).stdout
    return {tuple(int(n) for n in v.split(".")) for v in re.findall(r"GLIBC_([0-9.]+)", imports)}


def assert_needs_only_old_glibc(so: Path) -> None:
    versions = glibc_versions(so)
    assert versions and max(versions) <= GLIBC_CEILING, f"{so.name} needs glibc {sorted(versions)}, more than {GLIBC_CEILING}"
