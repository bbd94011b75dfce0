"""The ext_proc wire contract (protos/extproc/wire/ext_proc.proto).

Our proto copies a subset of Envoy's by hand under another package name, so
nothing but these tests ties it to Envoy. They check it three independent ways:
against envoy-data-plane (a separate protobuf implementation, betterproto2)
by serialising in both directions, and against xds-protos' descriptors
(Envoy's own protoc output) field by field. The checks that run protoc or a
fresh interpreter are in tests/service/test_wire_build.py.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import betterproto2
import pytest
from google.protobuf import descriptor_pool, wrappers_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from extproc import wire
from extproc.wire import ext_proc_pb2

with warnings.catch_warnings():
    # envoy-data-plane trips pydantic deprecation warnings at import; not ours.
    warnings.simplefilter("ignore")
    from envoy_data_plane.envoy.config.core import v3 as edp_core
    from envoy_data_plane.envoy.service.ext_proc import v3 as edp_ext_proc

from envoy.service.ext_proc.v3 import external_processor_pb2 as xds_ext_proc

from tests.support.paths import REPO as ROOT

PROTO = ROOT / "protos" / "extproc" / "wire" / "ext_proc.proto"

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

OURS = SimpleNamespace(
    **{name: getattr(wire, name) for name in (*_MESSAGES, *_CORE_MESSAGES)},
    status=lambda name: wire.CommonResponse.ResponseStatus.Value(name),
    action=lambda name: wire.HeaderValueOption.HeaderAppendAction.Value(name),
    append=lambda value: wrappers_pb2.BoolValue(value=value),
)
ENVOY = SimpleNamespace(
    **{name: getattr(edp_ext_proc, name) for name in _MESSAGES},
    **{name: getattr(edp_core, name) for name in _CORE_MESSAGES},
    status=lambda name: edp_ext_proc.CommonResponseResponseStatus[name],
    action=lambda name: edp_core.HeaderValueOptionHeaderAppendAction[name],
    append=lambda value: value,  # betterproto2 unwraps BoolValue to bool | None
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


# (id, builder, oneof group to check or None)
CASES: list[tuple[str, Callable[[Any], Any], str | None]] = [
    *((f"ProcessingRequest.{b}", _request(b), "request") for b in _REQUEST_BRANCHES),
    *((f"ProcessingResponse.{b}", _response(b), "response") for b in _RESPONSE_BRANCHES),
    *(
        (f"HeaderMutation.append={append}.{action}", _mutation(append, action), None)
        for append in (True, False)
        for action in wire.HeaderValueOption.HeaderAppendAction.keys()  # noqa: SIM118 - an enum wrapper, not a dict
    ),
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


def _our_messages() -> list[Descriptor]:
    out: list[Descriptor] = []
    stack = list(ext_proc_pb2.DESCRIPTOR.message_types_by_name.values())
    while stack:
        m = stack.pop()
        out.append(m)
        stack.extend(m.nested_types)
    return out


def _our_enums() -> list[EnumDescriptor]:
    top = list(ext_proc_pb2.DESCRIPTOR.enum_types_by_name.values())
    return top + [e for m in _our_messages() for e in m.enum_types]


def _mirrors() -> dict[str, str]:
    """Our full name -> the Envoy full name its `// Mirrors X.` comment names.

    Reading the comments makes them load-bearing: a wrong one fails here.
    """
    package = ext_proc_pb2.DESCRIPTOR.package
    found = re.findall(r"// Mirrors ([\w.]+)\.\n\s*(?:message|enum) (\w+)", PROTO.read_text())
    by_short = {short: envoy for envoy, short in found}
    out = {}
    for d in [*_our_messages(), *_our_enums()]:
        assert d.name in by_short, f"{d.full_name} lacks a '// Mirrors envoy.X.' comment"
        envoy_name = by_short[d.name]
        relative = d.full_name.removeprefix(package + ".")
        assert envoy_name.endswith("." + relative), (d.full_name, envoy_name)
        out[d.full_name] = envoy_name
    return out


def test_fields_match_envoy_descriptors() -> None:
    pool = descriptor_pool.Default()  # xds-protos registered Envoy's types here
    mirrors = _mirrors()
    for ours in _our_messages():
        theirs = pool.FindMessageTypeByName(mirrors[ours.full_name])
        for f in ours.fields:
            where = f"{ours.full_name}.{f.name}"
            assert f.name in theirs.fields_by_name, f"{where}: no such field in Envoy"
            t = theirs.fields_by_name[f.name]
            assert (f.number, f.type, f.is_repeated) == (t.number, t.type, t.is_repeated), where
            our_oneof = f.containing_oneof.name if f.containing_oneof else None
            their_oneof = t.containing_oneof.name if t.containing_oneof else None
            assert our_oneof == their_oneof, where
            pairs: list[tuple[Descriptor | EnumDescriptor | None, Descriptor | EnumDescriptor | None]] = [
                (f.message_type, t.message_type),
                (f.enum_type, t.enum_type),
            ]
            for our_type, their_type in pairs:
                if our_type is not None:
                    # Well-known types (BoolValue) are shared, not mirrored.
                    expected = mirrors.get(our_type.full_name, our_type.full_name)
                    assert their_type is not None and their_type.full_name == expected, where
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
