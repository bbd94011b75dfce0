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
name) leaves its route as it was and says why in the notes.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from betterproto2 import Casing

from ..config.settings import slot_environment
from ..core.policy import SAMPLER_CLUSTER
from ..core.slots import DEFAULT_SLOT_HEADERS, SlotHeaders
from ..core.variants import rule_layout
from ..envoy import render
from . import Conversion, ConvertError

# Our ext_proc filter's name in a converted configuration. Not Envoy's
# canonical ext_proc name: the user may run an ext_proc filter of their own,
# and per-route configuration is looked up by filter name.
SAMPLER_FILTER = "mirror-sampler.ext_proc"
ANTI_SPOOF_FILTER = render.ANTI_SPOOF_FILTER
# Our entry in each converted route's metadata.filter_metadata.
METADATA_KEY = "mirror-sampler"
NAMESPACE = "envoy"
ENVOY_FILE = "envoy.yaml"
POLICY_FILE = "policy.yaml"

_HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_HCM_NAMES = ("envoy.filters.network.http_connection_manager", "envoy.http_connection_manager")
_ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_ROUTE_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
_DENOMINATORS = {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000, 0: 100, 1: 10_000, 2: 1_000_000}
# RequestMirrorPolicy in Envoy 1.40; anything else is a field this module cannot vouch for.
_MIRROR_FIELDS = (
    "cluster",
    "cluster_header",
    "runtime_fraction",
    "trace_sampled",
    "disable_shadow_host_suffix_append",
    "request_headers_mutations",
    "host_rewrite_literal",
)
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

ENVOY_HEADER = """\
# Converted by `mirror-sampler convert envoy`: routes that mirrored with runtime_fraction
# now mirror what the mirror sampler decides (fractions in policy.yaml). After changing
# your own configuration, convert it again.
"""


# --------------------------------------------------------------------------
# Field access in either spelling: Envoy reads snake_case and camelCase alike.


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _key(obj: dict[str, Any], name: str) -> str | None:
    for candidate in (name, _camel(name)):
        if candidate in obj:
            return candidate
    return None


def _get(obj: dict[str, Any], name: str) -> Any:
    key = _key(obj, name)
    return None if key is None else obj[key]


def _dict(value: Any) -> dict[str, Any]:
    """``value`` if it is a mapping, else a new empty one."""
    return value if isinstance(value, dict) else {}


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


@dataclass
class _Source:
    """One input file, parsed."""

    path: Path
    label: str
    data: Any
    json: bool
    camel: bool

    def field(self, obj: dict[str, Any], name: str) -> str:
        """The key to use for ``name`` in ``obj``: the one it has, else the file's spelling."""
        return _key(obj, name) or (_camel(name) if self.camel else name)

    @property
    def casing(self) -> Casing:
        return Casing.CAMEL if self.camel else Casing.SNAKE


def _camel_style(data: Any) -> bool:
    """Whether a file spells Envoy's field names in camelCase (protobuf JSON)."""
    camel = snake = 0
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                if isinstance(k, str) and "." not in k and not k.startswith("@"):
                    camel += bool(re.match(r"^[a-z]+[A-Z]", k))
                    snake += bool(re.match(r"^[a-z]+_[a-z]", k))
                stack.append(v)
        elif isinstance(item, list):
            stack.extend(item)
    return camel > snake


class _Loader(yaml.SafeLoader):
    """YAML as Envoy reads it (YAML 1.2 booleans, no timestamps): a header
    value ``on`` or a date-like string stays a string."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, regexp) for tag, regexp in v if tag not in ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:bool")]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _load(path: Path, label: str | None = None) -> _Source:
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
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConvertError([f"{label}: not valid YAML{at}: {getattr(e, 'problem', None) or e}"]) from e
    if not isinstance(data, dict):
        raise ConvertError([f"{label}: must be a mapping (an Envoy bootstrap or RDS file), got {type(data).__name__}"])
    return _Source(path, label, data, is_json, _camel_style(data))


def _dump(source: _Source, as_json: bool) -> str:
    if as_json:
        return json.dumps(source.data, indent=2) + "\n"
    return str(yaml.dump(source.data, Dumper=render.LiteralDumper, sort_keys=False, width=120, allow_unicode=True))


def _dns_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return name[:200].strip("-") or "route"


def parse_address(text: str, flag: str = "--sampler") -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConvertError([f"{flag}: must be HOST:PORT with a port 1..65535, got {text!r}"])
    return host, int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------
# What a converted rule is.


@dataclass
class _Mirror:
    cluster: str
    numerator: int
    denominator: int
    policy: dict[str, Any]  # the user's mirror policy, as written
    runtime_key: str | None


@dataclass
class _Rule:
    id: str
    mirrors: list[_Mirror]
    primaries: list[str]
    comment: str


@dataclass
class _HTTPRoute:
    name: str
    comment: str
    rules: list[_Rule] = field(default_factory=list)


class _Refused(Exception):
    """A mirror the sampler cannot honour exactly: the route stays as it was."""


@dataclass
class _Options:
    slot_headers: SlotHeaders
    topology: render.Topology
    output_dir: Path | None


class _Converter:
    def __init__(self, options: _Options) -> None:
        self.o = options
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.http_routes: list[_HTTPRoute] = []
        self.route_names: set[str] = set()
        # RDS: resolved input path -> its source; (path, route config name) -> converted?
        self.rds_sources: dict[Path, _Source] = {}
        self.rds_converted: dict[tuple[Path, str], bool] = {}
        self.rds_outputs: dict[Path, str] = {}

    # -- structure helpers -------------------------------------------------

    def _map(self, src: _Source, path: str, value: Any) -> dict[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            self.problems.append(f"{src.label}: {path}: must be a mapping, got {type(value).__name__}")
            return None
        return value

    def _list(self, src: _Source, path: str, value: Any) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.problems.append(f"{src.label}: {path}: must be a list, got {type(value).__name__}")
            return []
        return value

    # -- bootstrap -----------------------------------------------------------

    def bootstrap(self, src: _Source) -> bool:
        boot = src.data
        static = self._map(src, "static_resources", _get(boot, "static_resources"))
        if _get(boot, "dynamic_resources") is not None:
            self.notes.append(
                f"{src.label}: dynamic_resources: listeners and routes from xDS are not converted (only static_resources and RDS files)"
            )
        if static is None:
            if not self.problems:
                self.problems.append(f"{src.label}: static_resources: is required (an Envoy bootstrap with listeners)")
            return False
        clusters_key = src.field(static, "clusters")
        clusters = self._list(src, f"static_resources.{clusters_key}", static.get(clusters_key))
        # Our sampler cluster from an earlier conversion: added again below if still needed.
        kept = [c for c in clusters if not (isinstance(c, dict) and c.get("name") == SAMPLER_CLUSTER)]
        affected = False
        for li, listener in enumerate(self._list(src, "static_resources.listeners", _get(static, "listeners"))):
            lpath = f"static_resources.listeners[{li}]"
            lst = self._map(src, lpath, listener)
            if lst is None:
                continue
            lname = str(lst.get("name") or f"listener-{li}")
            listed = self._list(src, f"{lpath}.filter_chains", _get(lst, "filter_chains"))
            chains = [(f"{lpath}.filter_chains[{ci}]", c) for ci, c in enumerate(listed)]
            if _get(lst, "default_filter_chain") is not None:
                chains.append((f"{lpath}.default_filter_chain", _get(lst, "default_filter_chain")))
            for cpath, raw_chain in chains:
                chain = self._map(src, cpath, raw_chain)
                if chain is None:
                    continue
                for fi, raw_filter in enumerate(self._list(src, f"{cpath}.filters", _get(chain, "filters"))):
                    fpath = f"{cpath}.filters[{fi}]"
                    flt = self._map(src, fpath, raw_filter)
                    if flt is None:
                        continue
                    config = _get(flt, "typed_config")
                    named_hcm = flt.get("name") in _HCM_NAMES and "@type" not in _dict(config)
                    is_hcm = isinstance(config, dict) and (config.get("@type") == _HCM_TYPE or named_hcm)
                    if is_hcm and self.connection_manager(src, f"{fpath}.{src.field(flt, 'typed_config')}", config, lname):
                        affected = True
        if affected:
            kept.append(render.as_data(render.sampler_cluster(self.o.topology), src.casing))
        if clusters or affected:
            static[clusters_key] = kept
        return affected

    def connection_manager(self, src: _Source, path: str, hcm: dict[str, Any], listener: str) -> bool:
        filters_key = src.field(hcm, "http_filters")
        filters = [
            f for f in self._list(src, f"{path}.{filters_key}", hcm.get(filters_key))
            if not (isinstance(f, dict) and f.get("name") in (SAMPLER_FILTER, ANTI_SPOOF_FILTER))
        ]  # fmt: skip
        if filters_key in hcm:
            hcm[filters_key] = filters
        inline = _get(hcm, "route_config")
        rds = _get(hcm, "rds")
        converted = False
        if inline is not None:
            rc = self._map(src, f"{path}.route_config", inline)
            if rc is not None:
                rc_name = rc.get("name") or "route-config"
                described = f"listener {listener!r}, route configuration {rc_name!r}"
                converted = self.route_config(src, f"{path}.{src.field(hcm, 'route_config')}", rc, f"{listener}-{rc_name}", described)
        elif rds is not None:
            converted = self.rds(src, f"{path}.{src.field(hcm, 'rds')}", rds)
        elif _get(hcm, "scoped_routes") is not None:
            self.notes.append(f"{src.label}: {path}.scoped_routes: scoped routes are not converted")
        if not converted:
            return False
        router_at = next(
            (i for i, f in enumerate(filters) if isinstance(f, dict) and (
                f.get("name") == "envoy.filters.http.router" or (_get(f, "typed_config") or {}).get("@type") == _ROUTER_TYPE
            )),
            None,
        )  # fmt: skip
        if router_at is None:
            self.problems.append(
                f"{src.label}: {path}.{filters_key}: no envoy.filters.http.router filter to put the sampler's filters ahead of"
            )
            return False
        ours = [
            render.as_data(render.anti_spoof_filter(self.o.slot_headers), src.casing),
            render.as_data(render.ext_proc_filter(self.o.topology.message_timeout_ms, SAMPLER_FILTER), src.casing),
        ]
        hcm[filters_key] = filters[:router_at] + ours + filters[router_at:]
        if _get(hcm, "use_remote_address") is not True:
            self.notes.append(
                f"{src.label}: {path}: use_remote_address is not true: Envoy may keep the x-request-id a client sends "
                "(the sampling key), letting it choose whether it is mirrored; set use_remote_address and internal_address_config "
                "so that only trusted clients keep theirs"
            )
        return True

    # -- RDS files -----------------------------------------------------------

    def rds(self, src: _Source, path: str, rds: Any) -> bool:
        rds_map = self._map(src, path, rds)
        if rds_map is None:
            return False
        name = _get(rds_map, "route_config_name")
        source = self._map(src, f"{path}.config_source", _get(rds_map, "config_source")) or {}
        pcs = _get(source, "path_config_source")
        if isinstance(pcs, dict) and isinstance(_get(pcs, "path"), str):
            holder, where = pcs, f"{path}.config_source.path_config_source"
        elif isinstance(_get(source, "path"), str):
            holder, where = source, f"{path}.config_source"
        else:
            self.notes.append(f"{src.label}: {path}: routes from an xDS server, not a file: not converted")
            return False
        path_key = src.field(holder, "path")
        original = Path(holder[path_key])
        if not isinstance(name, str) or not name:
            self.problems.append(f"{src.label}: {path}.route_config_name: must be a non-empty string, got {name!r}")
            return False
        # Envoy reads a relative path from its working directory; the usual
        # layout keeps it next to the bootstrap.
        candidates = [original] if original.is_absolute() else [src.path.parent / original, original]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            self.problems.append(f"{src.label}: {where}.{path_key}: RDS file {str(original)!r} not found")
            return False
        resolved = found.resolve()
        rds_src = self.rds_sources.get(resolved)
        if rds_src is None:
            rds_src = self.rds_sources[resolved] = _load(found)
        if (resolved, name) not in self.rds_converted:
            self.rds_converted[resolved, name] = self.rds_resource(rds_src, name)
        if not self.rds_converted[resolved, name]:
            return False
        out_name = self.rds_output_name(resolved)
        target = self.o.output_dir / out_name if self.o.output_dir is not None else Path(out_name)
        if holder[path_key] != str(target):
            self.notes.append(
                f"{src.label}: {where}.{path_key}: the converted routes of {rds_src.label} are written to {out_name} and the bootstrap "
                f"now reads {target}; convert again whenever {rds_src.label} changes"
            )
        holder[path_key] = str(target)
        watched = _get(holder, "watched_directory")
        if isinstance(watched, dict) and self.o.output_dir is not None:
            watched[src.field(watched, "path")] = str(self.o.output_dir)
        return True

    def rds_output_name(self, resolved: Path) -> str:
        if resolved not in self.rds_outputs:
            taken = {ENVOY_FILE, POLICY_FILE, *self.rds_outputs.values()}
            name = resolved.name
            n = 2
            while name in taken:
                name = f"{resolved.stem}-{n}{resolved.suffix}"
                n += 1
            self.rds_outputs[resolved] = name
        return self.rds_outputs[resolved]

    def rds_resource(self, src: _Source, name: str) -> bool:
        converted = False
        for i, raw in enumerate(self._list(src, "resources", _get(src.data, "resources"))):
            rc = self._map(src, f"resources[{i}]", raw)
            if rc is None or rc.get("@type") not in (_ROUTE_CONFIG_TYPE, None) or rc.get("name") != name:
                continue
            converted = self.route_config(src, f"resources[{i}]", rc, name, f"route configuration {name!r} (RDS)") or converted
        return converted

    # -- route configurations ----------------------------------------------

    def route_config(self, src: _Source, path: str, rc: dict[str, Any], owner: str, described: str) -> bool:
        vhosts_key = src.field(rc, "virtual_hosts")
        vhosts = self._list(src, f"{path}.{vhosts_key}", rc.get(vhosts_key))
        for vi, raw in enumerate(vhosts):
            vh = self._map(src, f"{path}.{vhosts_key}[{vi}]", raw)
            if vh is not None:
                routes_key = src.field(vh, "routes")
                routes = self._list(src, f"{path}.{vhosts_key}[{vi}].{routes_key}", vh.get(routes_key))
                if routes_key in vh:
                    vh[routes_key] = self.unconvert(src, routes)
        if _get(rc, "request_mirror_policies"):
            self.notes.append(
                f"{src.label}: {path}.request_mirror_policies: mirrors for a whole route configuration are not converted; "
                f"{described} left as it was"
            )
            return False
        plans: list[tuple[dict[str, Any], str, list[Any]]] = []
        for vi, raw in enumerate(vhosts):
            vh = raw if isinstance(raw, dict) else None
            if vh is None:
                continue
            vpath = f"{path}.{vhosts_key}[{vi}]"
            routes_key = src.field(vh, "routes")
            routes = _items(vh.get(routes_key))
            vname = str(vh.get("name") or f"vhost-{vi}")
            if _get(vh, "request_mirror_policies"):
                self.notes.append(
                    f"{src.label}: {vpath}.request_mirror_policies: mirrors for a whole virtual host are not converted; "
                    f"virtual host {vname!r} left as it was"
                )
                plans.append((vh, routes_key, [(r, None) for r in routes]))
                continue
            http_route: _HTTPRoute | None = None
            planned: list[Any] = []
            for ri, route in enumerate(routes):
                rpath = f"{vpath}.{routes_key}[{ri}]"
                mirrors = self.route_mirrors(src, rpath, route) if isinstance(route, dict) else None
                if mirrors is None:
                    planned.append((route, None))
                    continue
                if http_route is None:
                    http_route = self.new_http_route(owner, vname, f"{described}, virtual host {vname!r}")
                rule_id = f"{NAMESPACE}/{http_route.name}/{len(http_route.rules)}"
                action = _get(route, "route") or {}
                route_name = f"route {route['name']!r}" if route.get("name") else "unnamed route"
                where = f"{vpath.split('.')[-1]}.{routes_key}[{ri}]"
                primaries = self.primaries(action, {m.cluster for m in mirrors})
                http_route.rules.append(_Rule(rule_id, mirrors, primaries, f"{route_name} ({where})"))
                for m in mirrors:
                    if m.runtime_key is not None:
                        self.notes.append(
                            f"{src.label}: {rpath}: runtime_key {m.runtime_key!r} (mirror to {m.cluster!r}) is no longer in effect: "
                            f"the sampler mirrors {m.numerator}/{m.denominator} (its default_value); change the fraction of rule {rule_id} "
                            "in policy.yaml instead"
                        )
                planned.append((route, (rule_id, mirrors)))
            plans.append((vh, routes_key, planned))
        if not any(plan is not None for _, _, planned in plans for _, plan in planned):
            return False
        for vh, routes_key, planned in plans:
            out: list[Any] = []
            for route, plan in planned:
                if plan is None:
                    if isinstance(route, dict):
                        self.per_route(src, route, render.as_data(render.ext_proc_off(), src.casing))
                    out.append(route)
                else:
                    out.extend(self.convert_route(src, route, *plan))
            vh[routes_key] = out
        return True

    def new_http_route(self, owner: str, vhost: str, comment: str) -> _HTTPRoute:
        base = _dns_name(f"{owner}-{vhost}")
        name, n = base, 2
        while name in self.route_names:
            name = f"{base}-{n}"
            n += 1
        self.route_names.add(name)
        route = _HTTPRoute(name, comment)
        self.http_routes.append(route)
        return route

    def primaries(self, action: dict[str, Any], mirrors: set[str]) -> list[str]:
        """backendRefs for policy.yaml: the sampler only needs one (a rule
        without a backend mirrors nothing), named like the route's cluster(s)
        where that is a valid name no mirror takes."""
        names: list[str] = []
        if isinstance(_get(action, "cluster"), str):
            names = [_get(action, "cluster")]
        weighted = _get(action, "weighted_clusters")
        if isinstance(weighted, dict):
            names = [str(c["name"]) for c in _items(_get(weighted, "clusters")) if isinstance(c, dict) and isinstance(c.get("name"), str)]
        out: list[str] = []
        for name in names or ["primary"]:
            ref = name if _DNS1123.match(name) else _dns_name(name)
            while ref in mirrors or ref == SAMPLER_CLUSTER or ref in out:
                ref = f"{ref}-primary"
            out.append(ref)
        return out

    # -- one route -----------------------------------------------------------

    def route_mirrors(self, src: _Source, path: str, route: dict[str, Any]) -> list[_Mirror] | None:
        """The route's mirrors if the sampler can take them over; None when it
        has none, or when it is refused (with a note) or malformed (a problem)."""
        action = _get(route, "route")
        if not isinstance(action, dict):
            return None
        policies_key = _key(action, "request_mirror_policies")
        if policies_key is None:
            return None
        ppath = f"{path}.{src.field(route, 'route')}.{policies_key}"
        raw = action[policies_key]
        if not isinstance(raw, list):
            self.problems.append(f"{src.label}: {ppath}: must be a list, got {type(raw).__name__}")
            return None
        if not raw:
            return None
        n_problems = len(self.problems)
        mirrors: list[_Mirror] = []
        refusals: list[str] = []
        match = _dict(_get(route, "match"))
        names = [h.get("name") for h in _items(_get(match, "headers")) if isinstance(h, dict)]
        slot_matchers = sorted({str(n) for n in names if n in self.o.slot_headers.names})
        if slot_matchers:
            # A variant route `mirror-sampler envoy-config` rendered: its mirrors
            # are already the sampler's decision.
            refusals.append(f"match.headers: matches slot header(s) {', '.join(slot_matchers)}: already a mirror-sampler variant route")
        for j, policy in enumerate(raw):
            try:
                mirror = self.mirror(src, f"{ppath}[{j}]", policy)
            except _Refused as e:
                refusals.append(f"{policies_key}[{j}]: {e}")
                continue
            if mirror is not None:
                mirrors.append(mirror)
        if len(self.problems) > n_problems:
            return None
        clusters = [m.cluster for m in mirrors]
        for c in sorted({c for c in clusters if clusters.count(c) > 1}):
            refusals.append(f"{policies_key}: mirrors to {c!r} twice; the sampler decides once per cluster")
        if len(raw) > self.o.slot_headers.count:
            refusals.append(
                f"{policies_key}: {len(raw)} mirrors but only {self.o.slot_headers.count} slot headers (convert with --slots {len(raw)} "
                f"and run the sampler with MIRROR_SLOTS={len(raw)})"
            )
        if refusals:
            what = f"route {route['name']!r}" if route.get("name") else "route"
            self.notes.extend(f"{src.label}: {path}: {what} left as it was: {r}" for r in refusals)
            return None
        return mirrors

    def mirror(self, src: _Source, path: str, policy: Any) -> _Mirror | None:
        if not isinstance(policy, dict):
            self.problems.append(f"{src.label}: {path}: must be a mapping, got {type(policy).__name__}")
            return None
        known = {*_MIRROR_FIELDS, *(_camel(f) for f in _MIRROR_FIELDS)}
        unknown = sorted(str(k) for k in policy if k not in known)
        if unknown:
            raise _Refused(f"unknown field(s) {', '.join(unknown)}: the sampler cannot tell what they change")
        header = _get(policy, "cluster_header")
        if header is not None:
            raise _Refused(f"cluster_header {header!r}: the mirror goes to the cluster a request header names; the sampler cannot set it")
        cluster = _get(policy, "cluster")
        if not isinstance(cluster, str) or not cluster:
            self.problems.append(f"{src.label}: {path}.cluster: must be a non-empty string, got {cluster!r}")
            return None
        if not _DNS1123.match(cluster) or len(cluster) > 253:
            raise _Refused(
                f"cluster {cluster!r} is not a lower-case DNS-1123 name, which the sampler's backend names must be "
                "(rename the cluster, e.g. with '-' for '_')"
            )
        if cluster == SAMPLER_CLUSTER:
            raise _Refused(f"cluster {cluster!r} is the sampler's own cluster name")
        numerator, denominator, runtime_key = 100, 100, None
        fraction_key = _key(policy, "runtime_fraction")
        if fraction_key is not None:
            fpath = f"{path}.{fraction_key}"
            rf = self._map(src, fpath, policy[fraction_key])
            if rf is None:
                return None
            for extra in sorted(k for k in rf if k not in ("default_value", "defaultValue", "runtime_key", "runtimeKey")):
                self.problems.append(f"{src.label}: {fpath}.{extra}: unknown field; allowed: default_value, runtime_key")
            runtime_key = _get(rf, "runtime_key")
            if runtime_key is not None and not isinstance(runtime_key, str):
                self.problems.append(f"{src.label}: {fpath}.runtime_key: must be a string, got {runtime_key!r}")
            default = self._map(src, f"{fpath}.default_value", _get(rf, "default_value")) or {}
            numerator = _get(default, "numerator") if _get(default, "numerator") is not None else 0
            raw_denominator = _get(default, "denominator") if _get(default, "denominator") is not None else "HUNDRED"
            if isinstance(numerator, str) and numerator.isdigit():
                numerator = int(numerator)  # protobuf JSON writes 64-bit-safe integers as strings; uint32 may come either way
            if not isinstance(numerator, int) or isinstance(numerator, bool) or not 0 <= numerator < 2**32:
                self.problems.append(f"{src.label}: {fpath}.default_value.numerator: must be an integer 0..4294967295, got {numerator!r}")
                return None
            if isinstance(raw_denominator, bool) or raw_denominator not in _DENOMINATORS:
                self.problems.append(
                    f"{src.label}: {fpath}.default_value.denominator: must be HUNDRED, TEN_THOUSAND or MILLION, got {raw_denominator!r}"
                )
                return None
            for extra in sorted(k for k in default if k not in ("numerator", "denominator")):
                self.problems.append(f"{src.label}: {fpath}.default_value.{extra}: unknown field; allowed: numerator, denominator")
            denominator = _DENOMINATORS[raw_denominator]
            # Envoy mirrors every request when the numerator exceeds the denominator.
            numerator = min(numerator, denominator)
        return _Mirror(cluster, numerator, denominator, policy, runtime_key if isinstance(runtime_key, str) else None)

    def per_route(self, src: _Source, route: dict[str, Any], config: dict[str, Any]) -> None:
        key = src.field(route, "typed_per_filter_config")
        per_filter = _dict(route.get(key))
        per_filter[SAMPLER_FILTER] = config
        route[key] = per_filter

    def convert_route(self, src: _Source, route: dict[str, Any], rule_id: str, mirrors: list[_Mirror]) -> list[dict[str, Any]]:
        plain = copy.deepcopy(route)
        action = plain[src.field(plain, "route")]
        policies_key = src.field(action, "request_mirror_policies")
        original = action.pop(policies_key)
        remove_key = src.field(plain, "request_headers_to_remove")
        removed = _items(plain.get(remove_key))
        already = {r.lower() for r in removed if isinstance(r, str)}
        added = [s for s in self.o.slot_headers.names if s not in already]
        plain[remove_key] = [*removed, *added]
        self.per_route(src, plain, render.as_data(render.ext_proc_naming(rule_id), src.casing))
        _set_ours(src, plain, {"rule": rule_id, "request_mirror_policies": copy.deepcopy(original), "request_headers_to_remove": added})

        routes = []
        for layout in rule_layout(mirrors, _cluster, self.o.slot_headers):
            if layout.is_plain:
                routes.append(plain)
                continue
            suffix = "+".join(layout.tokens)
            variant = copy.deepcopy(plain)
            name_key = src.field(variant, "name")
            if name_key in variant:
                variant[name_key] = f"{variant[name_key]} mirror {suffix}"
            else:
                variant = {name_key: f"{rule_id} mirror {suffix}", **variant}
            match = variant.get(src.field(variant, "match"))
            if not isinstance(match, dict):
                match = variant[src.field(variant, "match")] = {}
            headers_key = src.field(match, "headers")
            slots = [render.as_data(h, src.casing) for h in render.slot_matchers(layout)]
            match[headers_key] = [*(match.get(headers_key) or []), *slots]
            variant_action = variant[src.field(variant, "route")]
            variant_action[policies_key] = [self.static_policy(src, m.policy, rule_id) for m in layout.targets]
            _set_ours(src, variant, {"rule": rule_id, "variant": suffix})
            routes.append(variant)
        return routes

    def static_policy(self, src: _Source, policy: dict[str, Any], rule_id: str) -> dict[str, Any]:
        """The user's mirror policy, always taken (the sampler already decided),
        adding the marker header that names the rule on the mirrored copy."""
        out = {k: copy.deepcopy(v) for k, v in policy.items() if k not in ("runtime_fraction", "runtimeFraction")}
        key = src.field(out, "request_headers_mutations")
        marker = render.as_data(render.marker_mutation(self.o.slot_headers, rule_id), src.casing)
        out[key] = [*(out.get(key) or []), marker]
        return out

    def unconvert(self, src: _Source, routes: list[Any]) -> list[Any]:
        """Routes as they were before an earlier conversion: variants dropped,
        plain routes given back their mirror policies."""
        out: list[Any] = []
        for route in routes:
            if not isinstance(route, dict):
                out.append(route)
                continue
            ours = _pop_ours(route)
            if ours is not None and "variant" in ours:
                continue
            key = _key(route, "typed_per_filter_config")
            if key is not None and isinstance(route[key], dict):
                route[key].pop(SAMPLER_FILTER, None)
                if not route[key]:
                    del route[key]
            if ours is not None and isinstance(_get(route, "route"), dict):
                action = _get(route, "route")
                action[src.field(action, "request_mirror_policies")] = ours.get("request_mirror_policies") or []
                remove_key = _key(route, "request_headers_to_remove")
                if remove_key is not None and isinstance(route[remove_key], list):
                    removed = list(route[remove_key])
                    for name in ours.get("request_headers_to_remove") or []:
                        if name in removed:
                            removed.remove(name)
                    if removed:
                        route[remove_key] = removed
                    else:
                        del route[remove_key]
            out.append(route)
        return out


def _cluster(mirror: _Mirror) -> str:
    return mirror.cluster


def _set_ours(src: _Source, route: dict[str, Any], value: dict[str, Any]) -> None:
    meta_key = src.field(route, "metadata")
    meta = _dict(route.get(meta_key))
    fm_key = src.field(meta, "filter_metadata")
    filter_metadata = _dict(meta.get(fm_key))
    filter_metadata[METADATA_KEY] = value
    meta[fm_key] = filter_metadata
    route[meta_key] = meta


def _pop_ours(route: dict[str, Any]) -> dict[str, Any] | None:
    meta_key = _key(route, "metadata")
    meta = route.get(meta_key) if meta_key else None
    if not isinstance(meta, dict):
        return None
    fm_key = _key(meta, "filter_metadata")
    filter_metadata = meta.get(fm_key) if fm_key else None
    if not isinstance(filter_metadata, dict) or not isinstance(filter_metadata.get(METADATA_KEY), dict):
        return None
    ours: dict[str, Any] = filter_metadata.pop(METADATA_KEY)
    assert fm_key is not None and meta_key is not None
    if not filter_metadata:
        del meta[fm_key]
    if not meta:
        del route[meta_key]
    return ours


# --------------------------------------------------------------------------
# policy.yaml


def policy_text(http_routes: Sequence[_HTTPRoute], slot_headers: SlotHeaders) -> str:
    settings = [f"{name}={value}" for name, value in slot_environment(slot_headers).items()]
    run = " ".join([*settings, "mirror-sampler serve --config policy.yaml"])
    lines = [
        "# Generated by `mirror-sampler convert envoy` with envoy.yaml: the mirror sampler's rules",
        "# for the routes that mirrored with runtime_fraction. One HTTPRoute per Envoy virtual",
        "# host, one rule per mirroring Envoy route, in order. Envoy names the rule it matched",
        "# (x-mirror-rule-id, namespace/name/index), so the rules need no matches or hostnames:",
        "# the sampler never matches a request itself. backendRefs name the route's primary",
        "# cluster(s) for reference; RequestMirror backendRef names are Envoy mirror clusters.",
        "#",
        "# Edit live: each RequestMirror's fraction (numerator/denominator); the sampler reloads",
        "# this file when it changes. Everything else must agree with envoy.yaml: change your",
        "# Envoy configuration and convert again instead.",
        f"# Run: {run}",
    ]
    docs = []
    for http_route in http_routes:
        head = {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": http_route.name, "namespace": NAMESPACE},
        }
        text = f"# Envoy {http_route.comment}\n" + yaml.safe_dump(head, sort_keys=False) + "spec:\n  rules:\n"
        for rule in http_route.rules:
            body = {
                "backendRefs": [{"name": n} for n in rule.primaries],
                "filters": [
                    {
                        "type": "RequestMirror",
                        "requestMirror": {
                            "backendRef": {"name": m.cluster},
                            "fraction": {"numerator": m.numerator, "denominator": m.denominator},
                        },
                    }
                    for m in rule.mirrors
                ],
            }
            dumped = yaml.safe_dump([body], sort_keys=False, width=120)
            text += f"  # {rule.id}: {rule.comment}\n" + "".join(f"  {line}\n" for line in dumped.splitlines())
        docs.append(text)
    return "\n".join(lines) + "\n" + "".join(f"---\n{d}" for d in docs)


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
) -> Conversion:
    """``paths``: one Envoy bootstrap (YAML, or JSON by its .json suffix); RDS
    files it names may be listed too and are read through the bootstrap.
    ``output_dir``: where the files will be written, so that the bootstrap can
    name rewritten RDS files there (made absolute; None: bare file names,
    which Envoy resolves against its working directory). ``sampler``: one
    HOST:PORT or several (one Envoy cluster, several endpoints)."""
    problems: list[str] = []
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
    bootstraps = [s for s in sources if _get(s.data, "resources") is None]
    if len(bootstraps) != 1:
        raise ConvertError(
            [f"{', '.join(s.label for s in bootstraps) or 'input'}: convert envoy takes exactly one bootstrap at a time "
             f"(the RDS files it names are read through it), got {len(bootstraps)}"]
        )  # fmt: skip
    boot = bootstraps[0]
    options = _Options(
        slot_headers=slot_headers,
        topology=render.Topology(
            samplers=tuple(render.Address(host, port) for host, port in addresses),
            dns=not all(_is_ip(host) for host, _ in addresses),
            message_timeout_ms=message_timeout_ms,
            sampler_ca=sampler_ca,
            sampler_cert=sampler_client_cert,
            sampler_key=sampler_client_key,
        ),
        output_dir=output_dir.absolute() if output_dir is not None else None,
    )
    converter = _Converter(options)
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
    # The bootstrap as YAML whatever it was (envoy.yaml); an RDS file keeps
    # its format, which Envoy tells by the file name's suffix.
    files = {ENVOY_FILE: ENVOY_HEADER + _dump(boot, as_json=False)}
    for resolved, name in converter.rds_outputs.items():
        files[name] = _dump(converter.rds_sources[resolved], as_json=converter.rds_sources[resolved].json)
    files[POLICY_FILE] = policy_text(converter.http_routes, slot_headers)
    notes = list(converter.notes)
    text = boot.path.read_text(encoding="utf-8", errors="replace")
    if not boot.json and any(line.lstrip().startswith("#") and line.rstrip() + "\n" not in ENVOY_HEADER for line in text.splitlines()):
        notes.append(f"{boot.label}: its comments are not carried over to {ENVOY_FILE}")
    return Conversion(files=files, notes=notes)
