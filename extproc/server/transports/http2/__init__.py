"""A minimal HTTP/2 gRPC server for exactly the sampler's methods: ext_proc
``Process`` (bidirectional streaming) and grpc.health.v1 ``Check``/``Watch``;
the comparison observer serves Envoy's access log ``StreamAccessLogs`` (client
streaming) in Process's place (``Http2Transport(method=...)``).

Split the way h11, h2 and hypercorn are:

- ``protocol`` (with ``output``, ``streams``, ``events``): one connection's
  HTTP/2 state machine, fed bytes and the clock, giving bytes and events;
  no sockets, no asyncio, no servicer;
- ``frames`` (the frame codec), ``hpack_replay`` (request header decoding),
  ``grpc`` (gRPC over HTTP/2: request checks, status frames, health messages);
- ``limits``: every bound against a hostile peer, with the attack it answers;
- ``service``: the protocol's events as servicer and health calls;
- ``adapter``: asyncio (sockets, back-pressure, timers).

docs/http2.md tells the whole story.
"""

from .adapter import Http2Transport
from .limits import Limits
from .service import FINISHED, ProcessStreamLike, ServicerLike

__all__ = ["FINISHED", "Http2Transport", "Limits", "ProcessStreamLike", "ServicerLike"]
