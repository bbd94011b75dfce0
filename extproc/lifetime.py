"""Child processes that cannot outlive their parent (Linux ``prctl``).

Used by the worker supervisor (``server.workers``) and by the local stack's
children (``stack.children``).
"""

from __future__ import annotations

import contextlib
import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies.
    Best effort off Linux, where there is no such call."""
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
