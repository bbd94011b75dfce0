"""The walk of ``convert envoy`` through an Envoy bootstrap: listeners,
HTTP connection managers, route configurations (inline or from RDS files)
and virtual hosts, down to the routes ``envoy_routes`` rewrites. Reading an
RDS file is the one I/O, passed in as ``read`` (pure otherwise)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.schema import MAX_BACKEND_REFS_PER_RULE, MAX_RULES_PER_ROUTE
from ..config.settings import NAME
from ..core.policy import SAMPLER_CLUSTER
from ..core.slots import SlotHeaders
from ..envoy import module, render
from .envoy_data import Source, list_or_empty, mapping_or_empty, repeated, value_of
from .envoy_policy import NAMESPACE, PolicyRoute, PolicyRule
from .envoy_routes import OUR_ROUTE_FILTERS, SAMPLER_FILTER, RouteRewriter

ANTI_SPOOF_FILTER = render.ANTI_SPOOF_FILTER
ENVOY_FILE = "envoy.yaml"
POLICY_FILE = "policy.yaml"

_HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_HCM_NAMES = ("envoy.filters.network.http_connection_manager", "envoy.http_connection_manager")
_ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_ROUTE_CONFIG_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


def dns_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return name[:200].strip("-") or "route"


@dataclass
class Options:
    slot_headers: SlotHeaders
    topology: render.Topology
    output_dir: Path | None
    # --inline module: the path Envoy loads the module from; None: the ext_proc sampler decides.
    module_path: str | None = None
    # --inline lua: the generated Lua decides.
    lua: bool = False

    @property
    def in_envoy(self) -> bool:
        """Envoy decides itself (module or Lua): no sampler, no ext_proc."""
        return self.module_path is not None or self.lua


class Converter(RouteRewriter):
    def __init__(self, options: Options, read: Callable[[Path], Source]) -> None:
        super().__init__(options.slot_headers)
        self.o = options
        self.read = read
        self.http_routes: list[PolicyRoute] = []
        self.route_names: set[str] = set()
        # RDS: resolved input path -> its source; (path, route config name) -> converted?
        self.rds_sources: dict[Path, Source] = {}
        self.rds_converted: dict[tuple[Path, str], bool] = {}
        self.rds_outputs: dict[Path, str] = {}
        # --inline module or lua: each mirror rule's routes (variants and plain), given the
        # rule's module settings or script once the whole Policy is known (convert_envoy).
        self.rule_routes: list[tuple[Source, list[dict[str, Any]], str]] = []
        # An earlier conversion's ext_proc filter, met in a connection manager: that
        # conversion added the mirror-sampler cluster too (a user's cluster of that name is kept).
        self.earlier_sampler = False
        # Routes that send to (or mirror to) a cluster named mirror-sampler: "FILE: PATH: route 'NAME'".
        self.to_sampler_name: list[str] = []

    # -- bootstrap -----------------------------------------------------------

    def bootstrap(self, src: Source) -> bool:
        boot = src.data
        static = self.mapping(src, "static_resources", value_of(boot, "static_resources"))
        if value_of(boot, "dynamic_resources") is not None:
            self.notes.append(
                f"{src.label}: dynamic_resources: listeners and routes from xDS are not converted (only static_resources and RDS files)"
            )
        if static is None:
            if not self.problems:
                self.problems.append(f"{src.label}: static_resources: is required (an Envoy bootstrap with listeners)")
            return False
        clusters_key = src.field(static, "clusters")
        clusters = self.listing(src, f"static_resources.{clusters_key}", static.get(clusters_key))
        named = [i for i, c in enumerate(clusters) if isinstance(c, dict) and c.get("name") == SAMPLER_CLUSTER]
        affected = False
        for li, listener in enumerate(self.listing(src, "static_resources.listeners", value_of(static, "listeners"))):
            lpath = f"static_resources.listeners[{li}]"
            lst = self.mapping(src, lpath, listener)
            if lst is None:
                continue
            lname = str(lst.get("name") or f"listener-{li}")
            listed = self.listing(src, f"{lpath}.filter_chains", value_of(lst, "filter_chains"))
            chains = [(f"{lpath}.filter_chains[{ci}]", c) for ci, c in enumerate(listed)]
            if value_of(lst, "default_filter_chain") is not None:
                chains.append((f"{lpath}.default_filter_chain", value_of(lst, "default_filter_chain")))
            for cpath, raw_chain in chains:
                chain = self.mapping(src, cpath, raw_chain)
                if chain is None:
                    continue
                for fi, raw_filter in enumerate(self.listing(src, f"{cpath}.filters", value_of(chain, "filters"))):
                    fpath = f"{cpath}.filters[{fi}]"
                    flt = self.mapping(src, fpath, raw_filter)
                    if flt is None:
                        continue
                    config = value_of(flt, "typed_config")
                    named_hcm = flt.get("name") in _HCM_NAMES and "@type" not in mapping_or_empty(config)
                    is_hcm = isinstance(config, dict) and (config.get("@type") == _HCM_TYPE or named_hcm)
                    if is_hcm and self.connection_manager(src, f"{fpath}.{src.field(flt, 'typed_config')}", config, lname):
                        affected = True
        # The sampler cluster of an earlier conversion goes (added again below if still
        # needed); a cluster of the user's that has its name stays.
        kept = [c for i, c in enumerate(clusters) if not (self.earlier_sampler and i in named)]
        if affected and not self.o.in_envoy:
            if named and not self.earlier_sampler:
                self.sampler_name_taken(src, f"static_resources.{clusters_key}[{named[0]}]")
            kept.append(render.as_data(render.sampler_cluster(self.o.topology), src.casing))
        if clusters or affected:
            static[clusters_key] = kept
        return affected

    def sampler_name_taken(self, src: Source, where: str) -> None:
        """The user's own cluster is named like the sampler's gRPC cluster, which the
        conversion adds: replacing it would send its routes' requests to the sampler."""
        why = (
            "a cluster of your own, not one an earlier conversion added; the conversion adds the sampler's gRPC cluster "
            "under that name: rename your cluster (and what uses it) and convert again"
        )
        if not self.to_sampler_name:
            self.problems.append(f"{src.label}: {where}: cluster {SAMPLER_CLUSTER!r} is {why}")
        for use in self.to_sampler_name:
            self.problems.append(f"{use} cluster {SAMPLER_CLUSTER!r} ({src.label}: {where}), {why}")

    def note_sampler_name(self, src: Source, path: str, route: dict[str, Any]) -> None:
        """Remembers a route that sends or mirrors to a cluster named like the sampler's."""
        action = mapping_or_empty(value_of(route, "route"))
        weighted = mapping_or_empty(value_of(action, "weighted_clusters"))
        weights = repeated(value_of(weighted, "clusters"))
        primaries = [value_of(action, "cluster"), *(value_of(c, "name") for c in weights if isinstance(c, dict))]
        mirrors = [value_of(m, "cluster") for m in repeated(value_of(action, "request_mirror_policies")) if isinstance(m, dict)]
        what = f"route {route['name']!r}" if route.get("name") else "unnamed route"
        if SAMPLER_CLUSTER in primaries:
            self.to_sampler_name.append(f"{src.label}: {path}: {what} sends its requests to")
        elif SAMPLER_CLUSTER in mirrors:
            self.to_sampler_name.append(f"{src.label}: {path}: {what} mirrors to")

    def connection_manager(self, src: Source, path: str, hcm: dict[str, Any], listener: str) -> bool:
        filters_key = src.field(hcm, "http_filters")
        listed = self.listing(src, f"{path}.{filters_key}", hcm.get(filters_key))
        if any(isinstance(f, dict) and f.get("name") == SAMPLER_FILTER for f in listed):
            self.earlier_sampler = True
        filters = [
            f for f in listed
            if not (isinstance(f, dict) and f.get("name") in (*OUR_ROUTE_FILTERS, ANTI_SPOOF_FILTER))
        ]  # fmt: skip
        if filters_key in hcm:
            hcm[filters_key] = filters
        inline = value_of(hcm, "route_config")
        rds = value_of(hcm, "rds")
        converted = False
        if inline is not None:
            rc = self.mapping(src, f"{path}.route_config", inline)
            if rc is not None:
                rc_name = rc.get("name") or "route-config"
                described = f"listener {listener!r}, route configuration {rc_name!r}"
                converted = self.route_config(src, f"{path}.{src.field(hcm, 'route_config')}", rc, f"{listener}-{rc_name}", described)
        elif rds is not None:
            converted = self.rds(src, f"{path}.{src.field(hcm, 'rds')}", rds)
        elif value_of(hcm, "scoped_routes") is not None:
            self.notes.append(f"{src.label}: {path}.scoped_routes: scoped routes are not converted")
        if not converted:
            return False
        router_at = next(
            (i for i, f in enumerate(filters) if isinstance(f, dict) and (
                f.get("name") == "envoy.filters.http.router" or (value_of(f, "typed_config") or {}).get("@type") == _ROUTER_TYPE
            )),
            None,
        )  # fmt: skip
        if router_at is None:
            self.problems.append(
                f"{src.label}: {path}.{filters_key}: no envoy.filters.http.router filter to put the sampler's filters ahead of"
            )
            return False
        if self.o.module_path is not None:
            # The module strips client-sent slot and marker headers itself, on every route.
            ours = [render.as_data(module.slot_http_filter(self.slot_headers, self.o.module_path), src.casing)]
        elif self.o.lua:
            # Forged slot and marker headers go on every route, as with the sampler; then
            # each rule's own script (per route) decides.
            ours = [render.as_data(f, src.casing) for f in (render.anti_spoof_filter(self.slot_headers), render.decide_filter())]
        else:
            ours = [
                render.as_data(render.anti_spoof_filter(self.slot_headers), src.casing),
                render.as_data(render.ext_proc_filter(self.o.topology.message_timeout_ms, SAMPLER_FILTER), src.casing),
            ]
        hcm[filters_key] = filters[:router_at] + ours + filters[router_at:]
        if value_of(hcm, "use_remote_address") is not True:
            self.notes.append(
                f"{src.label}: {path}: use_remote_address is not true: Envoy may keep the x-request-id a client sends "
                "(the sampling key), letting it choose whether it is mirrored; set use_remote_address and internal_address_config "
                "so that only trusted clients keep theirs"
            )
        return True

    # -- RDS files -----------------------------------------------------------

    def rds(self, src: Source, path: str, rds: Any) -> bool:
        rds_map = self.mapping(src, path, rds)
        if rds_map is None:
            return False
        name = value_of(rds_map, "route_config_name")
        source = self.mapping(src, f"{path}.config_source", value_of(rds_map, "config_source")) or {}
        pcs = value_of(source, "path_config_source")
        if isinstance(pcs, dict) and isinstance(value_of(pcs, "path"), str):
            holder, where = pcs, f"{path}.config_source.path_config_source"
        elif isinstance(value_of(source, "path"), str):
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
            rds_src = self.rds_sources[resolved] = self.read(found)
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
        watched = value_of(holder, "watched_directory")
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

    def rds_resource(self, src: Source, name: str) -> bool:
        converted = False
        for i, raw in enumerate(self.listing(src, "resources", value_of(src.data, "resources"))):
            rc = self.mapping(src, f"resources[{i}]", raw)
            if rc is None or rc.get("@type") not in (_ROUTE_CONFIG_TYPE, None) or rc.get("name") != name:
                continue
            converted = self.route_config(src, f"resources[{i}]", rc, name, f"route configuration {name!r} (RDS)") or converted
        return converted

    # -- route configurations ----------------------------------------------

    def route_config(self, src: Source, path: str, rc: dict[str, Any], owner: str, described: str) -> bool:
        vhosts_key = src.field(rc, "virtual_hosts")
        vhosts = self.listing(src, f"{path}.{vhosts_key}", rc.get(vhosts_key))
        for vi, raw in enumerate(vhosts):
            vh = self.mapping(src, f"{path}.{vhosts_key}[{vi}]", raw)
            if vh is not None:
                routes_key = src.field(vh, "routes")
                routes = self.listing(src, f"{path}.{vhosts_key}[{vi}].{routes_key}", vh.get(routes_key))
                if routes_key in vh:
                    vh[routes_key] = self.unconvert(src, routes)
                for ri, route in enumerate(list_or_empty(vh.get(routes_key))):
                    if isinstance(route, dict):
                        self.note_sampler_name(src, f"{path}.{vhosts_key}[{vi}].{routes_key}[{ri}]", route)
        if value_of(rc, "request_mirror_policies"):
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
            routes = list_or_empty(vh.get(routes_key))
            vname = str(vh.get("name") or f"vhost-{vi}")
            if value_of(vh, "request_mirror_policies"):
                self.notes.append(
                    f"{src.label}: {vpath}.request_mirror_policies: mirrors for a whole virtual host are not converted; "
                    f"virtual host {vname!r} left as it was"
                )
                plans.append((vh, routes_key, [(r, None) for r in routes]))
                continue
            http_route: PolicyRoute | None = None
            planned: list[Any] = []
            for ri, route in enumerate(routes):
                rpath = f"{vpath}.{routes_key}[{ri}]"
                mirrors = self.route_mirrors(src, rpath, route) if isinstance(route, dict) else None
                if mirrors is None:
                    planned.append((route, None))
                    continue
                if http_route is None:
                    http_route = self.new_http_route(owner, vname, f"{described}, virtual host {vname!r}")
                elif len(http_route.rules) == MAX_RULES_PER_ROUTE:
                    # Gateway API's limit: the virtual host's next rules go to an HTTPRoute of their own.
                    continued = f"{described}, virtual host {vname!r}, continued (an HTTPRoute holds at most {MAX_RULES_PER_ROUTE} rules)"
                    http_route = self.new_http_route(owner, vname, continued)
                # The sampler's id of the rule (namespace/name/index), which Envoy sends.
                rule_id = f"{NAMESPACE}/{http_route.name}/{len(http_route.rules)}"
                action = value_of(route, "route") or {}
                route_name = f"route {route['name']!r}" if route.get("name") else "unnamed route"
                where = f"{vpath.split('.')[-1]}.{routes_key}[{ri}]"
                primaries = self.primaries(action, {m.cluster for m in mirrors})
                comment = f"{route_name} ({where})"
                if len(primaries) > MAX_BACKEND_REFS_PER_RULE:
                    comment += (
                        f"; backendRefs: the first of its {len(primaries)} weighted clusters only "
                        f"(a rule holds at most {MAX_BACKEND_REFS_PER_RULE}, and one is all the sampler needs)"
                    )
                    primaries = primaries[:1]
                http_route.rules.append(PolicyRule(rule_id, mirrors, primaries, comment))
                for m in mirrors:
                    if m.runtime_key is not None:
                        change = (
                            "change its default_value and convert the original again"
                            if self.o.in_envoy
                            else f"change the fraction of rule {rule_id} in policy.yaml instead"
                        )
                        self.notes.append(
                            f"{src.label}: {rpath}: runtime_key {m.runtime_key!r} (mirror to {m.cluster!r}) is no longer in effect: "
                            f"{m.numerator}/{m.denominator} (its default_value) is mirrored; {change}"
                        )
                planned.append((route, (rule_id, mirrors)))
            plans.append((vh, routes_key, planned))
        if not any(plan is not None for _, _, planned in plans for _, plan in planned):
            return False
        for vh, routes_key, planned in plans:
            out: list[Any] = []
            for route, plan in planned:
                if plan is None:
                    if isinstance(route, dict) and not self.o.in_envoy:
                        self.per_route(src, route, render.as_data(render.ext_proc_off(), src.casing))
                    out.append(route)
                else:
                    converted = self.convert_route(src, route, *plan)
                    if self.o.in_envoy:
                        self.rule_routes.append((src, converted, plan[0]))
                    out.extend(converted)
            vh[routes_key] = out
        return True

    def new_http_route(self, owner: str, vhost: str, comment: str) -> PolicyRoute:
        base = dns_name(f"{owner}-{vhost}")
        name, n = base, 2
        while name in self.route_names:
            name = f"{base}-{n}"
            n += 1
        self.route_names.add(name)
        route = PolicyRoute(name, comment)
        self.http_routes.append(route)
        return route

    def primaries(self, action: dict[str, Any], mirrors: set[str]) -> list[str]:
        """backendRefs for policy.yaml: the sampler only needs one (it reads
        them to know that the rule has a live backend: a rule without one
        mirrors nothing), named like the route's cluster(s) where that is a
        valid name no mirror takes (check-config lists them)."""
        names: list[str] = []
        if isinstance(value_of(action, "cluster"), str):
            names = [value_of(action, "cluster")]
        weighted = value_of(action, "weighted_clusters")
        if isinstance(weighted, dict):
            names = [
                str(c["name"]) for c in repeated(value_of(weighted, "clusters")) if isinstance(c, dict) and isinstance(c.get("name"), str)
            ]
        out: list[str] = []
        for name in names or ["primary"]:
            ref = name if NAME.match(name) else dns_name(name)
            while ref in mirrors or ref == SAMPLER_CLUSTER or ref in out:
                ref = f"{ref}-primary"
            out.append(ref)
        return out
