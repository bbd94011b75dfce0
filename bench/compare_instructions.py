"""Envoy's own instructions per compared request (docs/compare.md "Cost"), counted
by Valgrind (callgrind) as bench/module_instructions.py counts them: a figure that
does not move with the machine's load, where bench/compare_cost.py's timings do.

    .venv/bin/python bench/compare_instructions.py [--requests 500] [--observers 2] [--output bench/results]

The deciding filter is inline Lua (no sampler process to time or count), one rule
mirroring 100% of requests, so every counted request is a mirrored one. Variants:

- ``off``: the configuration ``envoy-config --inline`` renders without spec.compare;
- ``on``: with the capture points (``render_with_capture``: the Lua capture filter
  and Envoy's gRPC access log), logging to ``--observers`` observers of this tree
  (`mirror-sampler compare capture`), as in production;
- ``on-absent``: the capture points logging to addresses nobody listens on.

With ``--parts``, where ``on``'s added instructions go, each part taken out of
the rendered ``on`` configuration (these join nothing; measurements only):

- ``no-primary-capture``: the variant route's capture config removed;
- ``no-shadow-capture``: the internal listener without the capture filter;
- ``no-hop``: the copy mirrored straight to the target (no internal listener,
  so no shadow capture either);
- ``upstream-capture``: not a part taken out but the shadow's side done another
  way (bench/compare_parts.py ``ALTERNATIVES``): captured by a Lua upstream
  filter of a cluster of its own and logged by the router's ``upstream_log``,
  no internal listener's pass (the observers refuse its shadows' entries,
  ``bad_tag``, and leave its primaries unpaired: Envoy's count is the figure);
- ``access-log``: not a part of ``on`` but what a capture by Envoy's gRPC access
  log costs at least: ``off`` plus an ``http_grpc`` access log on the connection
  manager (the primary) and as the router's ``upstream_log`` (which also sees the
  shadow's request), request id and response headers, batched on one stream to a
  sink that only counts bytes; no bodies;
- ``access-log-bodies``: ``access-log`` plus the bodies, the shadow's taken by a Lua
  upstream filter of the target's cluster instead of the internal listener's pass
  (the alternative to ``on``'s hop measured in docs/compare.md "Capture").

"added" is a variant's instructions per request minus ``off``'s: what Envoy does
for the comparison of one request (both captures, the shadow's hop). The
observers are checked to have compared every counted request of ``on``. Writes
``compare_instructions.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.access_log import access_log, access_log_bodies, received, start_sink  # noqa: E402
from bench.compare_cost import COMPARE_YAML, Observers  # noqa: E402
from bench.compare_parts import ALTERNATIVES, EDITS, PARTS  # noqa: E402
from bench.module_instructions import WARM_UP, count  # noqa: E402
from bench.testbed import (  # noqa: E402
    LOOPBACK,
    MIRROR,
    PRIMARY,
    RESULTS,
    add_keep_work_argument,
    bench_policy,
    free_port,
    start_envoy,
    upstream_yaml,
    work_folder,
)
from extproc.compare.cli import parse_config_text  # noqa: E402
from extproc.compare.envoy import render_with_capture  # noqa: E402
from extproc.envoy.render import Address, Topology, render  # noqa: E402
from extproc.stack.observer import ObserverProcess  # noqa: E402

VARIANTS = ("off", "on", "on-absent")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=500, help="requests counted per variant (default 500)")
    ap.add_argument("--observers", type=int, default=2, help="observer processes of the `on` variant (default 2)")
    ap.add_argument("--parts", action="store_true", help="also the parts of `on` and the candidates (see above)")
    ap.add_argument("--only", nargs="+", metavar="VARIANT", help="measure only these variants (off is always measured)")
    ap.add_argument("--output", type=Path, default=RESULTS, help="directory for compare_instructions.{md,json}")
    add_keep_work_argument(ap)
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("bench: needs valgrind on PATH (`sudo apt-get install -y valgrind`, a Debian/Ubuntu package)")
    with work_folder("mirror-sampler-compare-instructions-", args.keep_work, "logs and callgrind profiles") as workdir:
        return count_variants(args, workdir)


def count_variants(args: argparse.Namespace, workdir: Path) -> int:
    settings = workdir / "compare.yaml"
    settings.write_text(COMPARE_YAML)
    compare = parse_config_text(COMPARE_YAML, str(settings))
    policy = bench_policy(100)
    (workdir / "on").mkdir()
    started = [
        ObserverProcess(str(settings), workdir / "on" / "compare.db", routes=None, log_path=workdir / f"observer-{i}.log")
        for i in range(args.observers)
    ]
    observers = Observers(started, [Address(LOOPBACK, o.port) for o in started])
    # Ports bound and released at once: nobody listens there.
    absent = [Address(LOOPBACK, free_port()) for _ in range(args.observers)]
    upstream_ports = {PRIMARY: free_port(), MIRROR: free_port()}
    upstream = start_envoy("upstream", upstream_yaml(upstream_ports, 0), workdir, 1)
    sink_port, sink_bytes = free_port(), workdir / "access-log-sink.bytes"
    # The access-log variants log to the sink; --only may leave them out.
    to_sink = args.parts and (not args.only or bool({"access-log", "access-log-bodies"} & set(args.only)))
    sink = start_sink(sink_port, sink_bytes) if to_sink else None
    measured: dict[str, float] = {}
    compared = 0
    try:
        for name in VARIANTS + ((*PARTS, *ALTERNATIVES, "access-log", "access-log-bodies") if args.parts else ()):
            if args.only and name != "off" and name not in args.only:
                continue
            port = free_port()
            topology = Topology(
                listener=Address(LOOPBACK, port),
                admin=Address(LOOPBACK, free_port()),
                backends={n: Address(LOOPBACK, p) for n, p in upstream_ports.items()},
                inline=True,
            )
            if name == "off":
                config = render(policy, topology)
            elif name == "access-log":
                config = yaml.safe_dump(access_log(yaml.safe_load(render(policy, topology)), sink_port))
            elif name == "access-log-bodies":
                config = yaml.safe_dump(access_log_bodies(yaml.safe_load(render(policy, topology)), sink_port, MIRROR))
            elif name in EDITS:
                config = yaml.safe_dump(EDITS[name](yaml.safe_load(render_with_capture(policy, topology, compare, observers.addresses))))
            else:
                config = render_with_capture(policy, topology, compare, observers.addresses if name == "on" else absent)
            before = observers.compared()
            measured[name] = count(name, config, port, args.requests, workdir)
            if name == "on":
                compared = observers.settled() - before
            print(f"  {name:<10} {measured[name]:10.0f} instructions/request", flush=True)
    finally:
        upstream.stop()
        observers.stop()
        if sink is not None:
            sink.terminate()
            sink.wait(timeout=30)
    if sink is not None:
        shipped = received(sink_bytes)
        # At least a request id per request, both sides (the last batch may still be buffered).
        if shipped < args.requests * 2 * 30:
            sys.exit(f"bench: the access log sink received {shipped} bytes for {args.requests} requests (logs in {workdir})")
        print(f"  access-log sink received {shipped} bytes", flush=True)
    # The warm-up's requests are compared too; the counted ones must all have been.
    expected = args.requests + WARM_UP
    if "on" in measured and compared < expected:
        sys.exit(f"bench: the observers compared {compared} of {expected} mirrored requests (logs in {workdir})")
    off = measured["off"]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = (" --parts" if args.parts else "") + (f" --only {' '.join(args.only)}" if args.only else "")
    lines = [
        f"# Envoy instructions per compared request ({stamp})",
        "",
        f"`python bench/compare_instructions.py --requests {args.requests} --observers {args.observers}{parts}`: Envoy `--concurrency 1` "
        f"under callgrind, inline Lua deciding, 100% mirrored, {args.requests} keyed requests on one connection after {WARM_UP} "
        "warm-up ones; user-space instructions of every Envoy thread. `added`: minus `off`.",
        "",
        "| variant | instructions/request | added over off | added, % of off |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {v:.0f} | {v - off:+.0f} | {100 * (v - off) / off:+.1f}% |" for n, v in measured.items()]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "compare_instructions.md").write_text(text)
    document = {"requests": args.requests, "observers": args.observers, "instructions": measured, "compared": compared}
    (args.output / "compare_instructions.json").write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
