"""The stack every benchmark measures, started for one variant: the Envoy
under test, its ext_proc processor (the sampler, or the free processor that
costs nothing), and a second Envoy answering ``direct_response`` as the
upstreams; and the load generators they need (``make bench`` installs them).
Shared by bench/run.py and bench/soak.py; ``work_folder`` and ``--keep-work``
by every bench that writes files."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import hpack
import yaml

from extproc.config.build import build_policy
from extproc.config.settings import Settings
from extproc.core.policy import SAMPLER_CLUSTER, Policy
from extproc.core.responses import Responder
from extproc.envoy.render import Address, Topology
from extproc.stack.children import Child, ChildFailed
from extproc.stack.envoy import EnvoyError, EnvoyProcess
from extproc.stack.sampler import SamplerProcess

RESULTS = Path(__file__).resolve().parent / "results"
FREE_PROCESSOR_SOURCE = Path(__file__).resolve().parent / "free_processor.c"
LOOPBACK = "127.0.0.1"
PERCENT = 50
PRIMARY, MIRROR = "backend", "mirror"
SAMPLER_ENV = {"MIRROR_BACKEND": MIRROR, "MIRROR_PRIMARY": PRIMARY, "MIRROR_PERCENT": str(PERCENT)}
TRANSPORTS = ("http2", "grpcio")
DEFAULT_TRANSPORT = "http2"
HEY_CONNECTIONS = 10
EXT_PROC_STATS = "http.ingress_http.ext_proc."
LOAD_GENERATORS = ("wrk", "hey")


def check_tools() -> None:
    """The load generators are on PATH, or exit saying how to get them: a
    benchmark never installs anything by itself (``make bench`` does)."""
    missing = [t for t in LOAD_GENERATORS if shutil.which(t) is None]
    if missing:
        sys.exit(
            f"bench: needs {' and '.join(missing)} on PATH: `make bench` / `make soak` install them "
            f"(apt-get), or `sudo apt-get install -y {' '.join(missing)}` (Debian/Ubuntu packages)"
        )


def add_keep_work_argument(parser: argparse.ArgumentParser) -> None:
    """``--keep-work``, the same in every bench (``work_folder``'s ``keep``)."""
    parser.add_argument(
        "--keep-work",
        action="store_true",
        help="keep the work folder (logs, configurations, stores, profiles) after a successful run; a failed run's is always kept",
    )


@contextlib.contextmanager
def work_folder(prefix: str, keep: bool, what: str = "logs") -> Iterator[Path]:
    """A new folder in the temporary directory for one run's files. Removed when
    the block ends normally, unless ``keep``; kept when it raises (an exception,
    KeyboardInterrupt, or ``sys.exit`` with a message or a non-zero status), so
    that a failed run can be read. Where it is kept, stderr says so (``what``
    names its contents)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    failed = True
    try:
        yield folder
        failed = False
    except SystemExit as e:
        failed = e.code not in (None, 0)
        raise
    finally:
        if failed or keep:
            print(f"bench: {what} kept in {folder}", file=sys.stderr, flush=True)
        else:
            try:
                shutil.rmtree(folder)
            except OSError as error:
                print(f"bench: could not remove the work folder {folder}: {error}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def bench_policy(percent: int = PERCENT) -> Policy:
    return build_policy(Settings.load({**SAMPLER_ENV, "MIRROR_PERCENT": str(percent)}))


def upstream_yaml(ports: dict[str, int], admin_port: int) -> str:
    """A second Envoy answering 200 on one listener per backend."""
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }
    listeners = []
    for name, port in ports.items():
        manager = {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": name,
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": name,
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": f"{name}\n"}}}],
                    }
                ]
            },
            "http_filters": [router],
        }
        listeners.append(
            {
                "name": name,
                "address": {"socket_address": {"address": LOOPBACK, "port_value": port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}],
            }
        )
    admin = {"address": {"socket_address": {"address": LOOPBACK, "port_value": admin_port}}}
    return yaml.safe_dump({"admin": admin, "static_resources": {"listeners": listeners}})


def build_free_processor(workdir: Path) -> tuple[Path | None, str]:
    """Compile bench/free_processor.c with the system compiler: (binary, "") or (None, why not)."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None, "no C compiler (`cc`) on this machine"
    binary = workdir / "free_processor"
    done = subprocess.run([cc, "-O2", "-o", str(binary), str(FREE_PROCESSOR_SOURCE)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return None, f"`cc -O2 bench/free_processor.c` failed: {done.stderr.strip()[:300]}"
    return binary, ""


def free_processor_answers(policy: Policy) -> list[str]:
    """The free processor's arguments after the port, hex: response HEADERS
    block, the sampler's answer "mirror slot 0" as a gRPC message, the OK
    trailers block, and the sampler's answer "no mirror" (streams alternate
    between the two answers, so Envoy mirrors the same 50% as with the sampler)."""
    rule = policy.rules[0]
    target = rule.mirrors[0]
    responder = Responder(policy)

    def message(payload: bytes) -> str:
        return (b"\x00" + len(payload).to_bytes(4, "big") + payload).hex()

    # Never-indexed literals, as the sampler sends them: no dynamic table entries in Envoy.
    headers = hpack.Encoder().encode([(b":status", b"200", True), (b"content-type", b"application/grpc", True)])
    trailers = hpack.Encoder().encode([(b"grpc-status", b"0", True)])
    sampled = responder.response(((target.slot, target.backend),))
    unsampled = responder.response(())
    return [bytes(headers).hex(), message(sampled), bytes(trailers).hex(), message(unsampled)]


@dataclass
class Variant:
    name: str
    envoy_yaml: Callable[[Policy, Topology], str]
    processor: str = ""  # "": none; "sampler"; "free"
    workers: int = 1
    transport: str = DEFAULT_TRANSPORT
    percent: int = PERCENT  # the sampler's; the Envoy configuration is rendered from bench_policy(percent)
    # Each process in a session of its own; False: in this bench's session, as `up` starts its children.
    own_session: bool = False


def start_envoy(name: str, config: str, workdir: Path, concurrency: int) -> EnvoyProcess:
    path = workdir / f"{name}.yaml"
    path.write_text(config)
    try:
        return EnvoyProcess(path, workdir, name=name, extra_args=("--concurrency", str(concurrency))).start()
    except EnvoyError as e:
        sys.exit(f"bench: {e}")


def start_sampler(variant: Variant, workdir: Path) -> SamplerProcess:
    env = {
        **SAMPLER_ENV,
        "MIRROR_PERCENT": str(variant.percent),
        "MIRROR_LISTEN": f"{LOOPBACK}:0",
        "MIRROR_WORKERS": str(variant.workers),
        "MIRROR_TRANSPORT": variant.transport,
        "MIRROR_SHUTDOWN_GRACE": "1",
    }
    return SamplerProcess(env, name=variant.name, log_path=workdir / f"{variant.name}.log", timeout=60, own_session=variant.own_session)


def start_free_processor(binary: Path, policy: Policy, workdir: Path, own_session: bool = False) -> tuple[Child, int]:
    argv = [str(binary), "0", *free_processor_answers(policy)]
    child = Child("free-processor", argv, log_path=workdir / "free-processor.log", own_session=own_session)
    try:
        line = child.wait_line(lambda s: s.startswith("serving port="), timeout=10)
    except ChildFailed:
        child.stop()
        raise
    return child, int(line.partition("=")[2])


@dataclass
class Stack:
    variant: Variant
    envoy: EnvoyProcess
    url: str
    processor: Child | None = None  # the sampler or the free processor

    @property
    def processor_pid(self) -> int | None:
        return self.processor.pid if self.processor is not None else None

    def stop(self) -> None:
        self.envoy.stop()
        if self.processor is not None:
            self.processor.stop()


def start_stack(
    variant: Variant, policy: Policy, upstreams: dict[str, int], workdir: Path, concurrency: int, free_binary: Path | None = None
) -> Stack:
    processor: Child | None = None
    processor_port = 9  # unused: no processor
    if variant.processor == "sampler":
        sampler = start_sampler(variant, workdir)
        processor, processor_port = sampler, sampler.port
    elif variant.processor == "free":
        assert free_binary is not None
        processor, processor_port = start_free_processor(free_binary, policy, workdir, variant.own_session)
    port = free_port()
    topology = Topology(
        listener=Address(LOOPBACK, port),
        admin=Address(LOOPBACK, 0),
        samplers=(Address(LOOPBACK, processor_port),),
        backends={n: Address(LOOPBACK, p) for n, p in upstreams.items()},
    )
    try:
        envoy = EnvoyProcess(write(workdir / f"envoy-{variant.name}.yaml", variant.envoy_yaml(policy, topology)), workdir,
                             name=f"envoy-{variant.name}", extra_args=("--concurrency", str(concurrency)),
                             own_session=variant.own_session).start()  # fmt: skip
    except EnvoyError as e:
        if processor is not None:
            processor.stop()
        sys.exit(f"bench: {e}")
    stack = Stack(variant, envoy, f"http://{LOOPBACK}:{port}/", processor)
    if processor is not None:
        deadline = time.monotonic() + 30
        while envoy.stats().get(f"cluster.{SAMPLER_CLUSTER}.membership_healthy", 0) < 1:
            if time.monotonic() > deadline:
                stack.stop()
                raise RuntimeError(f"{variant.name}: the processor never became healthy in Envoy")
            time.sleep(0.2)
    return stack


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def hey_command(rate: int, seconds: float, connections: int = HEY_CONNECTIONS) -> list[str]:
    """hey at about ``rate`` req/s in total (-q is per connection)."""
    return ["hey", "-z", f"{max(1, round(seconds))}s", "-c", str(connections), "-q", str(max(1, rate // connections))]


def primary_requests(stats: Mapping[str, int]) -> int:
    return stats.get(f"cluster.{PRIMARY}.upstream_rq_total", 0)
