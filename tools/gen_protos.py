"""Regenerate the wire contracts' Python code (`make protos`).

Compiles protos/extproc/wire/ext_proc.proto (ext_proc) and accesslog.proto
(the gRPC access log the comparison's observer reads) with grpcio-tools'
bundled protoc into extproc/wire/*_pb2.py and .pyi. Only message code is
generated (no grpc_python_out): the protos have no service, on purpose.

`--out DIR` writes under DIR instead of the repository root, so
tests/test_wire.py can regenerate into a temporary directory and compare the
result byte for byte with the committed files.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
# Relative to PROTO_ROOT; it is also the descriptor's file name in the pool,
# and protoc mirrors it into the output path (extproc/wire/...).
PROTO_FILES = ("extproc/wire/ext_proc.proto", "extproc/wire/accesslog.proto")


def generate(out: Path) -> None:
    # The bundled include dir supplies google/protobuf/{wrappers,struct,duration}.proto, so no
    # system protoc or include path is involved and output depends only on
    # the grpcio-tools version.
    well_known = resources.files("grpc_tools") / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    status = protoc.main(
        [
            "grpc_tools.protoc",  # argv[0], ignored
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            # Absolute paths under PROTO_ROOT map back to the same relative
            # names, so output never depends on the caller's working directory.
            *(str(PROTO_ROOT / p) for p in PROTO_FILES),
        ]
    )
    if status != 0:
        raise SystemExit(f"protoc failed with exit status {status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT,
        help="root directory to write extproc/wire/*_pb2.py(i) under (default: the repository root)",
    )
    ns = parser.parse_args(argv)
    generate(ns.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
