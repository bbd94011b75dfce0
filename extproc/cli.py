"""`mirror-sampler`: serve, check-config, explain, envoy-config, up, convert.

Thin: each command parses its flags, calls the package, prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from . import __version__
from .config.addresses import split_peer_address
from .config.errors import ConfigError
from .config.settings import DEFAULT_INLINE, ENVOY, OPTIONS, SAMPLER, EnvoySettings, Settings, load_slot_headers, parse_inline
from .module.build import DEFAULT_BUILDER_IMAGE
from .server import logs

if TYPE_CHECKING:
    from .compare.config import CompareConfig
    from .core.policy import Policy
    from .envoy.render import Address, Topology

EXIT_CONFIG = 2


def _options_parser(scope: str, title: str) -> argparse.ArgumentParser:
    """The flags of one scope of the option table, each also an environment variable."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group(title)
    for opt in OPTIONS:
        if opt.scope != scope or not opt.flag:
            continue
        dest = f"opt_{opt.name}"
        default = f", default {opt.default!r}" if opt.default else ""
        if opt.is_switch:
            group.add_argument(opt.flag, dest=dest, action="store_const", const="on", default=None, help=f"{opt.help} [{opt.env}{default}]")
        elif opt.value_optional:
            group.add_argument(
                opt.flag, dest=dest, nargs="?", const="on", default=None, metavar="ENGINE", help=f"{opt.help} [{opt.env}{default}]"
            )
        else:
            group.add_argument(opt.flag, dest=dest, default=None, metavar=opt.env, help=f"{opt.help} [{opt.env}{default}]")
    return parent


def _overrides(args: argparse.Namespace) -> dict[str, str | None]:
    return {opt.name: getattr(args, f"opt_{opt.name}", None) for opt in OPTIONS}


def settings_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    return Settings.load(os.environ if environ is None else environ, _overrides(args))


def envoy_settings_from(args: argparse.Namespace) -> EnvoySettings:
    return EnvoySettings.load(os.environ, _overrides(args))


def _report(e: ConfigError) -> int:
    print(f"configuration error ({len(e.problems)} problem{'s' if len(e.problems) != 1 else ''}):", file=sys.stderr)
    for p in e.problems:
        print(f"  - {p}", file=sys.stderr)
    return EXIT_CONFIG


def cmd_serve(args: argparse.Namespace) -> int:
    from .server.workers import serve

    settings = settings_from(args)
    logs.configure(settings.log_level, settings.log_format)
    try:
        return serve(settings)
    except OSError as e:
        print(f"mirror-sampler: {e}", file=sys.stderr)
        return 1


def cmd_check_config(args: argparse.Namespace) -> int:
    from .config.build import parse, policy_from
    from .config.source import read_manifest
    from .config.summary import summarize

    settings = settings_from(args)
    parsed = parse(settings, read_manifest(settings, once=True))
    policy = policy_from(settings, parsed)
    rules = policy.rules
    mirrors = sum(len(r.mirrors) for r in rules)
    print(f"configuration OK: {len(policy.routes)} route(s), {len(rules)} rule(s), {mirrors} mirror target(s)")
    print(summarize(policy, parsed.skipped if parsed else (), parsed.compare if parsed else None), end="")
    return 0


def _pairs(values: Sequence[str] | None, flag: str) -> list[tuple[str, str]]:
    out = []
    for v in values or ():
        name, sep, value = v.partition("=")
        if not sep or not name:
            raise ConfigError([f"{flag}: must be NAME=VALUE, got {v!r}"])
        out.append((name, value))
    return out


def cmd_explain(args: argparse.Namespace) -> int:
    from .config.source import load_policy
    from .core.explain import BulkInputError, explain, explain_bulk, render_line, render_text, request_headers

    policy = load_policy(settings_from(args))
    headers, cookies = _pairs(args.header, "--header"), _pairs(args.cookie, "--cookie")
    if args.bulk is None:
        result = explain(policy, request_headers(headers, cookies, args.path, args.host, args.method), rule_id=args.rule_id)
        print(json.dumps(result, indent=2) if args.json else render_text(result))
        return 0
    # Bytes in, so that keys which are not UTF-8 reach the decision as they are.
    with contextlib.ExitStack() as stack:
        stream = sys.stdin.buffer if args.bulk == "-" else stack.enter_context(_open_input(args.bulk))
        results = explain_bulk(
            policy, stream, headers=headers, cookies=cookies, path=args.path, host=args.host, method=args.method, rule_id=args.rule_id
        )
        try:
            for r in results:
                sys.stdout.write((json.dumps(r) if args.json else render_line(r)) + "\n")
        except BulkInputError as e:
            raise ConfigError([f"explain --bulk {args.bulk}: {e}"]) from None
        except BrokenPipeError:  # `| head`: the reader has seen enough
            sys.stderr.close()
    return 0


def _open_input(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as e:
        raise ConfigError([f"explain --bulk: cannot read {path}: {e.strerror}"]) from None


def _address(text: str, what: str) -> Address:
    from .envoy.render import Address

    try:
        return Address(*split_peer_address(text))
    except ValueError as e:
        raise ConfigError([f"{what}: {e}"]) from None


def cmd_envoy_config(args: argparse.Namespace) -> int:
    from .config.build import parse, policy_from
    from .config.source import read_manifest
    from .envoy.lua import unsupported
    from .envoy.render import Address, Topology, backend_ports, compose_topology, render

    envoy = envoy_settings_from(args)
    settings = settings_from(args)
    parsed = parse(settings, read_manifest(settings, once=True))
    policy = policy_from(settings, parsed)
    compare = parsed.compare if parsed is not None and parsed.compare is not None and parsed.compare.rules else None
    if envoy.inline == "lua" and unsupported(policy):
        raise ConfigError(unsupported(policy))
    if args.target == "compose":
        topology = compose_topology(policy)
    else:
        backends = {}
        for name, value in _pairs(args.backend_address, "--backend-address"):
            backends[name] = _address(value, "--backend-address")
        samplers = tuple(_address(s, "--sampler") for s in args.sampler or ["127.0.0.1:50051"])
        topology = Topology(backends=backends, samplers=samplers)
        for name, port in backend_ports(policy).items():
            backends.setdefault(name, Address("127.0.0.1", port or 80))
    topology = replace(
        topology,
        listener=Address(topology.listener.host, envoy.listener_port),
        admin=Address(topology.admin.host, envoy.admin_port),
        message_timeout_ms=envoy.message_timeout_ms,
        inline=bool(envoy.inline),
        sampler_ca=envoy.sampler_ca,
        sampler_cert=envoy.sampler_client_cert,
        sampler_key=envoy.sampler_client_key,
    )
    if args.observer and compare is None:
        raise ConfigError(["--observer: the configuration has no spec.compare rule (a MirrorSampler document's spec.compare)"])
    module_path = _module_path(args) if envoy.inline == "module" else None
    if compare is not None:
        text = _render_with_capture(policy, topology, compare, args, module_path)
    elif module_path is not None:
        from .envoy.module import render_module

        text = render_module(policy, topology, module_path, snippet_only=args.snippet)
    else:
        text = render(policy, topology, snippet_only=args.snippet)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def _render_with_capture(
    policy: Policy, topology: Topology, compare: CompareConfig, args: argparse.Namespace, module_path: str | None
) -> str:
    """The configuration with the capture points of spec.compare (docs/compare.md), for
    every engine, whole or as a snippet; the observers on this machine, or compose's."""
    from .compare.cli import OBSERVER_PORT
    from .compare.envoy import CAPTURE_SERVICE_CLUSTER, render_with_capture
    from .envoy.render import Address

    if args.observer:
        observers = [_address(o, "--observer") for o in args.observer]
    elif args.target == "compose":
        # The observer's compose service is named like its cluster, as the sampler's is.
        observers = [Address(CAPTURE_SERVICE_CLUSTER, OBSERVER_PORT)]
    else:
        observers = [Address("127.0.0.1", OBSERVER_PORT)]
    return render_with_capture(policy, topology, compare, observers, module_path=module_path, snippet_only=args.snippet)


def _module_path(args: argparse.Namespace) -> str:
    """Where Envoy loads the module from: built here for the Envoy on this machine (checked
    first), or where docker compose builds it for the Envoy image."""
    from .envoy.module import COMPOSE_MODULE_PATH
    from .module.support import module_for_installed_envoy

    if args.target == "compose":
        # Built inside compose for the Envoy image (docker-compose.module.yml), whose pinned
        # version tests/unit/test_compose_module.py checks against the supported ones.
        return COMPOSE_MODULE_PATH
    return module_for_installed_envoy()


def cmd_up(args: argparse.Namespace) -> int:
    from .stack.up import run_up

    envoy = envoy_settings_from(args)
    return run_up(settings_from(args, up_environ(args)), envoy, view=not args.no_view)


def up_environ(args: argparse.Namespace) -> dict[str, str]:
    """`up` with nothing configured runs the Envoy Gateway mirroring example."""
    environ = dict(os.environ)
    configured = args.opt_config or args.opt_backend or environ.get("MIRROR_CONFIG") or environ.get("MIRROR_BACKEND")
    if not configured:
        from .stack.up import DEFAULT_CONFIG

        environ["MIRROR_CONFIG"] = str(DEFAULT_CONFIG)
    return environ


def _option(name: str, given: str | None, parse: Callable[[str], Any] | None = None) -> Any:
    """One option of the table, from its flag, its variable or its default,
    validated as everywhere else (convert needs no mirror configured), or by ``parse``."""
    opt = next(o for o in OPTIONS if o.name == name)
    raw = given if given is not None else os.environ.get(opt.env) or opt.default
    try:
        return (parse or opt.parse)(raw)
    except ValueError as e:
        raise ConfigError([f"{opt.flag if given is not None else opt.env}: {e}"]) from None


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import ConvertError

    paths = [Path(f) for f in args.files]
    slot_flags = {"slots": args.opt_slots, "slot_prefix": args.opt_slot_prefix, "marker_header": args.opt_marker_header}
    shared = {
        "slot_headers": load_slot_headers(os.environ, slot_flags),
        "message_timeout_ms": _option("message_timeout_ms", args.opt_message_timeout_ms),
    }
    engine = _convert_engine(args.source, args.opt_inline, bool(args.module_path))
    try:
        if args.source == "envoy":
            from .convert.envoy import convert_envoy

            envoy = envoy_settings_from(args)
            _address(args.sampler, "--sampler")
            module_path = None
            if engine == "module":
                from .module.support import module_for_installed_envoy

                module_path = args.module_path or module_for_installed_envoy()
            conversion = convert_envoy(
                paths,
                module_path=module_path,
                lua=engine == "lua",
                decision_environ=os.environ,
                sampler=args.sampler,
                sampler_ca=envoy.sampler_ca,
                sampler_client_cert=envoy.sampler_client_cert,
                sampler_client_key=envoy.sampler_client_key,
                output_dir=Path(args.output),
                **shared,
            )
        else:
            from .convert.kubernetes import SamplerDeployment

            deployment = SamplerDeployment(
                namespace=args.namespace, image=args.image, hpa=args.hpa, sampler_service=args.sampler_service, **shared
            )
            if args.source == "envoy-gateway":
                from .convert.envoy_gateway import ModuleEngine, convert_envoy_gateway

                module = ModuleEngine(builder_image=args.module_builder_image) if engine == "module" else None
                conversion = convert_envoy_gateway(paths, deployment, module)
            else:
                from .convert.istio import convert_istio
                from .convert.module_delivery import ModuleEngine

                module = ModuleEngine(builder_image=args.module_builder_image) if engine == "module" else None
                conversion = convert_istio(paths, deployment, module=module)
    except ConvertError as e:
        raise ConfigError(e.problems) from None
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for name, text in conversion.files.items():
        (output / name).write_text(text, encoding="utf-8")
        print(f"wrote {output / name}")
    for note in conversion.notes:
        print(f"note: {note}")
    return 0


def _convert_engine(source: str, given: str | None, module_path: bool) -> str:
    """The engine `convert SOURCE` writes for: "" (the ext_proc sampler), "lua" (envoy
    only) or "module". On (``--inline`` alone) is Lua where Lua is offered, as for up and
    envoy-config, and the module where it is the only engine in Envoy's process, or
    where ``--module-path`` names the module."""
    lua_offered = source == "envoy"
    default = DEFAULT_INLINE if lua_offered and not module_path else "module"
    engine = str(_option("inline", given, lambda raw: parse_inline(raw, default)))
    if engine == "lua" and not lua_offered:
        raise ConfigError([f"--inline lua (or MIRROR_INLINE): convert {source} writes the ext_proc sampler or --inline module, not Lua"])
    if module_path and engine != "module":
        raise ConfigError([f"--module-path: the module's file, for --inline module (the engine is {engine or 'the ext_proc sampler'})"])
    return engine


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror-sampler", description="Consistent, key-based percentage request mirroring for Envoy.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    common = _options_parser(SAMPLER, "settings (each also an environment variable)")
    envoy_flags = _options_parser(ENVOY, "Envoy (each also an environment variable)")

    serve = sub.add_parser("serve", parents=[common], help="run the ext_proc gRPC server")
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", parents=[common], help="validate the configuration and exit")
    check.set_defaults(func=cmd_check_config)

    explain = sub.add_parser("explain", parents=[common], help="show the decision for one request, or for many (--bulk)")
    explain.add_argument("--header", action="append", metavar="NAME=VALUE", help="request header (repeatable)")
    explain.add_argument("--cookie", action="append", metavar="NAME=VALUE", help="cookie (repeatable)")
    explain.add_argument("--path", default="/", help="request path, query string included")
    explain.add_argument("--host", default="", help="Host / :authority")
    explain.add_argument("--method", default="GET")
    explain.add_argument(
        "--rule-id", metavar="ID", help="the rule Envoy names on the stream (NAMESPACE/ROUTE/INDEX), as serving takes it; default: match"
    )
    explain.add_argument("--json", action="store_true", help="print JSON (one object per line with --bulk)")
    explain.add_argument(
        "--bulk",
        metavar="FILE",
        help="many requests from FILE (- for standard input): one key per line, or JSON lines of request attributes "
        '({"key":..., "headers":{...}, "cookies":{...}, "path":..., "host":..., "method":...}); '
        "the other flags are every line's defaults; one result per line",
    )
    explain.set_defaults(func=cmd_explain)

    envoy = sub.add_parser("envoy-config", parents=[common, envoy_flags], help="render Envoy configuration from the same configuration")
    envoy.add_argument(
        "--for",
        dest="target",
        choices=("local", "compose"),
        default="local",
        help="addresses for this machine (loopback) or for docker compose (service names)",
    )
    envoy.add_argument(
        "--snippet",
        action="store_true",
        help="only what an existing Envoy needs: filters, sampler cluster, routes (and the capture points of spec.compare)",
    )
    envoy.add_argument("--output", "-o", help="write here instead of standard output")
    envoy.add_argument(
        "--sampler",
        action="append",
        metavar="HOST:PORT",
        help="sampler address (repeatable; default 127.0.0.1:50051, or mirror-sampler:50051 for compose)",
    )
    envoy.add_argument(
        "--backend-address",
        action="append",
        metavar="NAME=HOST:PORT",
        help="where a backend listens (local; default 127.0.0.1:<backendRef port>)",
    )
    envoy.add_argument(
        "--observer",
        action="append",
        metavar="HOST:PORT",
        help="with spec.compare in the configuration: an observer (`mirror-sampler compare capture`) the capture points log to "
        "(repeatable; default 127.0.0.1:50061, or mirror-sampler-compare:50061 for compose)",
    )
    envoy.set_defaults(func=cmd_envoy_config)

    up = sub.add_parser("up", parents=[common, envoy_flags], help="run Envoy, the sampler and echo backends on this machine")
    up.add_argument("--no-view", action="store_true", help="no live view of request counts")
    up.set_defaults(func=cmd_up)

    convert = sub.add_parser(
        "convert",
        help="turn an existing Envoy, Envoy Gateway or Istio mirror into consistent sampling",
        description="Reads your configuration and writes the converted one, with the sampler's configuration, into --output.",
    )
    convert.add_argument("source", choices=("envoy", "envoy-gateway", "istio"), help="what FILE... configures")
    convert.add_argument(
        "files", nargs="+", metavar="FILE", help="envoy: a bootstrap (YAML or JSON); envoy-gateway: HTTPRoutes; istio: VirtualServices"
    )
    convert.add_argument("--output", "-o", required=True, metavar="DIR", help="where the converted files go (created if needed)")
    for name in ("slots", "slot_prefix", "marker_header", "message_timeout_ms"):
        opt = next(o for o in OPTIONS if o.name == name)
        assert opt.flag is not None
        convert.add_argument(opt.flag, dest=f"opt_{name}", metavar=opt.env, help=f"{opt.help} [{opt.env}, default {opt.default!r}]")
    inline = next(o for o in OPTIONS if o.name == "inline")
    convert.add_argument(
        "--inline",
        dest="opt_inline",
        nargs="?",
        const="on",
        metavar="ENGINE",
        help="Envoy decides itself, no sampler deployed: module (the dynamic module: envoy, envoy-gateway, istio 1.31+) or "
        "lua (generated Lua: envoy); alone, lua for envoy (module with --module-path) and module for the others "
        f"[{inline.env}, default: the ext_proc sampler]",
    )
    group = convert.add_argument_group("envoy")
    group.add_argument(
        "--sampler", default="127.0.0.1:50051", metavar="HOST:PORT", help="where Envoy reaches the sampler (default 127.0.0.1:50051)"
    )
    for name in ("sampler_ca", "sampler_client_cert", "sampler_client_key"):
        opt = next(o for o in OPTIONS if o.name == name)
        assert opt.flag is not None
        group.add_argument(opt.flag, dest=f"opt_{name}", metavar="FILE", help=f"{opt.help} [{opt.env}]")
    group.add_argument(
        "--module-path",
        metavar="FILE",
        help="--inline module: where that Envoy loads the module from (default: build it here, for the Envoy `up` runs)",
    )
    group = convert.add_argument_group("envoy-gateway and istio")
    group.add_argument("--namespace", help="the sampler's namespace (default: the routes')")
    group.add_argument("--image", default="mirror-sampler:latest", help="the sampler's container image (default mirror-sampler:latest)")
    group.add_argument("--hpa", action="store_true", help="also a HorizontalPodAutoscaler for the sampler")
    group.add_argument(
        "--module-builder-image",
        default=DEFAULT_BUILDER_IMAGE,
        metavar="IMAGE",
        help=f"--inline module: the image whose cc builds the module on the proxy's node (default {DEFAULT_BUILDER_IMAGE})",
    )
    group.add_argument(
        "--sampler-service", default="mirror-sampler", metavar="NAME", help="the sampler's Service name (default mirror-sampler)"
    )
    convert.set_defaults(func=cmd_convert)

    from .compare.cli import register as register_compare

    register_compare(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        return _report(e)


if __name__ == "__main__":
    sys.exit(main())
