"""The capture points, added to the Envoy configuration `envoy-config` renders.

Verified against Envoy 1.40 (docs/compare.md, tests/e2e/test_compare.py):

- Each side is captured by a Lua filter (``CAPTURE_LUA``) after the deciding
  filter, which copies the response's headers and the first ``bodyLimit``
  bytes of its body into the request's dynamic metadata as they pass (the
  body streams on: nothing waits), and Envoy's gRPC access log ships the
  entry to the observers after the response has gone, batched with other
  requests' on one stream per worker. The filter has no default script: only
  routes that name it (``LuaPerRoute``) run it, and its route metadata says
  who is captured (a ``CaptureTag``) and the bound. The variant routes of a compared rule
  name it; Lua reads its per-route configuration in its own turn, after the
  decision's re-match (``clear_route_cache``), so a request the decision did
  not mirror runs nothing. The access log logs only entries that carry a tag.
- Shadow side: the mirror policy of a compared target sends the copy to an
  internal listener of the same Envoy (no socket) and names the target in a
  header; the internal listener's route for that rule and target removes the
  header, captures the response the same way, and forwards to the target's
  own cluster (whose stats stay what they were). It never mirrors again.

The deciding filter may be the sampler's ext_proc, the inline Lua or the dynamic
module: each re-matches by clearing the route cache before the capture filter's
turn, so the variant's configuration applies alike (tests/e2e/test_compare_inline.py).
The same pieces go into a whole bootstrap (``add_capture``), into the routes file
of filesystem RDS (``add_capture_to_discovery``: `up`, whose internal listener's
routes are a file too, ``capture_discovery``), and into the snippet
(``add_capture_to_snippet``, in the snippet's snake_case).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Final

from betterproto2 import Casing

from ..config.addresses import is_ip_address
from ..core.policy import Policy
from ..envoy import module, render
from ..envoy.render import Address, Topology, as_data, set_header_mutation, to_yaml
from .config import CompareConfig
from .records import BODY_FIELD, CAPTURE_NAMESPACE, CREDENTIALS, HEADERS_FIELD, TAG_FIELD, TRUNCATED_FIELD, CaptureTag, Side

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import envoy_data_plane.envoy.config.accesslog.v3 as accesslog
    import envoy_data_plane.envoy.config.cluster.v3 as cluster
    import envoy_data_plane.envoy.config.core.v3 as core
    import envoy_data_plane.envoy.config.endpoint.v3 as endpoint
    import envoy_data_plane.envoy.config.listener.v3 as listener
    import envoy_data_plane.envoy.config.route.v3 as route
    import envoy_data_plane.envoy.extensions.access_loggers.grpc.v3 as grpc_log
    import envoy_data_plane.envoy.extensions.bootstrap.internal_listener.v3 as internal_listener
    import envoy_data_plane.envoy.extensions.filters.http.lua.v3 as lua
    import envoy_data_plane.envoy.extensions.filters.http.router.v3 as router
    import envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 as hcm
    import envoy_data_plane.envoy.extensions.upstreams.http.v3 as upstream_http
    import envoy_data_plane.envoy.type.matcher.v3 as matcher
    from envoy_data_plane.google.protobuf import Any as AnyMessage
    from envoy_data_plane.google.protobuf import Struct, Value

CAPTURE_FILTER: Final = "mirror-sampler.compare-capture"
CAPTURE_SCRIPT: Final = "capture"
# http.<connection manager>.lua.compare.executions: one per captured response.
CAPTURE_STATS: Final = "compare"
CAPTURE_SERVICE_CLUSTER: Final = "mirror-sampler-compare"
CAPTURE_SHADOW_CLUSTER: Final = "mirror-sampler-compare-shadow"
CAPTURE_LISTENER: Final = "mirror-sampler-compare-shadow"
# http.<this>. in Envoy's stats: the internal listener's connection manager.
CAPTURE_STAT_PREFIX: Final = "compare_shadow"
CAPTURE_LOG: Final = "mirror-sampler-compare"
# On the mirrored copy only, between the mirror policy and the capture listener.
TARGET_HEADER: Final = "x-mirror-sampler-compare-target"
HCM_TYPE: Final = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
# Envoy sends the entries it holds every 200 ms (its default: 1 s), or sooner once
# they pass its default 16 KiB (per worker and side). Measured against batches of
# 1 MiB or 1 s (the observers spent less, the primary's p99 rose: Envoy serialises
# a batch on the worker at once) and no batching (the observers spent twice as
# much): docs/compare.md "Cost".
LOG_FLUSH_INTERVAL: Final = datetime.timedelta(milliseconds=200)
OBSERVER_PING_INTERVAL: Final = datetime.timedelta(seconds=2)
OBSERVER_PING_TIMEOUT: Final = datetime.timedelta(seconds=2)

# The route's metadata (under the filter's name) names who is captured, and the
# bound: in the routes, so that `up` changes it live (filesystem RDS). The body
# is copied chunk by chunk as it passes, up to the bound, and never held back.
LIMIT_FIELD: Final = "body_limit"
CAPTURE_LUA: Final = f"""\
-- mirror-sampler: this side's response, into the request's dynamic metadata;
-- Envoy's gRPC access log ships it after the response (docs/compare.md).
local NAMESPACE = "{CAPTURE_NAMESPACE}"
function envoy_on_response(handle)
  local route = handle:metadata()
  local tag = route:get("{TAG_FIELD}")
  if tag == nil then
    return
  end
  local limit = route:get("{LIMIT_FIELD}") or 0
  local lines = {{}}
  for name, value in pairs(handle:headers()) do
    lines[#lines + 1] = name .. ": " .. value
  end
  local parts, kept, truncated = {{}}, 0, false
  for chunk in handle:bodyChunks() do
    local length = chunk:length()
    local take = math.min(length, limit - kept)
    if take > 0 then
      parts[#parts + 1] = chunk:getBytes(0, take)
      kept = kept + take
    end
    if take < length then
      truncated = true
    end
  end
  local metadata = handle:streamInfo():dynamicMetadata()
  metadata:set(NAMESPACE, "{HEADERS_FIELD}", handle:base64Escape(table.concat(lines, "\\n")))
  metadata:set(NAMESPACE, "{BODY_FIELD}", handle:base64Escape(table.concat(parts)))
  metadata:set(NAMESPACE, "{TRUNCATED_FIELD}", truncated)
  metadata:set(NAMESPACE, "{TAG_FIELD}", tag)
end
"""


def capture_filter() -> hcm.HttpFilter:
    """The Lua filter, with no default script: routes that capture name ``CAPTURE_SCRIPT``."""
    script = core.DataSource(inline_string=CAPTURE_LUA)
    config = lua.Lua(source_codes={CAPTURE_SCRIPT: script}, stat_prefix=CAPTURE_STATS)
    return hcm.HttpFilter(name=CAPTURE_FILTER, typed_config=AnyMessage.pack(config))


def capture_log(private_headers: frozenset[str]) -> accesslog.AccessLog:
    """Envoy's gRPC access log of the captured requests (those whose capture filter
    left a tag), to the observers; with the credentials and private headers the
    observer scrubs from what it stores. Envoy keeps one stream per worker and
    log configuration: the same for both sides, so a request's primary and its
    copies (which the internal listener serves on the same worker) travel on one
    stream to one observer, and usually join in one batch."""
    common = grpc_log.CommonGrpcAccessLogConfig(
        log_name=CAPTURE_LOG,
        grpc_service=core.GrpcService(envoy_grpc=core.GrpcServiceEnvoyGrpc(cluster_name=CAPTURE_SERVICE_CLUSTER)),
        transport_api_version=core.ApiVersion.V3,
        buffer_flush_interval=LOG_FLUSH_INTERVAL,
    )
    logger = grpc_log.HttpGrpcAccessLogConfig(common_config=common, additional_request_headers_to_log=sorted(CREDENTIALS | private_headers))
    tagged = accesslog.MetadataFilter(
        matcher=matcher.MetadataMatcher(
            filter=CAPTURE_NAMESPACE,
            path=[matcher.MetadataMatcherPathSegment(key=TAG_FIELD)],
            value=matcher.ValueMatcher(present_match=True),
        ),
        # Envoy's default logs a request whose metadata lacks the key.
        match_if_key_not_found=False,
    )
    return accesslog.AccessLog(
        name="envoy.access_loggers.http_grpc",
        filter=accesslog.AccessLogFilter(metadata_filter=tagged),
        typed_config=AnyMessage.pack(logger),
    )


def _capture_here() -> AnyMessage:
    return AnyMessage.pack(lua.LuaPerRoute(name=CAPTURE_SCRIPT))


def _tag_metadata(tag: CaptureTag, body_limit: int) -> core.Metadata:
    fields = {TAG_FIELD: Value(string_value=tag.encode()), LIMIT_FIELD: Value(number_value=body_limit)}
    return core.Metadata(filter_metadata={CAPTURE_FILTER: Struct(fields=fields)})


def _exact(name: str, value: str) -> route.HeaderMatcher:
    return route.HeaderMatcher(name=name, string_match=matcher.StringMatcher(exact=value))


def capture_route_configuration(compare: CompareConfig, marker_header: str) -> route.RouteConfiguration:
    """The internal listener's routes: one per compared rule and target."""
    routes = [
        route.Route(
            name=f"{rule_id} compare {target}",
            match=route.RouteMatch(prefix="/", headers=[_exact(marker_header, rule_id), _exact(TARGET_HEADER, target)]),
            # A shadow that never answers: Envoy answers 504 for it after this (shadow_error).
            route=route.RouteAction(cluster=target, timeout=datetime.timedelta(seconds=compare.shadow_timeout_s)),
            request_headers_to_remove=[TARGET_HEADER],
            typed_per_filter_config={CAPTURE_FILTER: _capture_here()},
            metadata=_tag_metadata(CaptureTag(Side.SHADOW, rule_id, (target,)), compare.body_limit),
        )
        for rule_id, targets in compare.compared().items()
        for target in targets
    ]
    return route.RouteConfiguration(name=CAPTURE_LISTENER, virtual_hosts=[route.VirtualHost(name="shadows", domains=["*"], routes=routes)])


def capture_discovery(compare: CompareConfig, marker_header: str) -> dict[str, Any]:
    """The file behind the internal listener's filesystem RDS (``capture_listener``'s ``rds_path``)."""
    return {"resources": [AnyMessage.pack(capture_route_configuration(compare, marker_header)).to_dict()]}


def envoy_restart_reason(in_force: CompareConfig | None, edited: CompareConfig | None) -> str | None:
    """Why an Envoy capturing for ``in_force`` (None: started without capture points)
    cannot capture as ``edited`` says by new routes files alone (``capture_discovery``,
    ``add_capture_to_discovery``), or None when it can."""
    if in_force is None:
        return "spec.compare now compares rules: the capture points and the observer start with up" if edited and edited.rules else None
    if edited is None:
        return None  # compare nothing: the routes stop sending copies to the capture points
    if in_force.private_headers != edited.private_headers:
        return "spec.compare.privateHeaders changed: Envoy's listeners carry it (the access log's request headers)"
    return None


def compare_in_force(in_force: CompareConfig | None, edited: CompareConfig | None) -> CompareConfig | None:
    """What an Envoy capturing for ``in_force`` compares once the routes files say
    ``edited`` (``envoy_restart_reason`` found nothing against it): no section, no rules."""
    if in_force is None:
        return None
    return edited if edited is not None else dataclasses.replace(in_force, rules={})


def capture_listener(compare: CompareConfig, marker_header: str, rds_path: str | None = None) -> listener.Listener:
    """The internal listener mirrored copies of compared targets go through; its
    routes served from ``rds_path`` (filesystem RDS) when given, so that which rules
    and targets compare, the shadow's timeout and the bound can change without a restart."""
    routes: dict[str, Any] = (
        {"rds": render.file_rds(CAPTURE_LISTENER, rds_path)}
        if rds_path
        else {"route_config": capture_route_configuration(compare, marker_header)}
    )
    manager = hcm.HttpConnectionManager(
        stat_prefix=CAPTURE_STAT_PREFIX,
        **routes,
        http_filters=[
            capture_filter(),
            hcm.HttpFilter(name="envoy.filters.http.router", typed_config=AnyMessage.pack(router.Router())),
        ],
        access_log=[capture_log(compare.private_headers)],
        # The copy keeps the primary's request id: the join key.
        preserve_external_request_id=True,
    )
    return listener.Listener(
        name=CAPTURE_LISTENER,
        internal_listener=listener.ListenerInternalListenerConfig(),
        filter_chains=[
            listener.FilterChain(
                filters=[listener.Filter(name="envoy.filters.network.http_connection_manager", typed_config=AnyMessage.pack(manager))]
            )
        ],
    )


def capture_clusters(observers: Sequence[Address]) -> list[cluster.Cluster]:
    """The observers' cluster (resolved by DNS when an observer is named, as compose's
    service names are: a STATIC cluster takes addresses only) and the internal listener's."""
    # An observer that accepts the connection and never answers would have Envoy hold
    # every entry it logs (measured: ~1 KiB each, none dropped): unanswered pings
    # close the connection, and the entries with it.
    keepalive = core.KeepaliveSettings(interval=OBSERVER_PING_INTERVAL, timeout=OBSERVER_PING_TIMEOUT)
    http2 = upstream_http.HttpProtocolOptions(
        explicit_http_config=upstream_http.HttpProtocolOptionsExplicitHttpConfig(
            http2_protocol_options=core.Http2ProtocolOptions(connection_keepalive=keepalive)
        )
    )

    def endpoints(name: str, addresses: list[core.Address]) -> endpoint.ClusterLoadAssignment:
        return endpoint.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                endpoint.LocalityLbEndpoints(lb_endpoints=[endpoint.LbEndpoint(endpoint=endpoint.Endpoint(address=a)) for a in addresses])
            ],
        )

    resolve = not all(is_ip_address(a.host) for a in observers)
    observer_addresses = [core.Address(socket_address=core.SocketAddress(address=a.host, port_value=a.port)) for a in observers]
    return [
        cluster.Cluster(
            name=CAPTURE_SERVICE_CLUSTER,
            type=cluster.ClusterDiscoveryType.STRICT_DNS if resolve else cluster.ClusterDiscoveryType.STATIC,
            connect_timeout=datetime.timedelta(seconds=1),
            load_assignment=endpoints(CAPTURE_SERVICE_CLUSTER, observer_addresses),
            typed_extension_protocol_options={"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": AnyMessage.pack(http2)},
            # Streams are short but many: never fail the observation on Envoy's default 1024.
            circuit_breakers=cluster.CircuitBreakers(
                thresholds=[cluster.CircuitBreakersThresholds(max_requests=1_000_000, max_pending_requests=1_000_000)]
            ),
        ),
        cluster.Cluster(
            name=CAPTURE_SHADOW_CLUSTER,
            type=cluster.ClusterDiscoveryType.STATIC,
            connect_timeout=datetime.timedelta(seconds=1),
            load_assignment=endpoints(
                CAPTURE_SHADOW_CLUSTER,
                [core.Address(envoy_internal_address=core.EnvoyInternalAddress(server_listener_name=CAPTURE_LISTENER))],
            ),
        ),
    ]


def _capture_route(entry: dict[str, Any], compared: Mapping[str, Sequence[str]], body_limit: int, casing: Casing) -> None:
    """Variant route of a compared rule: capture, and send its compared copies through
    the capture listener. ``entry`` is a route as data, its field names spelled in
    ``casing``."""
    name = entry.get("name", "")
    rule_id, is_variant, _ = name.partition(" mirror ")
    if rule_id not in compared or not is_variant:
        return
    observed = []
    for policy in entry.get("route", {}).get(casing("request_mirror_policies"), []):
        target = policy.get("cluster")
        if target in compared[rule_id]:
            policy["cluster"] = CAPTURE_SHADOW_CLUSTER
            policy.setdefault(casing("request_headers_mutations"), []).append(as_data(set_header_mutation(TARGET_HEADER, target), casing))
            observed.append(target)
    if not observed:  # a variant mirroring only targets not compared captures nothing
        return
    entry.setdefault(casing("typed_per_filter_config"), {})[CAPTURE_FILTER] = as_data(_capture_here(), casing)
    tag = as_data(_tag_metadata(CaptureTag(Side.PRIMARY, rule_id, tuple(observed)), body_limit), casing)
    metadata = entry.setdefault("metadata", {}).setdefault(casing("filter_metadata"), {})
    metadata.update(tag[casing("filter_metadata")])


def _capture_virtual_hosts(hosts: Sequence[dict[str, Any]], compare: CompareConfig, casing: Casing) -> None:
    compared = compare.compared()
    for host in hosts:
        for entry in host.get("routes", []):
            _capture_route(entry, compared, compare.body_limit, casing)


def add_capture_routes(route_configuration: Mapping[str, Any], compare: CompareConfig) -> dict[str, Any]:
    """A copy of a RouteConfiguration (``as_data`` form) whose compared rules capture."""
    out = copy.deepcopy(dict(route_configuration))
    _capture_virtual_hosts(out.get("virtualHosts", []), compare, Casing.CAMEL)
    return out


def add_capture_to_discovery(discovery: Mapping[str, Any], compare: CompareConfig) -> dict[str, Any]:
    """The routes file of filesystem RDS (a DiscoveryResponse, `up`), each of its
    RouteConfigurations with ``add_capture_routes``."""
    return {**discovery, "resources": [add_capture_routes(r, compare) for r in discovery["resources"]]}


def _internal_listener_extension(casing: Casing) -> dict[str, Any]:
    extension = AnyMessage.pack(internal_listener.InternalListener())
    return {"name": "envoy.bootstrap.internal_listener", casing("typed_config"): as_data(extension, casing)}


def add_capture(
    bootstrap: Mapping[str, Any],
    compare: CompareConfig,
    marker_header: str,
    observers: Sequence[Address],
    capture_rds_path: str | None = None,
) -> dict[str, Any]:
    """A copy of a rendered bootstrap (``as_data`` form) that captures the
    responses of the compared rules' mirrored requests, for their compared
    targets, and logs them to ``observers``; a compared shadow that has not
    answered after ``compare.shadow_timeout_s`` is answered 504 by Envoy.
    Routes served by RDS are not in the bootstrap: ``add_capture_to_discovery`` them,
    and write ``capture_discovery`` to ``capture_rds_path`` when it is given."""
    out = copy.deepcopy(dict(bootstrap))
    static = out["staticResources"]
    for entry in static["listeners"]:
        for chain in entry.get("filterChains", []):
            for network_filter in chain.get("filters", []):
                manager = network_filter.get("typedConfig", {})
                if manager.get("@type") != HCM_TYPE:
                    continue
                filters = manager["httpFilters"]
                # After the deciding filter (its re-match picks the variant), before the router.
                filters.insert(len(filters) - 1, as_data(capture_filter()))
                manager.setdefault("accessLog", []).append(as_data(capture_log(compare.private_headers)))
                if "routeConfig" in manager:
                    manager["routeConfig"] = add_capture_routes(manager["routeConfig"], compare)
    static["listeners"].append(as_data(capture_listener(compare, marker_header, capture_rds_path)))
    static["clusters"].extend(as_data(c) for c in capture_clusters(observers))
    out.setdefault("bootstrapExtensions", []).append(_internal_listener_extension(Casing.CAMEL))
    return out


def add_capture_to_snippet(
    snippet: Mapping[str, Any], compare: CompareConfig, marker_header: str, observers: Sequence[Address]
) -> dict[str, Any]:
    """A copy of a snippet (snake_case data: http_filters, clusters, virtual_hosts) with
    the capture points, and the pieces a snippet has no place for otherwise: the
    access log of your connection manager (``access_log``), the internal listener
    (``listeners``) and Envoy's extension that runs it (``bootstrap_extensions``)."""
    snake = Casing.SNAKE
    out = copy.deepcopy(dict(snippet))
    # The snippet's filters go ahead of the user's router: the capture filter is their last.
    out["http_filters"] = [*out["http_filters"], as_data(capture_filter(), snake)]
    out["clusters"] = [*out["clusters"], *(as_data(c, snake) for c in capture_clusters(observers))]
    _capture_virtual_hosts(out["virtual_hosts"], compare, snake)
    out["access_log"] = [as_data(capture_log(compare.private_headers), snake)]
    out["listeners"] = [as_data(capture_listener(compare, marker_header), snake)]
    out["bootstrap_extensions"] = [_internal_listener_extension(snake)]
    return out


SNIPPET_COMMENT = """\
# spec.compare (docs/compare.md): the capture points are in it too.
#  - http_filters: the last one, mirror-sampler.compare-capture (Lua), must come
#    after the deciding filter(s) above and before the router; it runs only on
#    the compared rules' mirrored routes (they carry its per-route config and
#    metadata);
#  - access_log: add it to your connection manager's access_log: it sends the
#    captured requests (only those) to the observers;
#  - clusters: mirror-sampler-compare, the observers (`mirror-sampler compare
#    capture`; `--observer HOST:PORT`, repeatable), and
#    mirror-sampler-compare-shadow, the internal listener below; the compared
#    targets' mirror policies point at it, and it forwards to each target's own
#    cluster;
#  - listeners: the internal listener compared copies go through (no socket):
#    add it to static_resources.listeners;
#  - bootstrap_extensions: Envoy's internal listener extension, at the top level
#    of your bootstrap (once: keep yours if you have it).
"""


def render_with_capture(
    policy: Policy,
    topology: Topology,
    compare: CompareConfig,
    observers: Sequence[Address],
    *,
    module_path: str | None = None,
    snippet_only: bool = False,
    capture_rds_path: str | None = None,
) -> str:
    """What ``envoy-config`` and ``up`` write when the configuration has spec.compare:
    the configuration of the engine (the sampler's ext_proc; inline Lua when
    ``topology.inline``; the dynamic module at ``module_path``), whole or as a
    snippet, with the capture points of the compared rules and targets (the
    internal listener's routes from ``capture_rds_path``, `up`, when given)."""
    marker = policy.slot_headers.marker
    if snippet_only:
        if module_path:
            base, comment = module.snippet(policy, topology, module_path), module.SNIPPET_COMMENT
        else:
            base, comment = render.snippet(policy, topology), render.SNIPPET_COMMENT
        return to_yaml(add_capture_to_snippet(base, compare, marker, observers), comment + SNIPPET_COMMENT)
    config = module.bootstrap_config(policy, topology, module_path) if module_path else render.bootstrap_config(policy, topology)
    return to_yaml(add_capture(as_data(config), compare, marker, observers, capture_rds_path))
