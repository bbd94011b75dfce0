"""Every service test runs against each transport: one contract, two implementations."""

from __future__ import annotations

import pytest

from extproc.server.transports import TRANSPORTS


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)
