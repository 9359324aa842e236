"""Shared pytest hooks: a failed end-to-end test shows the logs of the daemons it started."""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import llmdproc
import pytest
from llmdproc import Factory, Llmd, cleanup, make_llmd

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


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Factory]:
    """Start llmd daemons with make_llmd's options, each in its own folder; stop them after."""
    made: list[Llmd] = []

    def make(**kw: Any) -> Llmd:
        d = make_llmd(tmp_path / f"d{len(made)}", **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        cleanup(d)
