"""Shared pytest hooks: a failed end-to-end test shows the logs of the daemons it started."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import llmdproc
import pytest

LOG_TAIL_LINES = 400


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[Any]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for d in llmdproc.STARTED:
            lines = d.logs().splitlines()[-LOG_TAIL_LINES:]
            report.sections.append((f"llmd log {d.log_path}", "\n".join(lines)))
    if report.when == "teardown":
        llmdproc.STARTED.clear()
