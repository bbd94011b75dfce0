"""A lower bound for capturing by Envoy's gRPC access log (docs/compare.md, "Not done
yet"): the configuration change and a sink that accepts the stream and counts bytes.
Used by bench/compare_instructions.py and bench/compare_cost.py (``access-log``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.testbed import LOOPBACK
from bench.variants import listener_manager

Config = dict[str, Any]

SINK = """
import asyncio, sys
import grpc

async def main(port, out, raw):
    received = [0]

    async def drain(messages, context):
        async for message in messages:
            received[0] += len(message)
            with open(out, "w") as f:
                f.write(str(received[0]))
            if raw:
                with open(raw, "ab") as f:
                    f.write(len(message).to_bytes(4, "big") + message)
        return b""

    handler = grpc.method_handlers_generic_handler(
        "envoy.service.accesslog.v3.AccessLogService", {"StreamAccessLogs": grpc.stream_unary_rpc_method_handler(drain)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()

asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
"""
ALS_CLUSTER = "access-log-sink"


def access_log(config: Config, sink_port: int) -> Config:
    """``off`` with both sides reported by Envoy's gRPC access log (see the docstring)."""

    def logger(name: str) -> Config:
        common = {"logName": name, "grpcService": {"envoyGrpc": {"clusterName": ALS_CLUSTER}}, "transportApiVersion": "V3"}
        return {
            "name": "envoy.access_loggers.http_grpc",
            "typedConfig": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
                "commonConfig": common,
                "additionalRequestHeadersToLog": ["x-request-id", "x-mirror-rule"],
                "additionalResponseHeadersToLog": ["content-type", "content-length", "x-envoy-upstream-service-time"],
            },
        }

    address = {"socketAddress": {"address": LOOPBACK, "portValue": sink_port}}
    manager = listener_manager(config, "ingress")
    manager["accessLog"] = [logger("primary")]
    router = next(f for f in manager["httpFilters"] if f["name"] == "envoy.filters.http.router")
    router["typedConfig"]["upstreamLog"] = [logger("upstream")]
    config["staticResources"]["clusters"].append(
        {
            "name": ALS_CLUSTER,
            "type": "STATIC",
            "loadAssignment": {
                "clusterName": ALS_CLUSTER,
                "endpoints": [{"lbEndpoints": [{"endpoint": {"address": address}}]}],
            },
            "typedExtensionProtocolOptions": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicitHttpConfig": {"http2ProtocolOptions": {}},
                }
            },
        }
    )
    return config


PRIMARY_CAPTURE_LUA = """
function envoy_on_response(handle)
  local parts = {}
  local n = 0
  for chunk in handle:bodyChunks() do
    if n < 65536 then
      local s = chunk:getBytes(0, math.min(chunk:length(), 65536 - n))
      parts[#parts + 1] = s
      n = n + #s
    end
  end
  handle:streamInfo():dynamicMetadata():set("mirror-sampler", "body", table.concat(parts))
end
"""
SHADOW_CAPTURE_LUA = """
function envoy_on_response(handle)
  local body = handle:body()
  local s = ""
  if body ~= nil then s = body:getBytes(0, math.min(body:length(), 65536)) end
  handle:headers():add("x-mirror-sampler-body", handle:base64Escape(s))
end
"""


def lua_filter(name: str, script: str) -> Config:
    """An HTTP filter ``name`` running ``script`` for every request."""
    lua = {"@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua", "defaultSourceCode": {"inlineString": script}}
    return {"name": name, "typedConfig": lua}


def upstream_lua_filters(script: str) -> list[Config]:
    """A cluster's upstream HTTP filters (``HttpProtocolOptions.http_filters``):
    ``script`` in Lua, then the codec every such chain ends with."""
    codec = {"@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}
    return [lua_filter("envoy.filters.http.lua", script), {"name": "envoy.filters.http.upstream_codec", "typedConfig": codec}]


def access_log_bodies(config: Config, sink_port: int, mirror_cluster: str) -> Config:
    """``access_log`` plus the bodies: a Lua filter before the router copies the primary's
    body into dynamic metadata (logged with the entry), and a Lua upstream filter of the
    target's cluster puts the shadow's buffered body, base64, into a response header the
    router's ``upstream_log`` logs. Scratch measurement of docs/compare.md's way forward."""
    access_log(config, sink_port)
    manager = listener_manager(config, "ingress")
    capture = lua_filter("mirror-sampler-capture-lua", PRIMARY_CAPTURE_LUA)
    manager["httpFilters"].insert(len(manager["httpFilters"]) - 1, capture)
    router = next(f for f in manager["httpFilters"] if f["name"] == "envoy.filters.http.router")
    router["typedConfig"]["upstreamLog"][0]["typedConfig"]["additionalResponseHeadersToLog"].append("x-mirror-sampler-body")
    options = {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicitHttpConfig": {"httpProtocolOptions": {}},
        "httpFilters": upstream_lua_filters(SHADOW_CAPTURE_LUA),
    }
    (target,) = (c for c in config["staticResources"]["clusters"] if c["name"] == mirror_cluster)
    target["typedExtensionProtocolOptions"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options}
    return config


def start_sink(port: int, out: Path, raw: Path | None = None) -> subprocess.Popen[bytes]:
    """The sink on 127.0.0.1:``port``, writing the bytes it received so far to ``out``
    and, with ``raw``, appending every message it received there (``messages``)."""
    return subprocess.Popen([sys.executable, "-c", SINK, str(port), str(out), *([str(raw)] if raw else [])])


def messages(raw: Path) -> list[bytes]:
    """The messages ``start_sink`` appended to ``raw`` (each a serialised
    StreamAccessLogsMessage), in order; one the sink is still writing is left out."""
    data = raw.read_bytes() if raw.exists() else b""
    out, at = [], 0
    while at + 4 <= len(data):
        size = int.from_bytes(data[at : at + 4], "big")
        if at + 4 + size > len(data):
            break
        out.append(data[at + 4 : at + 4 + size])
        at += 4 + size
    return out


def received(out: Path) -> int:
    return int(out.read_text()) if out.exists() else 0
