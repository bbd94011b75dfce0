"""The Policy that settings and manifests compile to (pure)."""

from __future__ import annotations

import dataclasses

from ..core.keys import DEFAULT_KEY_CHAIN
from ..core.matching import Match
from ..core.policy import BackendRef, MirrorTarget, Policy, Route, Rule
from ..core.sampling import Fraction
from .errors import ConfigError
from .manifests import ParseResult, parse_manifests
from .settings import Settings

SIMPLE_RULE_ID = "simple"


def _cross_route_problems(routes: list[Route], settings: Settings) -> list[str]:
    """What no single rule shows: one backend at two ports; a header modifier
    that would put a slot or marker header on a backend's request."""
    problems: list[str] = []
    ports: dict[str, tuple[int, str]] = {}
    reserved = set(settings.slot_headers.reserved)
    for route in routes:
        for rule in route.rules:
            refs = [(b.name, b.port) for b in rule.backends] + [(m.backend, m.port) for m in rule.mirrors]
            for name, port in refs:
                if port is None:
                    continue
                first = ports.setdefault(name, (port, rule.id))
                if first[0] != port:
                    problems.append(
                        f"{route.source}: rule {rule.id}: backend {name!r} at port {port}, but rule {first[1]} has it at port {first[0]}; "
                        "one Envoy cluster per backend name needs one port"
                    )
            mod = rule.header_modifier
            names = [n for n, _ in (mod.set + mod.add)] + list(mod.remove) if mod else []
            for n in names:
                if n.lower() in reserved:
                    owned = "which the sampler owns (a slot or the marker header)"
                    problems.append(f"{route.source}: rule {rule.id}: RequestHeaderModifier names {n!r}, {owned}")
    return problems


def _salt(settings: Settings) -> tuple[bytes, list[str]]:
    """The salt's bytes (UTF-8), and the problem if it has none: bytes that are
    not UTF-8 reach a flag or variable as lone surrogates, which no engine can hash alike."""
    try:
        return settings.salt.encode(), []
    except UnicodeEncodeError:
        # Not quoted: a known salt lets a client pick keys that land in the sample.
        return b"", ["MIRROR_SALT (--salt): the salt holds bytes that are not UTF-8; give it as UTF-8 text"]


def build_policy(settings: Settings, manifest_text: str | None = None) -> Policy:
    """The Policy the server runs; ``manifest_text`` is the MIRROR_CONFIG file."""
    return policy_from(settings, parse(settings, manifest_text))


def parse(settings: Settings, manifest_text: str | None) -> ParseResult | None:
    """The MIRROR_CONFIG file parsed (None in simple mode, which has no file)."""
    if not settings.config:
        return None
    if manifest_text is None:
        raise ConfigError([f"MIRROR_CONFIG: {settings.config}: no manifest text given"])
    return parse_manifests(manifest_text, settings.config, settings.slot_headers.count)


def policy_from(settings: Settings, parsed: ParseResult | None) -> Policy:
    """The Policy of these settings and parsed manifests; ConfigError lists every problem."""
    salt, salt_problems = _salt(settings)
    if parsed is not None:
        routes, enabled = parsed.routes, parsed.enabled
        problems = salt_problems + parsed.problems + _cross_route_problems(routes, settings)
        if settings.max_mirrors_per_second is not None:
            routes = [
                dataclasses.replace(
                    r,
                    rules=tuple(
                        rule
                        if rule.max_mirrors_per_second is not None
                        else dataclasses.replace(rule, max_mirrors_per_second=settings.max_mirrors_per_second)
                        for rule in r.rules
                    ),
                )
                for r in routes
            ]
        if problems:
            raise ConfigError(problems)
    else:
        if salt_problems:
            raise ConfigError(salt_problems)
        fraction = settings.fraction or Fraction(100 if settings.percent is None else settings.percent)
        rule = Rule(
            SIMPLE_RULE_ID,
            (Match(),),
            (MirrorTarget(settings.backend, fraction, 0),),
            (BackendRef(settings.primary),),
            methods=settings.methods,
            max_mirrors_per_second=settings.max_mirrors_per_second,
        )
        routes = [Route("", SIMPLE_RULE_ID, (), (rule,))]
        enabled = True
    return Policy(
        routes=tuple(routes),
        key_chain=settings.key or DEFAULT_KEY_CHAIN,
        salt=salt,
        slot_headers=settings.slot_headers,
        enabled=enabled and not settings.kill_switch,
    )
