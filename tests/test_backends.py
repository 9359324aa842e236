"""Placement answers of Backends that need no child process: why a model was not found."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from llmd import config
from llmd.backends import Backends
from llmd.process import State


def never_started(coro: Any, name: str) -> Any:
    coro.close()
    raise AssertionError(f"{name} must not start in these tests")


# b0 and b1: their states, which of them have listed models (with what), then the answer.
CASES = [
    pytest.param(
        ("running", "running"),
        {"b0": [], "b1": []},
        None,
        "model 'm:1b' not found",
        id="all-listed",
    ),
    pytest.param(
        ("running", "starting"),
        {"b0": []},
        "b1",
        "model 'm:1b' is not on any backend listed so far; backend 'b1' may have it but its "
        "models are not known yet (starting)",
        id="one-still-starting",
    ),
    pytest.param(
        ("stopped", "stopped"),
        {},
        "b0",
        "model 'm:1b' is not on any backend listed so far; backend 'b0' may have it but its "
        "models are not known yet (stopped)",
        id="before-start",
    ),
    pytest.param(
        ("running", "running"),
        {"b1": []},
        "b0",
        "model 'm:1b' is not on any backend listed so far; backend 'b0' may have it but its "
        "models are not known yet (its /api/tags failed)",
        id="tags-failed",
    ),
    pytest.param(
        ("running", "fatal"),
        {"b0": []},
        None,
        "model 'm:1b' not found (backend 'b1' is fatal, so its models are unknown)",
        id="fatal-unlisted",
    ),
    pytest.param(
        ("running", "backoff"),
        {"b0": [], "b1": [{"name": "other:1b"}]},
        None,
        "model 'm:1b' not found",
        id="crashed-but-listed-before",
    ),
]


@pytest.mark.parametrize(("states", "listed", "child", "message"), CASES)
async def test_missing_says_whether_to_retry(
    states: tuple[str, str],
    listed: dict[str, list[dict[str, Any]]],
    child: str | None,
    message: str,
) -> None:
    cfg = config.from_dict(
        {"backend": [{"name": "b0", "port": 20001}, {"name": "b1", "port": 20002}]}
    )
    async with aiohttp.ClientSession() as session:
        backends = Backends(cfg, session=session, start_task=never_started)
        for name, state in zip(("b0", "b1"), states, strict=True):
            backends.children[name].state = State(state)
        for name, models in listed.items():
            backends.set_tags(name, models)
        found, why = backends.missing("m:1b")
    assert (found.name if found else None, why) == (child, message)
