"""One way to run an echo backend (``python -m extproc.stack.echo``) as a
child: used by `up` and by the tests that bring their own Envoy."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from .children import Child

_READY = re.compile(r"listening on port (\d+)")


class EchoProcess(Child):
    """An echo backend on a port of its own choosing, logging every request
    it echoes (``Echoed: {...}``); ready when constructed."""

    def __init__(self, service: str, *, host: str = "127.0.0.1", log_path: Path | None = None, timeout: float = 20.0) -> None:
        argv = [sys.executable, "-m", "extproc.stack.echo", "--host", host, "--port", "0", "--service", service, "--log-requests"]
        super().__init__(f"echo backend {service}", argv, log_path=log_path)
        try:
            line = self.wait_line(lambda s: _READY.search(s) is not None, timeout=timeout)
        except BaseException:
            self.stop()
            raise
        found = _READY.search(line)
        assert found is not None
        self.port = int(found.group(1))

    def echoed(self) -> list[dict[str, Any]]:
        """Every request echoed so far, as it was echoed."""
        return [json.loads(line.removeprefix("Echoed: ")) for line in list(self.lines) if line.startswith("Echoed: ")]
