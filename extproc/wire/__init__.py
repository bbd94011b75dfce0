"""The ext_proc wire contract: the messages Envoy and the sampler exchange.

The classes come from protos/extproc/wire/ext_proc.proto, a minimal mirror of
``envoy.service.ext_proc.v3`` (and the ``envoy.config.core.v3`` header types)
with Envoy's exact field numbers, under the package
``mirror_sampler.ext_proc.v3``. Only field numbers travel on the wire, so the
package name is invisible to Envoy; a different one lets this module be
imported next to Envoy's own generated protos (xds-protos), which register the
``envoy.*`` full names in protobuf's default descriptor pool, without a
duplicate-symbol error.

For the same reason the proto has no ``service``: the handler is registered by
hand (``grpc.method_handlers_generic_handler(SERVICE_NAME, ...)``) and Envoy
reaches it at ``PROCESS_METHOD``.

The comparison's observer reads Envoy's gRPC access log through
``extproc.wire.accesslog_pb2`` (protos/extproc/wire/accesslog.proto: a subset
of ``envoy.service.accesslog.v3`` and ``envoy.data.accesslog.v3`` under
``mirror_sampler.accesslog.v3``, the same way); it is not imported here, so
the sampler never loads it.

Regenerate the *_pb2.py(i) with ``make protos``; edit the .proto, not them.
"""

from typing import Final

from extproc.wire.ext_proc_pb2 import (
    BodyResponse,
    CommonResponse,
    HeaderMap,
    HeaderMutation,
    HeadersResponse,
    HeaderValue,
    HeaderValueOption,
    HttpBody,
    HttpHeaders,
    HttpTrailers,
    ProcessingRequest,
    ProcessingResponse,
    TrailersResponse,
)

# Envoy's service and method names, not ours: the HTTP/2 path Envoy calls.
SERVICE_NAME: Final = "envoy.service.ext_proc.v3.ExternalProcessor"
PROCESS_METHOD: Final = f"/{SERVICE_NAME}/Process"
# gRPC metadata the generated Envoy routes put on each ext_proc stream: the id
# of the rule Envoy matched, so the sampler decides for that very rule.
RULE_METADATA: Final = "x-mirror-rule-id"
# Envoy's gRPC access log method, which the comparison's observer serves (its
# messages: accesslog_pb2).
ACCESS_LOG_METHOD: Final = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"

__all__ = [
    "ACCESS_LOG_METHOD",
    "PROCESS_METHOD",
    "RULE_METADATA",
    "SERVICE_NAME",
    "BodyResponse",
    "CommonResponse",
    "HeaderMap",
    "HeaderMutation",
    "HeaderValue",
    "HeaderValueOption",
    "HeadersResponse",
    "HttpBody",
    "HttpHeaders",
    "HttpTrailers",
    "ProcessingRequest",
    "ProcessingResponse",
    "TrailersResponse",
]
