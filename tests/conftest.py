"""Shared pytest plumbing."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from extproc.server.transports import TRANSPORTS


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    # Lets fixtures see whether the test failed (to show child logs).
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """A test that asks for it runs against each transport: one contract, two implementations."""
    return str(request.param)
