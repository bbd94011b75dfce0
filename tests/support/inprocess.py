"""A transport serving a servicer inside the test process, on loopback.

``serving`` is for async tests; ``BackgroundServer`` runs the same in its own
thread and event loop, for synchronous tests (hypothesis, a real Envoy). Both
stop the server when the block ends, also when the test fails.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType

from extproc.core.plan import Plan
from extproc.core.policy import Policy
from extproc.server import transports
from extproc.server.health import Health
from extproc.server.metrics import Metrics
from extproc.server.servicer import Servicer


def servicer_for(policy: Policy | Callable[[], Policy], metrics: Metrics | None = None) -> Servicer:
    """The real servicer over a fixed policy, or over whatever ``policy()``
    returns now (a test that swaps policies); each policy compiled once."""
    counters = metrics or Metrics()
    plans: dict[int, Plan] = {}

    def current() -> Plan:
        p = policy if isinstance(policy, Policy) else policy()
        plan = plans.get(id(p))
        if plan is None or plan.policy is not p:
            plan = plans[id(p)] = Plan(p, counters)
        return plan

    return Servicer(current, counters)


@asynccontextmanager
async def serving(
    servicer: Servicer,
    transport: str,
    *,
    port: int = 0,
    health: Health | None = None,
    tls: transports.TlsFiles | None = None,
) -> AsyncIterator[int]:
    """Serve on 127.0.0.1 with the named transport; yields the port."""
    server = transports.create(transport, servicer, health or Health(), "127.0.0.1", port, tls=tls)
    bound = await server.start()
    try:
        yield bound
    finally:
        await server.stop(0)


class BackgroundServer:
    """``with BackgroundServer(servicer, "http2") as port:`` in a sync test."""

    def __init__(self, servicer: Servicer, transport: str, *, port: int = 0, health: Health | None = None) -> None:
        self.servicer = servicer
        self.transport = transport
        self.requested_port = port
        self.health = health or Health()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)
        self.server: transports.Transport | None = None
        self.port = 0

    def __enter__(self) -> int:
        self.thread.start()
        self.server = transports.create(self.transport, self.servicer, self.health, "127.0.0.1", self.requested_port)
        try:
            self.port = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        except BaseException:
            self._close()
            raise
        return self.port

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        assert self.server is not None
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        finally:
            self._close()

    def _close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
