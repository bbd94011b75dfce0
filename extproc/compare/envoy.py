"""The capture points, added to the Envoy configuration `envoy-config` renders.

Verified against Envoy 1.40 (docs/compare.md, tests/e2e/test_compare.py):

- Primary side: an ext_proc filter in ``observability_mode`` (Envoy sends and
  does not wait: the primary is never slowed) after the deciding filter,
  disabled on the listener. Envoy builds a request's filter chain once, from
  the first route it matched (the plain route, before the decision's
  ``clear_route_cache``), so enabling the filter on the variant routes alone
  would never create it. The plain route of each compared rule therefore
  enables it with the filter's default processing mode, which sends nothing
  (no gRPC stream for requests that are not mirrored); each variant route
  overrides the processing mode to send the response (ext_proc reads its
  per-route configuration when its own turn comes, after the re-match) and
  names the rule and the mirrored targets in gRPC metadata.
- Shadow side: the mirror policy of a compared target sends the copy to an
  internal listener of the same Envoy (no socket) and names the target in a
  header; the internal listener's route for that rule and target removes the
  header, observes the response the same way, and forwards to the target's
  own cluster (whose stats stay what they were). It never mirrors again.

The deciding filter may be the sampler's ext_proc, the inline Lua or the dynamic
module: each re-matches by clearing the route cache before the capture filter's
turn, so the variant's override applies alike (tests/e2e/test_compare_inline.py).
The same pieces go into a whole bootstrap (``add_capture``), into the routes file
of filesystem RDS (``add_capture_to_discovery``: `up --inline`), and into the
snippet (``add_capture_to_snippet``, in the snippet's snake_case).
"""

from __future__ import annotations

import copy
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
from .records import CAPTURE_METADATA, CaptureTag, Side

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import envoy_data_plane.envoy.config.cluster.v3 as cluster
    import envoy_data_plane.envoy.config.core.v3 as core
    import envoy_data_plane.envoy.config.endpoint.v3 as endpoint
    import envoy_data_plane.envoy.config.listener.v3 as listener
    import envoy_data_plane.envoy.config.route.v3 as route
    import envoy_data_plane.envoy.extensions.bootstrap.internal_listener.v3 as internal_listener
    import envoy_data_plane.envoy.extensions.filters.http.ext_proc.v3 as ext_proc
    import envoy_data_plane.envoy.extensions.filters.http.router.v3 as router
    import envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 as hcm
    import envoy_data_plane.envoy.extensions.upstreams.http.v3 as upstream_http
    import envoy_data_plane.envoy.type.matcher.v3 as matcher
    from envoy_data_plane.google.protobuf import Any as AnyMessage

CAPTURE_FILTER: Final = "mirror-sampler.compare-capture"
CAPTURE_SERVICE_CLUSTER: Final = "mirror-sampler-compare"
CAPTURE_SHADOW_CLUSTER: Final = "mirror-sampler-compare-shadow"
CAPTURE_LISTENER: Final = "mirror-sampler-compare-shadow"
# On the mirrored copy only, between the mirror policy and the capture listener.
TARGET_HEADER: Final = "x-mirror-sampler-compare-target"
HCM_TYPE: Final = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"

_SEND = ext_proc.ProcessingModeHeaderSendMode.SEND
_SKIP = ext_proc.ProcessingModeHeaderSendMode.SKIP
_NONE = ext_proc.ProcessingModeBodySendMode.NONE
_STREAMED = ext_proc.ProcessingModeBodySendMode.STREAMED
# Observability mode only sends STREAMED (or NONE) bodies; trailers are not compared.
OBSERVE: Final = ext_proc.ProcessingMode(
    request_header_mode=_SEND,
    response_header_mode=_SEND,
    request_body_mode=_NONE,
    response_body_mode=_STREAMED,
    request_trailer_mode=_SKIP,
    response_trailer_mode=_SKIP,
)
SEND_NOTHING: Final = ext_proc.ProcessingMode(
    request_header_mode=_SKIP,
    response_header_mode=_SKIP,
    request_body_mode=_NONE,
    response_body_mode=_NONE,
    request_trailer_mode=_SKIP,
    response_trailer_mode=_SKIP,
)


def capture_filter(mode: ext_proc.ProcessingMode, *, disabled: bool) -> hcm.HttpFilter:
    processor = ext_proc.ExternalProcessor(
        grpc_service=core.GrpcService(envoy_grpc=core.GrpcServiceEnvoyGrpc(cluster_name=CAPTURE_SERVICE_CLUSTER)),
        observability_mode=True,
        # An absent observer never touches the request.
        failure_mode_allow=True,
        processing_mode=mode,
        # The observer ends each stream itself once the response is complete;
        # this only bounds streams whose response never completes.
        deferred_close_timeout=datetime.timedelta(seconds=5),
        stat_prefix="compare",
    )
    return hcm.HttpFilter(name=CAPTURE_FILTER, typed_config=AnyMessage.pack(processor), disabled=disabled)


def _metadata(tag: CaptureTag) -> list[core.HeaderValue]:
    return [core.HeaderValue(key=CAPTURE_METADATA, value=tag.encode())]


def enable_on_plain_route() -> route.FilterConfig:
    """The filter exists for this rule's requests, and sends nothing by itself."""
    return route.FilterConfig(config=AnyMessage.pack(ext_proc.ExtProcPerRoute(overrides=ext_proc.ExtProcOverrides())))


def observe_primary(rule_id: str, targets: Sequence[str]) -> route.FilterConfig:
    overrides = ext_proc.ExtProcOverrides(
        processing_mode=OBSERVE, grpc_initial_metadata=_metadata(CaptureTag(Side.PRIMARY, rule_id, tuple(targets)))
    )
    return route.FilterConfig(config=AnyMessage.pack(ext_proc.ExtProcPerRoute(overrides=overrides)))


def observe_shadow(rule_id: str, target: str) -> ext_proc.ExtProcPerRoute:
    return ext_proc.ExtProcPerRoute(
        overrides=ext_proc.ExtProcOverrides(grpc_initial_metadata=_metadata(CaptureTag(Side.SHADOW, rule_id, (target,))))
    )


def _exact(name: str, value: str) -> route.HeaderMatcher:
    return route.HeaderMatcher(name=name, string_match=matcher.StringMatcher(exact=value))


def capture_listener(compared: Mapping[str, Sequence[str]], marker_header: str, shadow_timeout_s: float = 15.0) -> listener.Listener:
    """The internal listener mirrored copies of compared targets go through."""
    routes = [
        route.Route(
            name=f"{rule_id} compare {target}",
            match=route.RouteMatch(prefix="/", headers=[_exact(marker_header, rule_id), _exact(TARGET_HEADER, target)]),
            # A shadow that never answers: Envoy answers 504 for it after this (shadow_error).
            route=route.RouteAction(cluster=target, timeout=datetime.timedelta(seconds=shadow_timeout_s)),
            request_headers_to_remove=[TARGET_HEADER],
            typed_per_filter_config={CAPTURE_FILTER: AnyMessage.pack(observe_shadow(rule_id, target))},
        )
        for rule_id, targets in compared.items()
        for target in targets
    ]
    manager = hcm.HttpConnectionManager(
        stat_prefix="compare_shadow",
        route_config=route.RouteConfiguration(
            name=CAPTURE_LISTENER, virtual_hosts=[route.VirtualHost(name="shadows", domains=["*"], routes=routes)]
        ),
        http_filters=[
            capture_filter(OBSERVE, disabled=False),
            hcm.HttpFilter(name="envoy.filters.http.router", typed_config=AnyMessage.pack(router.Router())),
        ],
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
    http2 = upstream_http.HttpProtocolOptions(
        explicit_http_config=upstream_http.HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=core.Http2ProtocolOptions())
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


def _capture_route(entry: dict[str, Any], compared: Mapping[str, Sequence[str]], casing: Casing) -> None:
    """Plain route of a compared rule: enable; variant route: observe and send its compared
    copies through the capture listener. ``entry`` is a route as data, its field names
    spelled in ``casing``."""
    name = entry.get("name", "")
    rule_id, is_variant, _ = name.partition(" mirror ")
    if rule_id not in compared:
        return
    per_route = entry.setdefault(casing("typed_per_filter_config"), {})
    if not is_variant:
        per_route[CAPTURE_FILTER] = as_data(AnyMessage.pack(enable_on_plain_route()), casing)
        return
    observed = []
    for policy in entry.get("route", {}).get(casing("request_mirror_policies"), []):
        target = policy.get("cluster")
        if target in compared[rule_id]:
            policy["cluster"] = CAPTURE_SHADOW_CLUSTER
            policy.setdefault(casing("request_headers_mutations"), []).append(as_data(set_header_mutation(TARGET_HEADER, target), casing))
            observed.append(target)
    if observed:  # a variant mirroring only targets not compared observes nothing
        per_route[CAPTURE_FILTER] = as_data(AnyMessage.pack(observe_primary(rule_id, observed)), casing)


def _capture_virtual_hosts(hosts: Sequence[dict[str, Any]], compared: Mapping[str, Sequence[str]], casing: Casing) -> None:
    for host in hosts:
        for entry in host.get("routes", []):
            _capture_route(entry, compared, casing)


def add_capture_routes(route_configuration: Mapping[str, Any], compared: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """A copy of a RouteConfiguration (``as_data`` form) whose compared rules capture."""
    out = copy.deepcopy(dict(route_configuration))
    _capture_virtual_hosts(out.get("virtualHosts", []), compared, Casing.CAMEL)
    return out


def add_capture_to_discovery(discovery: Mapping[str, Any], compared: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """The routes file of filesystem RDS (a DiscoveryResponse, `up --inline`), each of
    its RouteConfigurations with ``add_capture_routes``."""
    return {**discovery, "resources": [add_capture_routes(r, compared) for r in discovery["resources"]]}


def _disabled_capture_filter(casing: Casing) -> dict[str, Any]:
    return as_data(capture_filter(SEND_NOTHING, disabled=True), casing)


def _internal_listener_extension(casing: Casing) -> dict[str, Any]:
    extension = AnyMessage.pack(internal_listener.InternalListener())
    return {"name": "envoy.bootstrap.internal_listener", casing("typed_config"): as_data(extension, casing)}


def add_capture(
    bootstrap: Mapping[str, Any],
    compared: Mapping[str, Sequence[str]],
    marker_header: str,
    observers: Sequence[Address],
    shadow_timeout_s: float = 15.0,
) -> dict[str, Any]:
    """A copy of a rendered bootstrap (``as_data`` form) that captures the
    responses of the ``compared`` rules' mirrored requests, for these targets
    of each rule, and streams them to ``observers``; a compared shadow that
    has not answered after ``shadow_timeout_s`` is answered 504 by Envoy.
    Routes served by RDS are not in the bootstrap: ``add_capture_to_discovery`` them."""
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
                filters.insert(len(filters) - 1, _disabled_capture_filter(Casing.CAMEL))
                if "routeConfig" in manager:
                    manager["routeConfig"] = add_capture_routes(manager["routeConfig"], compared)
    static["listeners"].append(as_data(capture_listener(compared, marker_header, shadow_timeout_s)))
    static["clusters"].extend(as_data(c) for c in capture_clusters(observers))
    out.setdefault("bootstrapExtensions", []).append(_internal_listener_extension(Casing.CAMEL))
    return out


def add_capture_to_snippet(
    snippet: Mapping[str, Any],
    compared: Mapping[str, Sequence[str]],
    marker_header: str,
    observers: Sequence[Address],
    shadow_timeout_s: float = 15.0,
) -> dict[str, Any]:
    """A copy of a snippet (snake_case data: http_filters, clusters, virtual_hosts) with
    the capture points, and the two pieces a snippet has no place for otherwise: the
    internal listener (``listeners``) and Envoy's extension that runs it
    (``bootstrap_extensions``)."""
    snake = Casing.SNAKE
    out = copy.deepcopy(dict(snippet))
    # The snippet's filters go ahead of the user's router: the capture filter is their last.
    out["http_filters"] = [*out["http_filters"], _disabled_capture_filter(snake)]
    out["clusters"] = [*out["clusters"], *(as_data(c, snake) for c in capture_clusters(observers))]
    _capture_virtual_hosts(out["virtual_hosts"], compared, snake)
    out["listeners"] = [as_data(capture_listener(compared, marker_header, shadow_timeout_s), snake)]
    out["bootstrap_extensions"] = [_internal_listener_extension(snake)]
    return out


SNIPPET_COMMENT = """\
# spec.compare (docs/compare.md): the capture points are in it too.
#  - http_filters: the last one, mirror-sampler.compare-capture, must come after
#    the deciding filter(s) above and before the router; it is disabled here and
#    enabled by the compared rules' routes (they carry its per-route config);
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
) -> str:
    """What ``envoy-config`` and ``up`` write when the configuration has spec.compare:
    the configuration of the engine (the sampler's ext_proc; inline Lua when
    ``topology.inline``; the dynamic module at ``module_path``), whole or as a
    snippet, with the capture points of the compared rules and targets."""
    compared, marker, timeout = compare.compared(), policy.slot_headers.marker, compare.shadow_timeout_s
    if snippet_only:
        if module_path:
            base, comment = module.snippet(policy, topology, module_path), module.SNIPPET_COMMENT
        else:
            base, comment = render.snippet(policy, topology), render.SNIPPET_COMMENT
        return to_yaml(add_capture_to_snippet(base, compared, marker, observers, timeout), comment + SNIPPET_COMMENT)
    config = module.bootstrap_config(policy, topology, module_path) if module_path else render.bootstrap_config(policy, topology)
    return to_yaml(add_capture(as_data(config), compared, marker, observers, timeout))
