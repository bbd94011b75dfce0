"""The end-to-end suite runs each sampler-backed test against each transport."""

from __future__ import annotations

import pytest

from extproc.server.transports import TRANSPORTS


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)
