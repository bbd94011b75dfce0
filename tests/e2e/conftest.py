"""Fixtures of the end-to-end suite: every stack a test starts is stopped, logs shown on failure."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from extproc.stack.up import LocalStack


@pytest.fixture
def stacks(request: pytest.FixtureRequest) -> Iterator[list[LocalStack]]:
    """Stacks a test starts are stopped even when it fails; their logs are
    shown when it does."""
    started: list[LocalStack] = []
    yield started
    report = getattr(request.node, "rep_call", None)
    failed = report is not None and report.failed
    for stack in started:
        if failed:
            for name, child in stack.children().items():
                print(f"--- {name} ---\n{child.output()[-3000:]}")
        stack.stop()
