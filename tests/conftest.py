"""Shared pytest plumbing."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[None, Any, None]:
    # Lets fixtures see whether the test failed (to show child logs).
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
