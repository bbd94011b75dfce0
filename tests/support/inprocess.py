"""A transport serving a servicer inside the test process, on loopback.

``serving`` is for async tests; ``BackgroundServer`` runs the same on a
``LoopThread`` (an event loop on its own thread, the one way a synchronous
test runs a transport: hypothesis, a real Envoy, a raw-socket peer). Both
stop the server when the block ends, also when the test fails.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, TypeVar

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


T = TypeVar("T")


class LoopThread:
    """An asyncio event loop running on its own daemon thread until ``close``."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        """Run ``coro`` on the loop; its result, or its exception, here."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the loop (where a transport's state lives)."""

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class BackgroundServer:
    """``with BackgroundServer(servicer, "http2") as port:`` in a sync test."""

    def __init__(self, servicer: Servicer, transport: str, *, port: int = 0, health: Health | None = None) -> None:
        self.servicer = servicer
        self.transport = transport
        self.requested_port = port
        self.health = health or Health()
        self.loop_thread: LoopThread | None = None
        self.server: transports.Transport | None = None
        self.port = 0

    def __enter__(self) -> int:
        self.loop_thread = LoopThread("test-server")
        self.server = transports.create(self.transport, self.servicer, self.health, "127.0.0.1", self.requested_port)
        try:
            self.port = self.loop_thread.run(self.server.start())
        except BaseException:
            self.loop_thread.close()
            raise
        return self.port

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        assert self.server is not None and self.loop_thread is not None
        try:
            self.loop_thread.run(self.server.stop(0))
        finally:
            self.loop_thread.close()
