"""Health state shared by the transports: the grpc.health.v1 serving status of
each known service, and subscribers that get told when it changes (Watch).

Pure state, no I/O and no asyncio: the lifecycle flips it (``set_all(False)``
before a drain) and each transport turns changes into Watch messages on its
own event loop. Statuses are grpc.health.v1 ``ServingStatus`` numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final

from extproc.wire import SERVICE_NAME

SERVING: Final = 1
NOT_SERVING: Final = 2
SERVICE_UNKNOWN: Final = 3

# "" is the server as a whole (what `grpc_health_probe` and Envoy's gRPC health
# checks ask about by default); the other is the service Envoy calls.
DEFAULT_SERVICES: Final = ("", SERVICE_NAME)


class Health:
    """Per-service ServingStatus with change notification."""

    __slots__ = ("_status", "_subscribers", "_next_token")

    def __init__(self, services: Iterable[str] = DEFAULT_SERVICES, *, serving: bool = True) -> None:
        status = SERVING if serving else NOT_SERVING
        self._status: dict[str, int] = {service: status for service in services}
        self._subscribers: dict[int, Callable[[], None]] = {}
        self._next_token = 0

    def status(self, service: str) -> int | None:
        """The service's ServingStatus, or None when the service is unknown."""
        return self._status.get(service)

    def set_all(self, serving: bool) -> None:
        """Mark every known service SERVING or NOT_SERVING; subscribers are told
        only when something actually changed (Watch sends changes, not repeats)."""
        status = SERVING if serving else NOT_SERVING
        changed = False
        for service, old in self._status.items():
            if old != status:
                self._status[service] = status
                changed = True
        if changed:
            # A copy: a subscriber may unsubscribe (or subscribe) while being told.
            for callback in list(self._subscribers.values()):
                callback()

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` (no arguments: read ``status()`` again) after each
        change; returns the function that unsubscribes (idempotent). The callback
        runs in whichever thread calls ``set_all``."""
        token = self._next_token
        self._next_token += 1
        self._subscribers[token] = callback

        def unsubscribe() -> None:
            self._subscribers.pop(token, None)

        return unsubscribe
