"""The wire contracts (ext_proc, the access log), the checks that start processes: the
generated code against a fresh protoc run (grpc_tools, through
tools/gen_protos.py), and no descriptor-pool clash with Envoy's generated
protos in a fresh interpreter, whichever is imported first. The pure checks
are in tests/unit/test_wire.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support.paths import REPO as ROOT

GENERATED = (
    "extproc/wire/ext_proc_pb2.py",
    "extproc/wire/ext_proc_pb2.pyi",
    "extproc/wire/accesslog_pb2.py",
    "extproc/wire/accesslog_pb2.pyi",
)


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        cwd=tmp_path,  # output must not depend on the working directory
    )
    for rel in GENERATED:
        fresh = (tmp_path / rel).read_bytes()
        committed = (ROOT / rel).read_bytes()
        assert fresh == committed, f"{rel} is stale: run `make protos`"


# ---------------------------------------------------------------------------
# No descriptor-pool clash with Envoy's own generated protos, either order.
# ---------------------------------------------------------------------------

_CLASH_SCRIPT = textwrap.dedent(
    """
    import importlib, sys
    for name in sys.argv[1:]:
        importlib.import_module(name)
    from envoy.service.ext_proc.v3 import external_processor_pb2 as envoy
    from extproc import wire
    a = envoy.ProcessingResponse(
        request_headers=envoy.HeadersResponse(response=envoy.CommonResponse(clear_route_cache=True))
    ).SerializeToString()
    b = wire.ProcessingResponse(
        request_headers=wire.HeadersResponse(response=wire.CommonResponse(clear_route_cache=True))
    ).SerializeToString()
    assert a == b and a, (a, b)
    from envoy.service.accesslog.v3 import als_pb2
    from extproc.wire import accesslog_pb2
    theirs = als_pb2.StreamAccessLogsMessage()
    theirs.http_logs.log_entry.add().request.request_id = "r"
    ours = accesslog_pb2.StreamAccessLogsMessage()
    ours.http_logs.log_entry.add().request.request_id = "r"
    assert theirs.SerializeToString() == ours.SerializeToString()
    """
)


ENVOYS = ("envoy.service.ext_proc.v3.external_processor_pb2", "envoy.service.accesslog.v3.als_pb2")
OURS = ("extproc.wire", "extproc.wire.accesslog_pb2")


@pytest.mark.parametrize(
    "order",
    [
        (
            "envoy.service.ext_proc.v3.external_processor_pb2",
            "envoy.service.accesslog.v3.als_pb2",
            "extproc.wire",
            "extproc.wire.accesslog_pb2",
        ),
        (
            "extproc.wire",
            "extproc.wire.accesslog_pb2",
            "envoy.service.ext_proc.v3.external_processor_pb2",
            "envoy.service.accesslog.v3.als_pb2",
        ),
    ],
    ids=["envoy-first", "ours-first"],
)
def test_no_symbol_clash_with_xds_protos(order: tuple[str, ...]) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CLASH_SCRIPT, *order],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
