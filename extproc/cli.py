"""`mirror-sampler`: serve, check-config, explain, envoy-config, up."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

from . import __version__, logs
from .config import OPTIONS, ConfigError, Settings, split_address

if TYPE_CHECKING:
    from .envoyconf import Address

EXIT_CONFIG = 2


# Flags of envoy-config and up, each with its environment variable.
ENVOY_OPTIONS: tuple[tuple[str, str, str, str], ...] = (
    ("--listener-port", "MIRROR_LISTENER_PORT", "10000", "Envoy's listener port (0 picks one)"),
    ("--admin-port", "MIRROR_ADMIN_PORT", "9901", "Envoy's admin port (0 picks one)"),
    ("--message-timeout-ms", "MIRROR_MESSAGE_TIMEOUT_MS", "200", "ext_proc message_timeout: a slower sampler answer means no mirror"),
    ("--inline", "MIRROR_INLINE", "false", "Envoy decides itself (generated Lua per route); no sampler process"),
    ("--sampler-ca", "MIRROR_SAMPLER_CA", "", "PEM CA Envoy trusts for the sampler's TLS certificate (enables TLS to the sampler)"),
    ("--sampler-client-cert", "MIRROR_SAMPLER_CLIENT_CERT", "", "PEM certificate Envoy presents to the sampler (mutual TLS)"),
    ("--sampler-client-key", "MIRROR_SAMPLER_CLIENT_KEY", "", "PEM key of --sampler-client-cert"),
)


def _envoy_parser() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("Envoy (each also an environment variable)")
    for flag, env, default, text in ENVOY_OPTIONS:
        dest = flag.lstrip("-").replace("-", "_")
        if default in ("true", "false"):
            group.add_argument(flag, dest=dest, action="store_true", default=None, help=f"{text} [{env}]")
        elif not default:
            group.add_argument(flag, dest=dest, default=None, metavar="FILE", help=f"{text} [{env}]")
        else:
            group.add_argument(flag, dest=dest, default=None, metavar="N", help=f"{text} [{env}, default {default}]")
    return parent


def envoy_options(args: argparse.Namespace, environ: dict[str, str] | None = None) -> None:
    """Fill the Envoy flags from the environment and validate them in place."""
    environ = dict(os.environ) if environ is None else environ
    problems = []
    for flag, env, default, _ in ENVOY_OPTIONS:
        dest = flag.lstrip("-").replace("-", "_")
        given = getattr(args, dest)
        origin = flag if given is not None else env
        raw = given if given is not None else environ.get(env, default)
        if default in ("true", "false"):
            value = raw if isinstance(raw, bool) else str(raw).strip().lower()
            if value not in (True, False, "true", "false", "1", "0", "yes", "no", ""):
                problems.append(f"{origin}: must be true or false, got {raw!r}")
                continue
            setattr(args, dest, value in (True, "true", "1", "yes"))
            continue
        if not default:  # a file path
            setattr(args, dest, str(raw))
            continue
        limit = 600_000 if dest == "message_timeout_ms" else 65535
        lowest = 1 if dest == "message_timeout_ms" else 0
        try:
            number = int(str(raw).strip())
        except ValueError:
            number = -1
        if not lowest <= number <= limit:
            problems.append(f"{origin}: must be an integer {lowest}..{limit}, got {raw!r}")
            continue
        setattr(args, dest, number)
    if bool(getattr(args, "sampler_client_cert", "")) != bool(getattr(args, "sampler_client_key", "")):
        problems.append("--sampler-client-cert and --sampler-client-key (MIRROR_SAMPLER_CLIENT_CERT/KEY): set both, or neither")
    if getattr(args, "sampler_client_cert", "") and not getattr(args, "sampler_ca", ""):
        problems.append("--sampler-client-cert (MIRROR_SAMPLER_CLIENT_CERT): needs --sampler-ca (MIRROR_SAMPLER_CA) too")
    if problems:
        raise ConfigError(problems)


def _settings_parser() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("settings (each also an environment variable)")
    for opt in OPTIONS:
        if opt.flag:
            group.add_argument(opt.flag, dest=f"opt_{opt.name}", default=None, metavar=opt.env, help=f"{opt.help} [{opt.env}, default {opt.default!r}]")
    return parent


def settings_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> Settings:
    overrides = {opt.name: getattr(args, f"opt_{opt.name}", None) for opt in OPTIONS}
    return Settings.load(os.environ if environ is None else environ, overrides)


def _report(e: ConfigError) -> int:
    print(f"configuration error ({len(e.problems)} problem{'s' if len(e.problems) != 1 else ''}):", file=sys.stderr)
    for p in e.problems:
        print(f"  - {p}", file=sys.stderr)
    return EXIT_CONFIG


def cmd_serve(args: argparse.Namespace) -> int:
    from .workers import serve

    settings = settings_from(args)
    logs.configure(settings.log_level, settings.log_format)
    try:
        return serve(settings)
    except OSError as e:
        print(f"mirror-sampler: {e}", file=sys.stderr)
        return 1


def cmd_check_config(args: argparse.Namespace) -> int:
    from .store import load_policy

    policy = load_policy(settings_from(args))
    rules = policy.rules
    mirrors = sum(len(r.mirrors) for r in rules)
    print(f"configuration OK: {len(policy.routes)} route(s), {len(rules)} rule(s), {mirrors} mirror target(s)")
    for rule in rules:
        for t in rule.mirrors:
            print(f"  {rule.id}: {t.backend} at {t.fraction} ({policy.slot_names[t.slot]})")
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
    from .explain import explain, render_text, request_headers
    from .store import load_policy

    policy = load_policy(settings_from(args))
    headers = request_headers(
        _pairs(args.header, "--header"), _pairs(args.cookie, "--cookie"), args.path, args.host, args.method
    )
    result = explain(policy, headers)
    print(json.dumps(result, indent=2) if args.json else render_text(result))
    return 0


def _address(text: str, what: str) -> Address:
    from .envoyconf import Address

    try:
        return Address(*split_address(text))
    except ValueError as e:
        raise ConfigError([f"{what}: {e}"]) from None


def cmd_envoy_config(args: argparse.Namespace) -> int:
    from .envoyconf import Address, Topology, compose_topology, render
    from .store import load_policy

    from .inline import unsupported

    envoy_options(args)
    policy = load_policy(settings_from(args))
    if args.inline and unsupported(policy):
        raise ConfigError(unsupported(policy))
    if args.target == "compose":
        topology = compose_topology(policy)
    else:
        backends = {}
        for name, value in _pairs(args.backend_address, "--backend-address"):
            backends[name] = _address(value, "--backend-address")
        samplers = tuple(_address(s, "--sampler") for s in args.sampler or ["127.0.0.1:50051"])
        topology = Topology(backends=backends, samplers=samplers)
        from .envoyconf import backend_ports

        for name, port in backend_ports(policy).items():
            backends.setdefault(name, Address("127.0.0.1", port or 80))
    topology = replace(
        topology,
        listener=Address(topology.listener.host, args.listener_port),
        admin=Address(topology.admin.host, args.admin_port),
        message_timeout_ms=args.message_timeout_ms,
        inline=args.inline,
        sampler_ca=args.sampler_ca,
        sampler_cert=args.sampler_client_cert,
        sampler_key=args.sampler_client_key,
    )
    text = render(policy, topology, snippet_only=args.snippet)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from .gateway import run_gateway

    envoy_options(args)
    return run_gateway(args, settings_from(args, gateway_environ()))


def gateway_environ() -> dict[str, str]:
    """`up` with nothing configured runs the Envoy Gateway mirroring example."""
    environ = dict(os.environ)
    if not environ.get("MIRROR_CONFIG") and not environ.get("MIRROR_BACKEND"):
        from .gateway import DEFAULT_CONFIG

        environ["MIRROR_CONFIG"] = str(DEFAULT_CONFIG)
    return environ


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror-sampler", description="Consistent, key-based percentage request mirroring for Envoy.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    common = _settings_parser()

    serve = sub.add_parser("serve", parents=[common], help="run the ext_proc gRPC server")
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", parents=[common], help="validate the configuration and exit")
    check.set_defaults(func=cmd_check_config)

    explain = sub.add_parser("explain", parents=[common], help="show the decision for one request")
    explain.add_argument("--header", action="append", metavar="NAME=VALUE", help="request header (repeatable)")
    explain.add_argument("--cookie", action="append", metavar="NAME=VALUE", help="cookie (repeatable)")
    explain.add_argument("--path", default="/", help="request path, query string included")
    explain.add_argument("--host", default="", help="Host / :authority")
    explain.add_argument("--method", default="GET")
    explain.add_argument("--json", action="store_true", help="print JSON")
    explain.set_defaults(func=cmd_explain)

    envoy = sub.add_parser("envoy-config", parents=[common, _envoy_parser()], help="render Envoy configuration from the same configuration")
    envoy.add_argument("--for", dest="target", choices=("local", "compose"), default="local", help="addresses for this machine (loopback) or for docker compose (service names)")
    envoy.add_argument("--snippet", action="store_true", help="only what an existing Envoy needs: filters, sampler cluster, routes")
    envoy.add_argument("--output", "-o", help="write here instead of standard output")
    envoy.add_argument("--sampler", action="append", metavar="HOST:PORT", help="sampler address (repeatable; default 127.0.0.1:50051, or mirror-sampler:50051 for compose)")
    envoy.add_argument("--backend-address", action="append", metavar="NAME=HOST:PORT", help="where a backend listens (local; default 127.0.0.1:<backendRef port>)")
    envoy.set_defaults(func=cmd_envoy_config)

    up = sub.add_parser("up", parents=[common, _envoy_parser()], help="run Envoy, the sampler and echo backends on this machine")
    up.add_argument("--no-view", action="store_true", help="no live view of request counts")
    up.set_defaults(func=cmd_up)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        return _report(e)


if __name__ == "__main__":
    sys.exit(main())
