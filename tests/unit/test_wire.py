"""The wire contracts: ext_proc (protos/extproc/wire/ext_proc.proto) and the
gRPC access log the comparison's observer reads (accesslog.proto).

Our protos copy a subset of Envoy's by hand under another package name, so
nothing but these tests ties it to Envoy. They check it three independent ways:
against envoy-data-plane (a separate protobuf implementation, betterproto2)
by serialising in both directions, and against xds-protos' descriptors
(Envoy's own protoc output) field by field. The checks that run protoc or a
fresh interpreter are in tests/service/test_wire_build.py.
"""

from __future__ import annotations

import datetime
import re
import warnings
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import betterproto2
import pytest
from google.protobuf import descriptor_pool, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from extproc import wire
from extproc.wire import accesslog_pb2, ext_proc_pb2

with warnings.catch_warnings():
    # envoy-data-plane trips pydantic deprecation warnings at import; not ours.
    warnings.simplefilter("ignore")
    import envoy_data_plane.google.protobuf as edp_protobuf
    from envoy_data_plane.envoy.config.core import v3 as edp_core
    from envoy_data_plane.envoy.data.accesslog import v3 as edp_accesslog
    from envoy_data_plane.envoy.service.accesslog import v3 as edp_als
    from envoy_data_plane.envoy.service.ext_proc import v3 as edp_ext_proc

from envoy.service.accesslog.v3 import als_pb2 as xds_als
from envoy.service.ext_proc.v3 import external_processor_pb2 as xds_ext_proc

from tests.support.paths import REPO as ROOT

PROTO = ROOT / "protos" / "extproc" / "wire" / "ext_proc.proto"
ACCESS_LOG_PROTO = ROOT / "protos" / "extproc" / "wire" / "accesslog.proto"
# Each generated module with the .proto it came from.
PROTOS = ((ext_proc_pb2, PROTO), (accesslog_pb2, ACCESS_LOG_PROTO))

# Setting HeaderValueOption.append warns in envoy-data-plane (it is deprecated
# in Envoy), but ext_proc still honours it, so the tests must set it.
pytestmark = pytest.mark.filterwarnings("ignore:HeaderValueOption.append is deprecated:DeprecationWarning")


# ---------------------------------------------------------------------------
# Wire compatibility with envoy-data-plane, both directions.
#
# One builder per case takes an "api" (our classes or envoy-data-plane's) and
# sets every field it touches to a non-default value; the two libraries
# differ only in how enums and the BoolValue wrapper are spelled.
# ---------------------------------------------------------------------------

_MESSAGES = [
    "ProcessingRequest",
    "HttpHeaders",
    "HttpBody",
    "HttpTrailers",
    "ProcessingResponse",
    "HeadersResponse",
    "BodyResponse",
    "TrailersResponse",
    "CommonResponse",
    "HeaderMutation",
]
_CORE_MESSAGES = ("HeaderValue", "HeaderValueOption", "HeaderMap")

# The access log's messages: our name -> envoy-data-plane's (betterproto2 spells acronyms its own way).
_ACCESS_LOG_MESSAGES = {
    "StreamAccessLogsMessage": edp_als.StreamAccessLogsMessage,
    "HTTPAccessLogEntries": edp_als.StreamAccessLogsMessageHttpAccessLogEntries,
    "StreamAccessLogsResponse": edp_als.StreamAccessLogsResponse,
    "HTTPAccessLogEntry": edp_accesslog.HttpAccessLogEntry,
    "AccessLogCommon": edp_accesslog.AccessLogCommon,
    "HTTPRequestProperties": edp_accesslog.HttpRequestProperties,
    "HTTPResponseProperties": edp_accesslog.HttpResponseProperties,
    "Metadata": edp_core.Metadata,
}


def _our_access_log(name: str) -> Any:
    if name == "HTTPAccessLogEntries":
        return accesslog_pb2.StreamAccessLogsMessage.HTTPAccessLogEntries
    return getattr(accesslog_pb2, name)


def _our_struct(fields: dict[str, str | bool]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(fields)
    return out


def _their_struct(fields: dict[str, str | bool]) -> Any:
    values = {k: edp_protobuf.Value(bool_value=v) if isinstance(v, bool) else edp_protobuf.Value(string_value=v) for k, v in fields.items()}
    return edp_protobuf.Struct(fields=values)


OURS = SimpleNamespace(
    **{name: getattr(wire, name) for name in (*_MESSAGES, *_CORE_MESSAGES)},
    **{name: _our_access_log(name) for name in _ACCESS_LOG_MESSAGES},
    status=lambda name: wire.CommonResponse.ResponseStatus.Value(name),
    action=lambda name: wire.HeaderValueOption.HeaderAppendAction.Value(name),
    append=lambda value: wrappers_pb2.BoolValue(value=value),
    method=lambda name: accesslog_pb2.RequestMethod.Value(name),
    duration=lambda seconds, nanos: duration_pb2.Duration(seconds=seconds, nanos=nanos),
    uint32=lambda value: wrappers_pb2.UInt32Value(value=value),
    struct=_our_struct,
)
ENVOY = SimpleNamespace(
    **{name: getattr(edp_ext_proc, name) for name in _MESSAGES},
    **{name: getattr(edp_core, name) for name in _CORE_MESSAGES},
    **_ACCESS_LOG_MESSAGES,
    status=lambda name: edp_ext_proc.CommonResponseResponseStatus[name],
    action=lambda name: edp_core.HeaderValueOptionHeaderAppendAction[name],
    append=lambda value: value,  # betterproto2 unwraps BoolValue to bool | None
    method=lambda name: edp_core.RequestMethod[name],
    duration=lambda seconds, nanos: datetime.timedelta(seconds=seconds, microseconds=nanos // 1000),  # whole microseconds only
    uint32=lambda value: value,  # unwrapped too
    struct=_their_struct,
)

# Not valid UTF-8: raw_value must carry arbitrary bytes untouched.
RAW = b"\xff\xfe\x00mirror\x80"


def header_map(api: Any) -> Any:
    return api.HeaderMap(
        headers=[
            api.HeaderValue(key=":path", value="/percent-mirror", raw_value=RAW),
            api.HeaderValue(key="x-request-id", value="abc", raw_value=b"abc"),
        ]
    )


def header_mutation(api: Any, append: bool = False, action: str = "OVERWRITE_IF_EXISTS_OR_ADD") -> Any:
    return api.HeaderMutation(
        set_headers=[
            api.HeaderValueOption(
                header=api.HeaderValue(key="x-mirror-cluster-0", value="v", raw_value=RAW),
                append=api.append(append),
                append_action=api.action(action),
                keep_empty_value=True,
            )
        ],
        remove_headers=["x-mirror-cluster-1", "x-mirror-cluster-2"],
    )


def common_response(api: Any) -> Any:
    return api.CommonResponse(
        status=api.status("CONTINUE_AND_REPLACE"),
        header_mutation=header_mutation(api),
        clear_route_cache=True,
    )


_REQUEST_BRANCHES: dict[str, Callable[[Any], Any]] = {
    "request_headers": lambda api: api.HttpHeaders(headers=header_map(api), end_of_stream=True),
    "response_headers": lambda api: api.HttpHeaders(headers=header_map(api), end_of_stream=True),
    "request_body": lambda api: api.HttpBody(body=RAW, end_of_stream=True),
    "response_body": lambda api: api.HttpBody(body=RAW, end_of_stream=True),
    "request_trailers": lambda api: api.HttpTrailers(trailers=header_map(api)),
    "response_trailers": lambda api: api.HttpTrailers(trailers=header_map(api)),
}
_RESPONSE_BRANCHES: dict[str, Callable[[Any], Any]] = {
    "request_headers": lambda api: api.HeadersResponse(response=common_response(api)),
    "response_headers": lambda api: api.HeadersResponse(response=common_response(api)),
    "request_body": lambda api: api.BodyResponse(response=common_response(api)),
    "response_body": lambda api: api.BodyResponse(response=common_response(api)),
    "request_trailers": lambda api: api.TrailersResponse(header_mutation=header_mutation(api)),
    "response_trailers": lambda api: api.TrailersResponse(header_mutation=header_mutation(api)),
}


def _request(branch: str) -> Callable[[Any], Any]:
    return lambda api: api.ProcessingRequest(**{branch: _REQUEST_BRANCHES[branch](api)}, observability_mode=True)


def _response(branch: str) -> Callable[[Any], Any]:
    return lambda api: api.ProcessingResponse(**{branch: _RESPONSE_BRANCHES[branch](api)})


def _mutation(append: bool, action: str) -> Callable[[Any], Any]:
    return lambda api: header_mutation(api, append, action)


def access_log_entry(api: Any, rid: str, method: str = "POST") -> Any:
    fields: dict[str, str | bool] = {"tag": '{"side":"primary"}', "headers": "OjIwMA==", "body": "", "truncated": True}
    return api.HTTPAccessLogEntry(
        common_properties=api.AccessLogCommon(
            time_to_last_downstream_tx_byte=api.duration(0, 3_351_000),
            metadata=api.Metadata(filter_metadata={"mirror-sampler.compare": api.struct(fields), "other": api.struct({})}),
            duration=api.duration(1, 5_000),
        ),
        request=api.HTTPRequestProperties(
            request_method=api.method(method),
            path="/percent-mirror?q=1",
            request_id=rid,
            request_headers={"authorization": "Bearer xyz", "cookie": "a=b"},
        ),
        response=api.HTTPResponseProperties(response_code=api.uint32(503)),
    )


def _access_logs(methods: tuple[str, ...]) -> Callable[[Any], Any]:
    return lambda api: api.StreamAccessLogsMessage(
        http_logs=api.HTTPAccessLogEntries(log_entry=[access_log_entry(api, f"r{i}", m) for i, m in enumerate(methods)])
    )


_METHODS = tuple(accesslog_pb2.RequestMethod.keys())


# (id, builder, oneof group to check or None)
CASES: list[tuple[str, Callable[[Any], Any], str | None]] = [
    *((f"ProcessingRequest.{b}", _request(b), "request") for b in _REQUEST_BRANCHES),
    *((f"ProcessingResponse.{b}", _response(b), "response") for b in _RESPONSE_BRANCHES),
    *(
        (f"HeaderMutation.append={append}.{action}", _mutation(append, action), None)
        for append in (True, False)
        for action in wire.HeaderValueOption.HeaderAppendAction.keys()  # noqa: SIM118 - an enum wrapper, not a dict
    ),
    # One entry per request method, the unspecified one among them (it is not set on the wire).
    ("StreamAccessLogsMessage.http_logs", _access_logs(_METHODS), "log_entries"),
    ("StreamAccessLogsMessage.http_logs.one", _access_logs(("GET",)), "log_entries"),
    ("StreamAccessLogsResponse", lambda api: api.StreamAccessLogsResponse(), None),
]
_case_params = pytest.mark.parametrize(("build", "oneof"), [pytest.param(b, o, id=i) for i, b, o in CASES])


@_case_params
def test_envoy_to_ours(build: Callable[[Any], Any], oneof: str | None) -> None:
    theirs = build(ENVOY)
    expected = build(OURS)
    got = type(expected).FromString(bytes(theirs))
    # A field number that disagrees lands in unknown fields and breaks equality.
    assert got == expected
    if oneof:
        assert got.WhichOneof(oneof) == expected.WhichOneof(oneof)


@_case_params
def test_ours_to_envoy(build: Callable[[Any], Any], oneof: str | None) -> None:
    ours = build(OURS)
    expected = build(ENVOY)
    got = type(expected).parse(ours.SerializeToString())
    assert got == expected
    if oneof:
        assert betterproto2.which_one_of(got, oneof)[0] == ours.WhichOneof(oneof)


def _set_fields(msg: Message) -> Iterator[str]:
    for field, value in msg.ListFields():
        yield field.full_name
        values = value if field.is_repeated else [value]
        for item in values:
            if isinstance(item, Message):
                yield from _set_fields(item)


def test_cases_set_every_field_we_define() -> None:
    # Without this a field added to the proto could go untested on the wire.
    covered = {name for _, build, _ in CASES for name in _set_fields(build(OURS))}
    defined = {f.full_name for m in _our_messages() for f in m.fields}
    assert defined - covered == set()
    covered_values = {(_enum_of(f).full_name, v) for _, build, _ in CASES for f, v in _set_enum_values(build(OURS))}
    defined_values = {(e.full_name, v.number) for e in _our_enums() for v in e.values if v.number != 0}
    assert defined_values - covered_values == set()


def _enum_of(field: FieldDescriptor) -> EnumDescriptor:
    assert field.enum_type is not None, field.full_name
    return field.enum_type


def _set_enum_values(msg: Message) -> Iterator[tuple[FieldDescriptor, int]]:
    for field, value in msg.ListFields():
        if field.enum_type is not None:
            yield field, value
        values = value if field.is_repeated else [value]
        for item in values:
            if isinstance(item, Message):
                yield from _set_enum_values(item)


# ---------------------------------------------------------------------------
# Field by field against xds-protos' descriptors (Envoy's protoc output).
# ---------------------------------------------------------------------------


def _our_messages(module: Any = None) -> list[Descriptor]:
    """Every message we define (of one generated module, or of all), map entries
    aside: protoc makes those (they are checked with their map field)."""
    out: list[Descriptor] = []
    modules = [module] if module is not None else [m for m, _ in PROTOS]
    stack = [d for m in modules for d in m.DESCRIPTOR.message_types_by_name.values()]
    while stack:
        m = stack.pop()
        if m.GetOptions().map_entry:
            continue
        out.append(m)
        stack.extend(m.nested_types)
    return out


def _our_enums(module: Any = None) -> list[EnumDescriptor]:
    modules = [module] if module is not None else [m for m, _ in PROTOS]
    top = [e for m in modules for e in m.DESCRIPTOR.enum_types_by_name.values()]
    return top + [e for m in _our_messages(module) for e in m.enum_types]


def _mirrors() -> dict[str, str]:
    """Our full name -> the Envoy full name its `// Mirrors X.` comment names.

    Reading the comments makes them load-bearing: a wrong one fails here.
    """
    out = {}
    for module, proto in PROTOS:
        package = module.DESCRIPTOR.package
        found = re.findall(r"// Mirrors ([\w.]+)\.\n\s*(?:message|enum) (\w+)", proto.read_text())
        by_short = {short: envoy for envoy, short in found}
        for d in [*_our_messages(module), *_our_enums(module)]:
            assert d.name in by_short, f"{d.full_name} lacks a '// Mirrors envoy.X.' comment"
            envoy_name = by_short[d.name]
            relative = d.full_name.removeprefix(package + ".")
            assert envoy_name.endswith("." + relative), (d.full_name, envoy_name)
            out[d.full_name] = envoy_name
    return out


def _check_field(f: FieldDescriptor, t: FieldDescriptor, mirrors: dict[str, str], where: str) -> None:
    assert (f.number, f.type, f.is_repeated) == (t.number, t.type, t.is_repeated), where
    our_oneof = f.containing_oneof.name if f.containing_oneof else None
    their_oneof = t.containing_oneof.name if t.containing_oneof else None
    assert our_oneof == their_oneof, where
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        # A map: Envoy's is a map too, with the same key and value types.
        entry = t.message_type
        assert entry is not None and entry.GetOptions().map_entry, f"{where}: not a map in Envoy"
        for name in ("key", "value"):
            _check_field(f.message_type.fields_by_name[name], entry.fields_by_name[name], mirrors, f"{where}.{name}")
        return
    pairs: list[tuple[Descriptor | EnumDescriptor | None, Descriptor | EnumDescriptor | None]] = [
        (f.message_type, t.message_type),
        (f.enum_type, t.enum_type),
    ]
    for our_type, their_type in pairs:
        if our_type is not None:
            # Well-known types (BoolValue, Struct, Duration) are shared, not mirrored.
            expected = mirrors.get(our_type.full_name, our_type.full_name)
            assert their_type is not None and their_type.full_name == expected, where


def test_fields_match_envoy_descriptors() -> None:
    pool = descriptor_pool.Default()  # xds-protos registered Envoy's types here
    mirrors = _mirrors()
    for ours in _our_messages():
        theirs = pool.FindMessageTypeByName(mirrors[ours.full_name])
        for f in ours.fields:
            where = f"{ours.full_name}.{f.name}"
            assert f.name in theirs.fields_by_name, f"{where}: no such field in Envoy"
            _check_field(f, theirs.fields_by_name[f.name], mirrors, where)
    for our_enum in _our_enums():
        their_enum = pool.FindEnumTypeByName(mirrors[our_enum.full_name])
        for v in our_enum.values:
            assert v.name in their_enum.values_by_name, f"{our_enum.full_name}.{v.name}: not in Envoy"
            assert their_enum.values_by_name[v.name].number == v.number, f"{our_enum.full_name}.{v.name}"


def test_process_method_is_envoys() -> None:
    service = xds_ext_proc.DESCRIPTOR.services_by_name["ExternalProcessor"]
    method = service.methods_by_name["Process"]
    assert service.full_name == wire.SERVICE_NAME
    assert f"/{service.full_name}/{method.name}" == wire.PROCESS_METHOD
    # The hand-registered handler must be a bidi stream of our two messages.
    assert method.client_streaming and method.server_streaming
    mirrors = _mirrors()
    assert method.input_type.full_name == mirrors[wire.ProcessingRequest.DESCRIPTOR.full_name]
    assert method.output_type.full_name == mirrors[wire.ProcessingResponse.DESCRIPTOR.full_name]


def test_access_log_method_is_envoys() -> None:
    service = xds_als.DESCRIPTOR.services_by_name["AccessLogService"]
    method = service.methods_by_name["StreamAccessLogs"]
    assert f"/{service.full_name}/{method.name}" == wire.ACCESS_LOG_METHOD
    # Client streaming: Envoy sends batches, the one response comes at the end (the transport's closing answer).
    assert method.client_streaming and not method.server_streaming
    mirrors = _mirrors()
    assert method.input_type.full_name == mirrors[accesslog_pb2.StreamAccessLogsMessage.DESCRIPTOR.full_name]
    assert method.output_type.full_name == mirrors[accesslog_pb2.StreamAccessLogsResponse.DESCRIPTOR.full_name]
    assert accesslog_pb2.StreamAccessLogsResponse().SerializeToString() == b"", "the closing answer the observer sends"


def test_a_real_envoy_access_log_message_reads_as_ours() -> None:
    """Built with xds-protos (Envoy's protoc output) rather than envoy-data-plane:
    every field the observer reads comes through, and what we do not declare is
    kept as unknown fields."""
    from envoy.config.core.v3 import base_pb2
    from envoy.data.accesslog.v3 import accesslog_pb2 as xds_accesslog

    common = xds_accesslog.AccessLogCommon(upstream_cluster="primary", route_name="r")
    common.time_to_last_downstream_tx_byte.FromMilliseconds(3)
    common.duration.FromMilliseconds(4)
    common.metadata.filter_metadata["mirror-sampler.compare"].update({"tag": "t", "truncated": False})
    common.response_flags.no_healthy_upstream = True
    entry = xds_accesslog.HTTPAccessLogEntry(
        common_properties=common,
        protocol_version=xds_accesslog.HTTPAccessLogEntry.HTTP11,
        request=xds_accesslog.HTTPRequestProperties(
            request_method=base_pb2.DELETE, path="/a", request_id="rid", authority="shop", request_headers={"cookie": "s=1"}
        ),
        response=xds_accesslog.HTTPResponseProperties(response_headers_bytes=12),
    )
    entry.response.response_code.value = 204
    message = xds_als.StreamAccessLogsMessage(http_logs=xds_als.StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=[entry]))
    message.identifier.log_name = "compare"
    ours = accesslog_pb2.StreamAccessLogsMessage.FromString(message.SerializeToString())
    [got] = ours.http_logs.log_entry
    assert (got.request.request_method, got.request.path, got.request.request_id) == (accesslog_pb2.DELETE, "/a", "rid")
    assert dict(got.request.request_headers) == {"cookie": "s=1"}
    assert got.response.response_code.value == 204
    assert got.common_properties.time_to_last_downstream_tx_byte.ToMilliseconds() == 3
    assert got.common_properties.duration.ToMilliseconds() == 4
    assert dict(got.common_properties.metadata.filter_metadata["mirror-sampler.compare"]) == {"tag": "t", "truncated": False}
    # (Unknown fields are written after the known ones: compared as messages, not bytes.)
    assert xds_als.StreamAccessLogsMessage.FromString(ours.SerializeToString()) == message, "unknown fields kept"
