"""The http2 transport's own CPU per request, in process: Envoy's ext_proc
pattern (HEADERS with a warm HPACK block, one DATA with a 315-byte message,
RST_STREAM CANCEL; several streams per read) replayed into a connection whose
socket discards what it is given, for this tree and for the transport at
earlier commits, in one run. No Envoy, no kernel, no event loop turn: the
Python work the transport adds per request (bench/PROFILE.md section 1).

    .venv/bin/python bench/http2_replay.py --baseline 485c574 [--streams 20000] [--per-read 8] [--rounds 7]

A baseline is ``git archive``d into a temporary directory and its transport
module(s) loaded from there under another name. The servicer answers every
message with the same 40 bytes, so the figures are the transport's.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hpack

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.testbed import add_keep_work_argument, work_folder  # noqa: E402
from extproc.server.health import Health  # noqa: E402
from extproc.wire import PROCESS_METHOD  # noqa: E402

ANSWER = b"\x12\x26" + b"x" * 38


class Servicer:
    def open_stream(self, rule_id: str | None) -> Servicer:
        return self

    def message(self, data: bytes) -> bytes | None:
        return ANSWER

    def close(self) -> None:
        pass


class DiscardingTransport(asyncio.Transport):
    """A socket that takes everything at once."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1
        self.written += len(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload


def envoy_reads(streams: int, per_read: int) -> list[bytes]:
    """What Envoy sends on one ext_proc connection, cut into reads: each read
    carries ``per_read`` new streams (HEADERS + DATA) and the resets of the
    streams of the read before (Envoy resets each once answered)."""
    encoder = hpack.Encoder()
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", PROCESS_METHOD),
        (":authority", "sampler"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-timeout", "200m"),
        ("x-mirror-rule-id", "default/mirror/0"),
        ("x-envoy-internal", "true"),
    ]
    request = b"\x00" + (315).to_bytes(4, "big") + b"r" * 315
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"") + frame(8, 0, 0, (1 << 30).to_bytes(4, "big"))
    reads = [preface]
    previous: list[int] = []
    sid = 1
    for _ in range(0, streams, per_read):
        chunk = [frame(3, 0, s, (8).to_bytes(4, "big")) for s in previous]
        previous = []
        for _ in range(per_read):
            chunk.append(frame(1, 4, sid, encoder.encode(headers)) + frame(0, 0, sid, request))
            previous.append(sid)
            sid += 2
        reads.append(b"".join(chunk))
    return reads


def load_transport(tree: Path, label: str) -> Any:
    """The http2 transport module (or package) as it is in ``tree``, under another name."""
    root = tree / "extproc" / "server" / "transports"
    package = root / "http2"
    if package.is_dir():
        name = f"http2_{label}"
        spec = importlib.util.spec_from_file_location(name, package / "__init__.py", submodule_search_locations=[str(package)])
    else:
        name = f"http2_{label}"
        spec = importlib.util.spec_from_file_location(name, root / "http2.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def connection_factory(module: Any) -> Callable[[Any], Any]:
    """How to make one connection object from a transport (the class is private in both layouts)."""
    if hasattr(module, "_Connection"):
        return module._Connection  # type: ignore[no-any-return]
    return importlib.import_module(module.__name__ + ".adapter")._Adapter  # type: ignore[no-any-return]


def run_once(module: Any, reads: list[bytes]) -> tuple[float, int]:
    owner = module.Http2Transport(Servicer(), Health(), "127.0.0.1", 0)
    conn = connection_factory(module)(owner)
    transport = DiscardingTransport()
    conn.connection_made(transport)
    received = conn.data_received
    start = time.perf_counter()
    for data in reads:
        received(data)
    took = time.perf_counter() - start
    return took, transport.writes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", action="append", default=[], help="a commit to compare with (repeatable)")
    ap.add_argument("--streams", type=int, default=20000)
    ap.add_argument("--per-read", type=int, default=8, help="new streams per read (default 8)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds; the best is reported (default 7)")
    add_keep_work_argument(ap)
    args = ap.parse_args(argv)
    reads = envoy_reads(args.streams, args.per_read)
    variants: dict[str, Any] = {"this tree": load_transport(REPO, "this")}
    with work_folder("mirror-sampler-replay-", args.keep_work) as workdir:
        return replay(args, reads, variants, workdir)


def replay(args: argparse.Namespace, reads: list[bytes], variants: dict[str, Any], workdir: Path) -> int:
    for commit in args.baseline:
        tree = workdir / commit
        tree.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "extproc/server/transports"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        variants[commit] = load_transport(tree, commit)
    best: dict[str, float] = {name: float("inf") for name in variants}
    writes: dict[str, int] = {}
    for _ in range(args.rounds):  # alternated, so machine load falls on every variant alike
        for name, module in variants.items():
            took, writes[name] = run_once(module, reads)
            best[name] = min(best[name], took)
    print(f"{args.streams} streams, {args.per_read} per read, best of {args.rounds} rounds\n")
    print("| transport | µs/request | writes per read |")
    print("|---|---|---|")
    for name in variants:
        print(f"| {name} | {best[name] / args.streams * 1e6:.2f} | {writes[name] / len(reads):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
