"""Soak: the local gateway under a steady load for a few minutes.

    .venv/bin/python bench/soak.py [--minutes M] [--rate R]   (or `make soak`)

Reports, at the start and at the end, the sampler's resident memory and open
file descriptors and Envoy's ext_proc error counters, and exits non-zero when
growth passes the stated bounds. Bounded: loopback only, a fixed rate and
duration, everything stopped afterwards.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run import ensure_tools, rss_mib  # noqa: E402

from extproc.config import Settings  # noqa: E402
from extproc.gateway import Gateway  # noqa: E402

# Stated bounds for a run at the default rate and length. Memory: the sampler
# is known to grow about 110 bytes per request in native memory (see
# bench/PROFILE.md); the bound allows that, not a leak of Python objects.
MAX_RSS_GROWTH_MIB = 24.0
MAX_FD_GROWTH = 16
EXT_PROC_ERRORS = ("streams_failed", "failure_mode_allowed", "message_timeouts", "spurious_msgs_received")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def snapshot(gw: Gateway) -> dict[str, float]:
    sampler = gw.samplers[0]
    assert sampler is not None
    stats = gw.stats()
    out: dict[str, float] = {"rss_mib": rss_mib(sampler.pid), "fds": open_fds(sampler.pid)}
    for name in EXT_PROC_ERRORS:
        out[name] = stats.get(f"http.ingress_http.ext_proc.{name}", 0)
    out["requests"] = stats.get("http.ingress_http.downstream_rq_total", 0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--rate", type=int, default=500, help="requests per second (hey, 10 connections)")
    args = ap.parse_args(argv)
    ensure_tools()
    with tempfile.TemporaryDirectory(prefix="mirror-sampler-soak-") as tmp:
        settings = Settings.load({"MIRROR_BACKEND": "shadow", "MIRROR_PERCENT": "50"})
        gw = Gateway(settings, listener_port=0, admin_port=0, log_dir=Path(tmp))
        gw.start()
        try:
            start = snapshot(gw)
            seconds = int(args.minutes * 60)
            connections = 10
            subprocess.run(
                ["hey", "-z", f"{seconds}s", "-c", str(connections), "-q", str(max(1, args.rate // connections)), gw.url + "/soak"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            end = snapshot(gw)
        finally:
            gw.stop()
    print(f"soak: {args.minutes:g} min at {args.rate} req/s, {os.cpu_count()} cores")
    print(f"{'':<24}{'start':>12}{'end':>12}")
    for name in start:
        print(f"{name:<24}{start[name]:>12.1f}{end[name]:>12.1f}")
    failures = []
    if end["rss_mib"] - start["rss_mib"] > MAX_RSS_GROWTH_MIB:
        failures.append(f"sampler RSS grew {end['rss_mib'] - start['rss_mib']:.1f} MiB (bound {MAX_RSS_GROWTH_MIB} MiB)")
    if end["fds"] - start["fds"] > MAX_FD_GROWTH:
        failures.append(f"sampler open files grew by {end['fds'] - start['fds']:.0f} (bound {MAX_FD_GROWTH})")
    for name in EXT_PROC_ERRORS:
        if end[name] > start[name]:
            failures.append(f"Envoy ext_proc.{name} rose by {end[name] - start[name]:.0f} (bound 0)")
    for failure in failures:
        print(f"soak: FAIL: {failure}")
    print("soak: within bounds" if not failures else "soak: out of bounds")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
