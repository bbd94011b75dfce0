"""A frame trace of Envoy's ext_proc connection: the sampler (http2 transport)
against the free processor, under the same load. A relay between Envoy and the
processor counts, for each direction, the reads it gets (one per ``write`` of
the sender, as far as loopback TCP keeps them apart) and the HTTP/2 frames in
them: frames and writes per answer, WINDOW_UPDATE and SETTINGS cadence,
answers of several streams coalesced into one write.

    .venv/bin/python bench/trace_ext_proc.py [--requests 4000] [--concurrency 8]

The stack is bench/run.py's; load is ``hey -n REQUESTS -c CONCURRENCY``. The
relay adds a hop (its own latency changes Envoy's batching a little, alike
for both); it prints a markdown table per variant.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import bench.testbed as testbed  # noqa: E402  (the stack)
import bench.variants as bench_variants  # noqa: E402
from extproc.envoy.render import render  # noqa: E402

NAMES = {
    0: "DATA", 1: "HEADERS", 2: "PRIORITY", 3: "RST_STREAM", 4: "SETTINGS", 6: "PING", 7: "GOAWAY", 8: "WINDOW_UPDATE", 9: "CONTINUATION"
}  # fmt: skip


class Direction:
    """One direction of one relayed connection: its chunks and the frames in them."""

    def __init__(self) -> None:
        self.buf = b""
        self.preface = True
        self.chunks = 0
        self.frames: collections.Counter[str] = collections.Counter()
        self.frames_per_chunk: list[int] = []
        self.answers_per_chunk: list[int] = []  # DATA frames (answers) per chunk

    def feed(self, data: bytes) -> None:
        self.chunks += 1
        buf = self.buf + data
        if self.preface and buf.startswith(b"PRI * HTTP/2.0"):
            if len(buf) < 24:
                self.buf = buf
                return
            buf = buf[24:]
        self.preface = False
        n = answers = 0
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            kind = NAMES.get(buf[3], str(buf[3]))
            self.frames[kind] += 1
            n += 1
            answers += kind == "DATA"
            buf = buf[9 + length :]
        self.buf = buf
        self.frames_per_chunk.append(n)
        self.answers_per_chunk.append(answers)


class Relay:
    """Listens on a port and forwards every connection to ``target``, tracing both ways."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.to_processor: list[Direction] = []
        self.to_envoy: list[Direction] = []
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._relay, testbed.LOOPBACK, 0))
        self.port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(testbed.LOOPBACK, self.target)
        down, up = Direction(), Direction()
        self.to_processor.append(down)
        self.to_envoy.append(up)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, trace: Direction) -> None:
            while data := await src.read(1 << 16):
                trace.feed(data)
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer, down), pump(up_reader, writer, up), return_exceptions=True)

    def summary(self) -> dict[str, Any]:
        def merge(ds: list[Direction]) -> Direction:
            out = Direction()
            for d in ds:
                out.chunks += d.chunks
                out.frames += d.frames
                out.frames_per_chunk += d.frames_per_chunk
                out.answers_per_chunk += d.answers_per_chunk
            return out

        down, up = merge(self.to_processor), merge(self.to_envoy)
        answers = up.frames["DATA"] or 1
        with_answers = [a for a in up.answers_per_chunk if a]
        return {
            "connections": len(self.to_envoy),
            "streams": down.frames["HEADERS"],
            "answers": up.frames["DATA"],
            "processor writes per answer": up.chunks / answers,
            "answers per write (writes carrying answers)": sum(with_answers) / max(1, len(with_answers)),
            "frames per write": sum(up.frames_per_chunk) / max(1, up.chunks),
            "processor frames": dict(up.frames),
            "Envoy frames": dict(down.frames),
            "Envoy writes per request": down.chunks / max(1, down.frames["HEADERS"]),
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--concurrency", type=int, default=8)
    testbed.add_keep_work_argument(ap)
    args = ap.parse_args(argv)
    testbed.check_tools()
    with testbed.work_folder("mirror-sampler-trace-", args.keep_work) as workdir:
        return trace(args, workdir)


def trace(args: argparse.Namespace, workdir: Path) -> int:
    relays: dict[str, Relay] = {}
    start_sampler, start_free = testbed.start_sampler, testbed.start_free_processor

    def traced_sampler(variant: testbed.Variant, wd: Path) -> Any:
        sampler = start_sampler(variant, wd)
        relays[variant.name] = relay = Relay(sampler.port)
        sampler.port = relay.port  # Envoy is pointed at the relay
        return sampler

    def traced_free(binary: Path, policy: Any, wd: Path) -> tuple[Any, int]:
        child, port = start_free(binary, policy, wd)
        relays["free-processor"] = relay = Relay(port)
        return child, relay.port

    testbed.start_sampler = traced_sampler  # type: ignore[assignment]
    testbed.start_free_processor = traced_free  # type: ignore[assignment]
    variants = [testbed.Variant("sampler-http2", render, "sampler", 1, "http2")]
    free_binary, note = testbed.build_free_processor(workdir)
    if free_binary is not None:
        variants.append(testbed.Variant("free-processor", bench_variants.free_processor_yaml, "free"))
    else:
        print(f"free processor skipped: {note}", file=sys.stderr)
    policy = testbed.bench_policy()
    upstreams = {testbed.PRIMARY: testbed.free_port(), testbed.MIRROR: testbed.free_port()}
    upstream = testbed.start_envoy("upstream", testbed.upstream_yaml(upstreams, 0), workdir, 1)
    try:
        for v in variants:
            stack = testbed.start_stack(v, policy, upstreams, workdir, 1, free_binary)
            try:
                subprocess.run(["hey", "-n", str(args.requests), "-c", str(args.concurrency), stack.url], check=True, capture_output=True)
            finally:
                stack.stop()
            print(f"\n## {v.name}\n")
            for key, value in relays[v.name].summary().items():
                print(f"- {key}: {value if not isinstance(value, float) else round(value, 3)}")
    finally:
        upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
