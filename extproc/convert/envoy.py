"""`mirror-sampler convert envoy`: an Envoy bootstrap whose routes mirror with
``request_mirror_policies`` + ``runtime_fraction`` (a fresh random roll per
request) becomes the same configuration with route-selected mirrors decided
by the sampler (docs/DESIGN.md), plus the sampler's ``policy.yaml``.

The user's routes are worked on as plain data, so every setting this module
does not know about survives: each mirroring route becomes variant routes
(one per non-empty set of sampled mirrors, matching the slot headers, with
static mirror policies) followed by the plain route, all deep copies of the
user's route that differ from it only in ``match.headers``,
``route.request_mirror_policies``, ``request_headers_to_remove``,
``typed_per_filter_config`` (the rule named for the sampler) and one
``metadata.filter_metadata`` entry of this module's own. That entry records
what was changed, so a converted configuration converts again to itself:
conversion first undoes its own earlier work, then does it again.

A mirror the sampler cannot honour exactly (a ``cluster_header``, an unknown
field, more mirrors than slot headers, a cluster name that is not a DNS-1123
name) leaves its route as it was and says why in the notes. A cluster of the
user's named like the sampler's cluster stops the conversion; the one an
earlier conversion added (the bootstrap carries that conversion's ext_proc
filter) is replaced.

This module reads and writes the files; ``envoy_walk`` walks a bootstrap
down to its routes, ``envoy_routes`` rewrites one route, ``envoy_policy``
writes policy.yaml, ``envoy_data`` reads fields in either spelling.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from ..config.addresses import is_ip_address, split_peer_address
from ..config.build import build_policy
from ..config.manifest_yaml import yaml_problem
from ..config.settings import Settings, slot_environment
from ..core.slots import DEFAULT_SLOT_HEADERS, SlotHeaders
from ..envoy import lua as scripts
from ..envoy import module, render
from . import Conversion, ConvertError
from .envoy_data import Source, camel_style, value_of
from .envoy_policy import policy_text
from .envoy_routes import SAMPLER_FILTER, ours_of
from .envoy_walk import ENVOY_FILE, POLICY_FILE, Converter, Options

ENVOY_HEADER = """\
# Converted by `mirror-sampler convert envoy`: routes that mirrored with runtime_fraction
# now mirror what the mirror sampler decides (fractions in policy.yaml). After changing
# your own configuration, convert it again.
"""


MODULE_HEADER = """\
# Converted by `mirror-sampler convert envoy --inline module`: routes that mirrored with
# runtime_fraction now mirror what the mirror-sampler dynamic module decides in Envoy (the
# fractions are in each route's mirror-sampler.module config). After changing your own
# configuration, or to change a fraction, convert the original again.
"""
LUA_HEADER = """\
# Converted by `mirror-sampler convert envoy --inline lua`: routes that mirrored with
# runtime_fraction now mirror what each rule's generated Lua script decides in Envoy (the
# fractions are in the scripts). After changing your own configuration, or to change a
# fraction, convert the original again.
"""
# What the in-Envoy rules take from the environment, as the sampler would (docs/module.md).
DECISION_VARIABLES = ("MIRROR_KEY", "MIRROR_SALT")


def _give_rules_to_envoy(
    converter: Converter, policy: str, slot_headers: SlotHeaders, module_path: str | None, environ: Mapping[str, str]
) -> None:
    """Each mirror rule's routes get the rule, as the sampler would have decided it from
    policy.yaml, as the module's per-route config or (``module_path`` None) the rule's
    Lua script, instead of the sampler's rule name."""
    given = {name: environ[name] for name in DECISION_VARIABLES if environ.get(name)}
    settings = Settings.load({**given, **slot_environment(slot_headers), "MIRROR_CONFIG": POLICY_FILE})
    compiled = build_policy(settings, policy)
    for src, routes, rule_id in converter.rule_routes:
        rule = compiled.rules_by_id[rule_id]
        for route in routes:
            per_filter = route[src.field(route, "typed_per_filter_config")]
            per_filter.pop(SAMPLER_FILTER)
            if module_path is not None:
                per_filter[module.MODULE_FILTER] = render.as_data(module.per_route(compiled, rule, module_path), src.casing)
            else:
                variant = "variant" in (ours_of(route) or {})
                per_filter[scripts.DECIDE_FILTER] = render.as_data(render.decide_inline(compiled, rule, variant), src.casing)


class _Loader(yaml.SafeLoader):
    """YAML as Envoy reads it (YAML 1.2 booleans, no timestamps): a header
    value ``on`` or a date-like string stays a string."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, regexp) for tag, regexp in v if tag not in ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:bool")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _load(path: Path, label: str | None = None) -> Source:
    label = label or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError([f"{label}: cannot read: {e}"]) from e
    is_json = path.suffix.lower() == ".json"
    try:
        data = json.loads(text) if is_json else yaml.load(text, Loader=_Loader)
    except json.JSONDecodeError as e:
        raise ConvertError([f"{label}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"]) from e
    except yaml.YAMLError as e:
        raise ConvertError([yaml_problem(label, e)]) from e
    if not isinstance(data, dict):
        raise ConvertError([f"{label}: must be a mapping (an Envoy bootstrap or RDS file), got {type(data).__name__}"])
    return Source(path, label, data, is_json, camel_style(data))


def _dump(source: Source, as_json: bool) -> str:
    if as_json:
        return json.dumps(source.data, indent=2) + "\n"
    return str(yaml.dump(source.data, Dumper=render.LiteralDumper, sort_keys=False, width=120, allow_unicode=True))


def parse_address(text: str, flag: str = "--sampler") -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT."""
    try:
        return split_peer_address(text)
    except ValueError as e:
        raise ConvertError([f"{flag}: {e}"]) from None


# --------------------------------------------------------------------------


def convert_envoy(
    paths: Sequence[Path],
    *,
    sampler: str | Sequence[str] = "127.0.0.1:50051",
    sampler_ca: str = "",
    sampler_client_cert: str = "",
    sampler_client_key: str = "",
    slot_headers: SlotHeaders = DEFAULT_SLOT_HEADERS,
    message_timeout_ms: int = 200,
    output_dir: Path | None = None,
    module_path: str | None = None,
    lua: bool = False,
    decision_environ: Mapping[str, str] | None = None,
) -> Conversion:
    """``paths``: one Envoy bootstrap (YAML, or JSON by its .json suffix); RDS
    files it names may be listed too and are read through the bootstrap.
    ``output_dir``: where the files will be written, so that the bootstrap can
    name rewritten RDS files there (made absolute; None: bare file names,
    which Envoy resolves against its working directory). ``sampler``: one
    HOST:PORT or several (one Envoy cluster, several endpoints). ``module_path``
    (``--inline module``): Envoy decides with the dynamic module loaded from there, and
    the rules' settings go into the converted routes (no sampler, no policy.yaml);
    ``lua`` (``--inline lua``): the same with each rule's generated Lua script;
    ``decision_environ``: MIRROR_KEY and MIRROR_SALT for those settings."""
    problems: list[str] = []
    if lua and module_path is not None:
        problems.append("--inline: one engine, lua or module")
    addresses = [parse_address(a) for a in ([sampler] if isinstance(sampler, str) else sampler)]
    if not addresses:
        problems.append("--sampler: give at least one HOST:PORT")
    if bool(sampler_client_cert) != bool(sampler_client_key):
        problems.append("--sampler-client-cert and --sampler-client-key: set both, or neither")
    if sampler_client_cert and not sampler_ca:
        problems.append("--sampler-client-cert: needs --sampler-ca too")
    if not paths:
        problems.append("no input: name an Envoy bootstrap file")
    if problems:
        raise ConvertError(problems)
    sources = [_load(Path(p)) for p in paths]
    bootstraps = [s for s in sources if value_of(s.data, "resources") is None]
    if len(bootstraps) != 1:
        raise ConvertError(
            [f"{', '.join(s.label for s in bootstraps) or 'input'}: convert envoy takes exactly one bootstrap at a time "
             f"(the RDS files it names are read through it), got {len(bootstraps)}"]
        )  # fmt: skip
    boot = bootstraps[0]
    options = Options(
        slot_headers=slot_headers,
        topology=render.Topology(
            samplers=tuple(render.Address(host, port) for host, port in addresses),
            dns=not all(is_ip_address(host) for host, _ in addresses),
            message_timeout_ms=message_timeout_ms,
            sampler_ca=sampler_ca,
            sampler_cert=sampler_client_cert,
            sampler_key=sampler_client_key,
        ),
        output_dir=output_dir.absolute() if output_dir is not None else None,
        module_path=module_path,
        lua=lua,
    )
    converter = Converter(options, _load)
    affected = converter.bootstrap(boot)
    for extra in sources:
        if extra is not boot and extra.path.resolve() not in converter.rds_sources:
            converter.problems.append(f"{extra.label}: an RDS file the bootstrap {boot.label} does not name")
    if converter.problems:
        raise ConvertError(converter.problems)
    if not affected:
        raise ConvertError(
            [*converter.notes, f"{boot.label}: no route mirrors with request_mirror_policies the sampler can take over; nothing to convert"]
        )
    policy = policy_text(converter.http_routes, slot_headers)
    if options.in_envoy:
        _give_rules_to_envoy(converter, policy, slot_headers, module_path, decision_environ or {})
    # The bootstrap as YAML whatever it was (envoy.yaml); an RDS file keeps
    # its format, which Envoy tells by the file name's suffix.
    header = MODULE_HEADER if module_path is not None else LUA_HEADER if lua else ENVOY_HEADER
    files = {ENVOY_FILE: header + _dump(boot, as_json=False)}
    for resolved, name in converter.rds_outputs.items():
        files[name] = _dump(converter.rds_sources[resolved], as_json=converter.rds_sources[resolved].json)
    if not options.in_envoy:
        files[POLICY_FILE] = policy
    notes = list(converter.notes)
    text = boot.path.read_text(encoding="utf-8", errors="replace")
    if not boot.json and any(line.lstrip().startswith("#") and line.rstrip() + "\n" not in ENVOY_HEADER for line in text.splitlines()):
        notes.append(f"{boot.label}: its comments are not carried over to {ENVOY_FILE}")
    return Conversion(files=files, notes=notes)
