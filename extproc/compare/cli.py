"""`mirror-sampler compare`: capture (the observer), report, show."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from ..config.addresses import split_address
from ..config.errors import ConfigError
from ..config.manifest_yaml import read_documents
from ..config.manifests import SWITCH_KIND, parse_manifests, sampler_document
from ..config.source import read_config_file
from ..priority import MAX_NICE, lower_cpu_priority
from .config import CompareConfig, mirror_targets, parse_compare
from .judge import Comparison
from .store import CompareStore

DEFAULT_DB = "mirror-sampler-compare.db"
# How far the observer steps back for Envoy on shared cores (see cmd_capture); 19 is
# the least favoured priority there is.
DEFAULT_NICE = 10
OBSERVER_PORT = 50061
DEFAULT_LISTEN = f"127.0.0.1:{OBSERVER_PORT}"
ROUTES_HELP = (
    "the HTTPRoutes (default $MIRROR_CONFIG): rule ids and targets are checked against them, targets default to the rule's mirrors"
)


def slot_count() -> int:
    """How many mirrors a rule may have: the sampler's slot settings (MIRROR_SLOTS...), as the sampler reads them."""
    from ..config.settings import load_slot_headers

    return load_slot_headers(os.environ).count


def rule_mirrors(routes: str | None) -> dict[str, tuple[str, ...]] | None:
    """Each rule id's mirror targets, from the HTTPRoutes the sampler reads (None: not given)."""
    if not routes:
        return None
    from ..config.settings import Settings, load_slot_headers, slot_environment
    from ..config.source import load_policy

    settings = Settings.load({"MIRROR_CONFIG": routes, **slot_environment(load_slot_headers(os.environ))})
    return mirror_targets(load_policy(settings).routes)


def load_config(path: str | None, routes: str | None = None, reading: bool = False) -> CompareConfig:
    """The compare settings: a MirrorSampler document's ``spec.compare`` (in
    the routes' own file, or a file of its own), or a bare ``compare:``
    mapping; checked against the routes when they are known (``reading``: see
    parse_compare)."""
    return parse_config_text(read_config(path, once=True), path, routes, slot_count(), reading) if path else CompareConfig()


def read_config(path: str, *, once: bool = False) -> str:
    """``once``: for a command that reads it once (config.source.read_config_file)."""
    return read_config_file(path, "--config", once=once)


def parse_config_text(text: str, path: str, routes: str | None = None, slots: int = 2, reading: bool = False) -> CompareConfig:
    """Read as strictly as the sampler reads its file (duplicate keys with
    their lines, one way of telling a YAML error). When the file holds the
    HTTPRoutes too (and no other --routes is given), the sampler's parser
    reads all of it (with ``slots`` slot headers, the sampler's MIRROR_SLOTS):
    the compare rules are checked against its own routes."""
    documents = read_documents(text, path)
    if routes in (None, "", path) and any(isinstance(doc, dict) and doc.get("kind") == "HTTPRoute" for doc, _ in documents):
        parsed = parse_manifests(text, path, slots)
        if parsed.problems:
            raise ConfigError(parsed.problems)
        if parsed.compare is None:
            raise ConfigError([f"{path}: no MirrorSampler document with spec.compare"])
        return parsed.compare
    mirrors = rule_mirrors(routes)
    for i, (doc, duplicates) in enumerate(documents):
        where = f"{path} (document {i + 1})"
        if isinstance(doc, dict) and doc.get("kind") == SWITCH_KIND:
            # The whole document as the sampler checks it (apiVersion, spec's fields, duplicate keys).
            sampler_doc, found = sampler_document(doc, where, duplicates)
            data, at = (sampler_doc.compare if sampler_doc else None), "spec.compare"
            if sampler_doc is not None and data is None:
                continue  # a kill switch alone
        elif isinstance(doc, dict) and "compare" in doc:
            data, at = doc["compare"], "compare"
            found = [f"{where}: {dup.path}: {dup.message}" for dup in duplicates]
            found += [f"{where}: {key}: unknown field; a compare settings document has only compare" for key in doc if key != "compare"]
        else:
            continue
        try:
            config = parse_compare(data, where, mirrors, at, reading)
        except ConfigError as e:
            found += e.problems
        if found:
            raise ConfigError(found)
        return config
    raise ConfigError([f"--config {path}: no MirrorSampler document with spec.compare, and no compare: mapping"])


def cmd_capture(args: argparse.Namespace) -> int:
    from prometheus_client import start_http_server

    from ..server import logs
    from .capture import ObserverSettings, serve
    from .metrics import CompareMetrics

    # The text the settings in force come from: the watch judges later contents against it.
    text = read_config(args.config) if args.config else None
    slots = slot_count()
    config = parse_config_text(text, args.config, args.routes, slots) if text is not None else CompareConfig()
    # The schema is created here: a path SQLite cannot use fails at start-up.
    _open_store(args.db, config, create=True).close()
    try:
        host, port = split_address(args.listen)
        metrics_address = split_address(args.metrics_listen) if args.metrics_listen else None
    except ValueError as e:
        raise ConfigError([f"--listen/--metrics-listen: {e}"]) from None
    if not 0 <= args.nice <= MAX_NICE:
        raise ConfigError([f"--nice: {args.nice} is not between 0 and {MAX_NICE}"])
    # Where the observer shares cores with Envoy (up, docker compose, a node's
    # other pods in one cgroup), its batches must not delay a primary's answer:
    # the scheduler serves Envoy first.
    priority = lower_cpu_priority(args.nice)
    logs.configure(args.log_level, "json", sys.stdout)
    log = logs.get("compare")
    if priority.group_unchanged is not None:
        log.warning("compare_session_priority_unchanged", reason=priority.group_unchanged)
    if priority.idle_unchanged is not None:
        log.warning("compare_idle_policy_unchanged", reason=priority.idle_unchanged)
    metrics = CompareMetrics()
    metrics.declare(config)
    metrics_port = None
    if metrics_address is not None:
        server, _ = start_http_server(metrics_address[1], metrics_address[0], registry=metrics.registry)
        metrics_port = server.server_port

    def ready(bound: int) -> None:
        log.info(
            "compare_serving",
            port=bound,
            metrics_port=metrics_port,
            db=args.db,
            rules=sorted(config.rules),
            nice=priority.niceness,
            session_nice=priority.group_niceness,
            idle=priority.idle,
        )

    settings = ObserverSettings(
        host,
        port,
        config,
        args.db,
        parse=(lambda content: parse_config_text(content, args.config, args.routes, slots)) if args.config else None,
        watched=args.config or None,
        built_from=text,
    )
    asyncio.run(serve(settings, metrics, ready))
    return 0


def register(sub: Any) -> None:
    """Adds ``compare`` to the top-level subcommands."""
    compare = sub.add_parser("compare", help="compare mirrored responses with the primary's (docs/compare.md)")
    actions = compare.add_subparsers(dest="compare_command", required=True)
    capture = actions.add_parser("capture", help="run the observer Envoy's gRPC access log sends the captured responses to")
    capture.add_argument(
        "--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT", help=f"gRPC address (default {DEFAULT_LISTEN}; port 0 picks one)"
    )
    capture.add_argument("--metrics-listen", metavar="HOST:PORT", help="serve Prometheus /metrics here")
    capture.add_argument(
        "--db", default=DEFAULT_DB, metavar="FILE", help=f"SQLite file, shared by every observer process (default {DEFAULT_DB})"
    )
    capture.add_argument("--config", metavar="FILE", help="YAML with the compare settings (a MirrorSampler document's spec.compare)")
    capture.add_argument("--routes", default=os.environ.get("MIRROR_CONFIG"), metavar="FILE", help=ROUTES_HELP)
    capture.add_argument(
        "--nice",
        type=int,
        default=DEFAULT_NICE,
        metavar="N",
        help=f"lower this process's CPU priority by N (0 to {MAX_NICE}; default {DEFAULT_NICE}), and its session group's where it "
        "leads its session (Linux autogroups), and take Linux's SCHED_IDLE policy: where it shares cores with Envoy, Envoy is "
        "served first (0 keeps it all)",
    )
    capture.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    capture.set_defaults(func=cmd_capture)

    report = actions.add_parser("report", help="per rule and target: matches, differing fields with their noise, status pairs, latency")
    report.add_argument(
        "--db",
        action="append",
        metavar="FILE",
        help=f"the observers' SQLite file (default {DEFAULT_DB}); repeat for several machines",
    )
    report.add_argument("--config", metavar="FILE", help="the compare settings the observers run with (secondary, margin)")
    report.add_argument("--routes", default=os.environ.get("MIRROR_CONFIG"), metavar="FILE", help=ROUTES_HELP)
    report.add_argument("--json", action="store_true", help="print JSON")
    report.add_argument("--html", metavar="FILE", help="also write a static HTML report (one file, no server)")
    report.set_defaults(func=cmd_report)

    envoy = actions.add_parser(
        "envoy-config",
        help="add the capture points to a configuration `mirror-sampler envoy-config` wrote",
        description="Reads the full configuration `envoy-config` rendered (not --snippet) and writes it with the capture filter, "
        "the per-route capture settings of the compared rules, the internal capture listener and the observer clusters.",
    )
    envoy.add_argument("envoy_config", metavar="ENVOY_YAML", help="the output of `mirror-sampler envoy-config`")
    envoy.add_argument("--config", required=True, metavar="FILE", help="the compare settings: which rules and targets")
    envoy.add_argument("--routes", default=os.environ.get("MIRROR_CONFIG"), metavar="FILE", help=ROUTES_HELP)
    envoy.add_argument(
        "--observer", action="append", metavar="HOST:PORT", help=f"an observer's address (repeatable; default {DEFAULT_LISTEN})"
    )
    envoy.add_argument("--output", "-o", help="write here instead of standard output")
    envoy.set_defaults(func=cmd_envoy_config)

    show = actions.add_parser("show", help="one request's primary and shadows side by side, differing fields marked")
    show.add_argument("request_id", metavar="REQUEST_ID", help="the request's x-request-id")
    show.add_argument("--db", action="append", metavar="FILE", help=f"the observers' SQLite file (default {DEFAULT_DB}); repeatable")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=cmd_show)


def cmd_envoy_config(args: argparse.Namespace) -> int:
    from ..envoy.render import Address, to_yaml
    from .envoy import add_capture

    config = load_config(args.config, args.routes)
    if not config.rules:
        raise ConfigError([f"--config {args.config}: no rule to compare"])
    try:
        observers = [Address(*split_address(o)) for o in args.observer or [DEFAULT_LISTEN]]
        rendered = yaml.safe_load(Path(args.envoy_config).read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConfigError([f"--observer: {e}"]) from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError([f"{args.envoy_config}: cannot read: {e}"]) from None
    if not isinstance(rendered, dict) or "staticResources" not in rendered:
        raise ConfigError([f"{args.envoy_config}: not the output of `mirror-sampler envoy-config` (no staticResources)"])
    marker = _marker_header(args.routes)
    text = to_yaml(add_capture(rendered, config, marker, observers))
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def _marker_header(routes: str | None) -> str:
    """The header every mirrored copy carries with its rule id (a sampler setting)."""
    from ..config.settings import Settings
    from ..config.source import load_policy

    environ = dict(os.environ)
    if routes:
        environ["MIRROR_CONFIG"] = routes
    return load_policy(Settings.load(environ)).slot_headers.marker


def _open_store(path: str, config: CompareConfig, *, create: bool = False) -> CompareStore:
    """The store, or a clear error naming --db (at start-up, never a traceback)."""
    if not create and not Path(path).is_file():
        raise ConfigError([f"--db {path}: no such file (run `mirror-sampler compare capture --db {path}` first)"])
    try:
        return CompareStore(path, config)
    except sqlite3.Error as e:
        raise ConfigError([f"--db {path}: cannot open as SQLite: {e}"]) from None


def _comparisons(paths: list[str], config: CompareConfig, request_id: str | None = None) -> list[Comparison]:
    """From one file per machine, or several: their rows are independent."""
    out: list[Comparison] = []
    for path in paths:
        store = _open_store(path, config)
        try:
            out += store.comparisons(request_id)
        finally:
            store.close()
    return out


def cmd_report(args: argparse.Namespace) -> int:
    from .report import render_html, render_text, report_data
    from .summary import summarize

    config = load_config(args.config, args.routes, reading=True)
    summaries = summarize(_comparisons(args.db or [DEFAULT_DB], config), config)
    data = report_data(summaries, datetime.now(UTC).isoformat(timespec="seconds"))
    if args.html:
        Path(args.html).write_text(render_html(data), encoding="utf-8")
    sys.stdout.write(json.dumps(data, indent=2) + "\n" if args.json else render_text(summaries))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .report import render_show, show_data

    found = _comparisons(args.db or [DEFAULT_DB], CompareConfig(), args.request_id)
    sys.stdout.write(json.dumps(show_data(args.request_id, found), indent=2) + "\n" if args.json else render_show(args.request_id, found))
    return 0 if found else 1
