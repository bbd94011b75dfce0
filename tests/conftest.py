"""Shared pytest plumbing."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

import pytest

from extproc.server.transports import TRANSPORTS
from extproc.stack.envoy import EnvoyProcess


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


@pytest.fixture
def processes(request: pytest.FixtureRequest) -> Iterator[list[Any]]:
    """Everything a test starts is stopped, also when it fails (then its output is shown)."""
    started: list[Any] = []
    try:
        yield started
    finally:
        failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
        for proc in reversed(started):
            child = proc.child if isinstance(proc, EnvoyProcess) else proc
            if failed and child is not None:
                print(f"--- {child.name} ---\n{child.output()[-3000:]}")
            proc.stop()
