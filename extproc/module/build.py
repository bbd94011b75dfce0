"""Compile the module on demand with the system C compiler, into a cache keyed by the
digest of its sources and flags: a rebuild only when the C changed.

``python -m extproc.module.build OUTPUT`` compiles it to OUTPUT, where only the sources
are present (the Dockerfile's ``module`` stage, for docker-compose.module.yml)."""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

SOURCE_DIR = Path(__file__).parent
# The decision and its configuration, pure C with no Envoy in it (the sanitizer tests'
# driver links these); then the Envoy glue: the filter, and the hooks it has no use for.
CORE_SOURCES = ("decision.c", "config.c", "json.c")
GLUE_SOURCES = ("mirror_sampler.c", "passthrough.c")
SOURCES = (*GLUE_SOURCES, *CORE_SOURCES)
HEADERS = ("abi.h", "decision.h", "json.h")
# Warnings are errors: a crash in the module is a crash of Envoy's data plane.
WARNINGS = ("-std=c11", "-Wall", "-Wextra", "-Werror")
MODULE_FLAGS = (*WARNINGS, "-O2", "-fPIC", "-shared", "-fvisibility=hidden")
LIBS = ("-lpthread",)
COMPILERS = ("cc", "gcc", "clang")
# Where the module is built in a cluster (convert envoy-gateway --inline module): Debian 12.
# The module needs no glibc symbol newer than 2.17 (tests/support/module_elf.py), so it
# loads in Envoy Gateway's distroless Envoy and in envoyproxy/envoy alike. Pin a digest in
# production.
DEFAULT_BUILDER_IMAGE = "gcc:14-bookworm"


class ModuleBuildError(RuntimeError):
    """No compiler, or the compiler failed; the message says what to do."""


def compiler(environ: Mapping[str, str] = os.environ) -> str:
    """$CC, else the first of cc, gcc, clang on PATH."""
    wanted = environ.get("CC", "").split()
    if wanted:
        found = shutil.which(wanted[0])
        if found:
            return found
        raise ModuleBuildError(f"CC={environ['CC']!r}: compiler not found")
    for name in COMPILERS:
        found = shutil.which(name)
        if found:
            return found
    raise ModuleBuildError(
        "no C compiler found ($CC, cc, gcc or clang) to build the dynamic module; install one "
        "(for example: apt-get install gcc), or choose --inline lua, or run the ext_proc sampler (no --inline)"
    )


def source_digest(flags: Sequence[str] = MODULE_FLAGS) -> str:
    h = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        h.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes() + b"\0")
    h.update("\0".join(flags).encode())
    return h.hexdigest()[:16]


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """$MIRROR_MODULE_CACHE, else $XDG_CACHE_HOME/mirror-sampler, else ~/.cache/mirror-sampler."""
    if environ.get("MIRROR_MODULE_CACHE"):
        return Path(environ["MIRROR_MODULE_CACHE"])
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mirror-sampler"


def compile_command(
    cc: str, output: str, include_dir: Path | str, sources: Sequence[str], flags: Sequence[str] = MODULE_FLAGS
) -> list[str]:
    """The one compiler command line, here and where the module is built elsewhere
    (the init container `convert envoy-gateway --inline module` writes)."""
    return [cc, *flags, "-I", str(include_dir), "-o", output, *sources, *LIBS]


def compile_c(output: Path, sources: Sequence[Path], flags: Sequence[str], cc: str | None = None) -> Path:
    """Compile to a temporary name and move it into place, so that a reader (Envoy,
    another build) never sees half a file."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.")
    os.close(fd)
    command = compile_command(cc or compiler(), staging, SOURCE_DIR, [str(s) for s in sources], flags)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise ModuleBuildError(f"building {output.name} failed ({' '.join(command)}):\n{done.stderr.strip()}")
        # mkstemp's 0600, to which the linker adds only execute bits, would keep an Envoy
        # running as another user (the envoyproxy/envoy image's uid 101) from loading it.
        os.chmod(staging, 0o755)
        os.replace(staging, output)
    finally:
        Path(staging).unlink(missing_ok=True)
    return output


def build_module(cache: Path | None = None) -> Path:
    """The module's path, compiled if this version of the sources has not been yet."""
    target = (cache or cache_dir()) / f"libmirror_sampler-{source_digest()}.so"
    if target.exists():
        return target
    return compile_c(target, [SOURCE_DIR / s for s in SOURCES], MODULE_FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m extproc.module.build",
        description="Compile the dynamic module to OUTPUT with the system C compiler ($CC, cc, gcc or clang).",
    )
    parser.add_argument("output", type=Path, help="the shared library to write, for example /opt/mirror-sampler/libmirror_sampler.so")
    args = parser.parse_args(argv)
    try:
        compile_c(args.output, [SOURCE_DIR / s for s in SOURCES], MODULE_FLAGS)
    except ModuleBuildError as e:
        print(f"mirror-sampler module: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
