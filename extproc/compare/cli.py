"""`mirror-sampler compare`: capture (the observer), report, show."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from ..config.addresses import split_address
from ..config.errors import ConfigError
from .config import CompareConfig, parse_compare

DEFAULT_DB = "mirror-sampler-compare.db"
DEFAULT_LISTEN = "127.0.0.1:50061"


def load_config(path: str | None) -> CompareConfig:
    """A file with a MirrorSampler document whose spec has ``compare``, or a bare ``compare:`` mapping."""
    if not path:
        return CompareConfig()
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text(encoding="utf-8")) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError([f"--config {path}: cannot read: {e}"]) from None
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "MirrorSampler":
            return parse_compare((doc.get("spec") or {}).get("compare"), path)
        if isinstance(doc, dict) and "compare" in doc:
            return parse_compare(doc["compare"], path)
    raise ConfigError([f"--config {path}: no MirrorSampler document with spec.compare, and no compare: mapping"])


def cmd_capture(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from ..server import logs
    from .capture import serve
    from .metrics import CompareMetrics

    config = load_config(args.config)
    try:
        host, port = split_address(args.listen)
        metrics_address = split_address(args.metrics_listen) if args.metrics_listen else None
    except ValueError as e:
        raise ConfigError([f"--listen/--metrics-listen: {e}"]) from None
    logs.configure(args.log_level, "json", sys.stdout)
    log = logs.get("compare")
    metrics = CompareMetrics()
    metrics_port = None
    if metrics_address is not None:
        server, _ = start_http_server(metrics_address[1], metrics_address[0], registry=metrics.registry)
        metrics_port = server.server_port

    def ready(bound: int) -> None:
        log.info("compare_serving", port=bound, metrics_port=metrics_port, db=args.db, rules=sorted(config.rules))

    asyncio.run(serve(host, port, config, args.db, metrics, ready))
    return 0


def register(sub: Any) -> None:
    """Adds ``compare`` to the top-level subcommands."""
    compare = sub.add_parser("compare", help="compare mirrored responses with the primary's (docs/compare.md)")
    actions = compare.add_subparsers(dest="compare_command", required=True)
    capture = actions.add_parser("capture", help="run the observer Envoy's capture filters stream responses to")
    capture.add_argument(
        "--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT", help=f"gRPC address (default {DEFAULT_LISTEN}; port 0 picks one)"
    )
    capture.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus /metrics here")
    capture.add_argument(
        "--db", default=DEFAULT_DB, metavar="FILE", help=f"SQLite file, shared by every observer process (default {DEFAULT_DB})"
    )
    capture.add_argument("--config", metavar="FILE", help="YAML with the compare settings (a MirrorSampler document's spec.compare)")
    capture.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    capture.set_defaults(func=cmd_capture)
    for name, func in (("report", cmd_report), ("show", cmd_show)):
        del name, func  # added by the report step


def cmd_report(args: argparse.Namespace) -> int:
    raise NotImplementedError


def cmd_show(args: argparse.Namespace) -> int:
    raise NotImplementedError


def _dump(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False)
