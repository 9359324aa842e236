"""llmd.bodies: the body memory budget, strict JSON and the runner options llmd reads."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from llmd.bodies import BodyBudget, BodyHold, check_runner_options, dump_json, parse_json


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"a": 1e309}', "out of range"),
        ('{"a": -1E400}', "out of range"),
        ('{"a": NaN}', "NaN"),
        ('{"a": Infinity}', "Infinity"),
        ('{"a": -Infinity}', "Infinity"),
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
        ('{"a":' * 5000 + "1" + "}" * 5000, "nested too deeply"),
        ('{"a": 1', "Expecting"),
    ],
)
def test_parse_json_refuses_what_go_refuses(text: str, error: str) -> None:
    """Numbers a float64 cannot hold, NaN/Infinity and nesting past the recursion limit are
    ValueErrors (so 400s), never OverflowError or RecursionError."""
    with pytest.raises(ValueError, match=error):
        parse_json(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1e308}', {"a": 1e308}),
        ('{"a": 12345678901234567890123}', {"a": 12345678901234567890123}),
        ('"\\ud800"', "\ufffd"),
        ('{"\\udfff": ["x\\ud800y"]}', {"\ufffd": ["x\ufffdy"]}),
        ('"\\ud83d\\ude00"', "\U0001f600"),
        ("[[[]]]", [[[]]]),
    ],
)
def test_parse_json_accepts_and_repairs(text: str, expected: Any) -> None:
    """Finite numbers parse as usual; a lone surrogate becomes U+FFFD, as Go decodes it."""
    assert parse_json(text) == expected


def test_dump_json_is_compact_utf8_and_frees_the_body() -> None:
    """The forwarded body is compact UTF-8 JSON; the parsed dict is emptied to free it."""
    body = {"model": "m", "prompt": "gr\u00fc\u00df"}
    assert dump_json(body) == '{"model":"m","prompt":"gr\u00fc\u00df"}'.encode()
    assert body == {}


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (None, None),
        ({}, None),
        ({"num_ctx": 4096, "num_gpu": 0, "use_mmap": False, "temperature": "hot"}, None),
        ({"num_ctx": 2048.0, "num_thread": -1}, None),
        ([1], "options must be an object, got array"),
        ("big", "options must be an object, got string"),
        ({"num_ctx": "4096"}, "'num_ctx' must be of type integer, got string"),
        ({"num_batch": True}, "'num_batch' must be of type integer, got boolean"),
        ({"num_gpu": [1]}, "'num_gpu' must be of type integer, got array"),
        ({"main_gpu": 1e300}, "'main_gpu' is out of range"),
        ({"num_ctx": 2**63}, "'num_ctx' is out of range"),
        ({"use_mmap": 1}, "'use_mmap' must be of type boolean, got number"),
    ],
)
def test_runner_options_are_checked(options: Any, error: str | None) -> None:
    """Runner options llmd plans loads with must be what Ollama's api.Runner accepts;
    sampling options are the child's business."""
    if error is None:
        check_runner_options(options)
    else:
        with pytest.raises(ValueError, match=error.replace("[", r"\[")):
            check_runner_options(options)


async def test_body_budget_waits_for_room_then_gives_up() -> None:
    """A body that does not fit waits until another is released, or until its wait is over;
    one body larger than the budget passes when nothing else is held."""
    budget = BodyBudget()
    a, b, c = BodyHold(budget), BodyHold(budget), BodyHold(budget)
    assert await a.grow(80, limit=100, timeout=1)
    assert not await b.grow(30, limit=100, timeout=0.05)  # gave up
    waiting = asyncio.ensure_future(b.grow(30, limit=100, timeout=5))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    a.release()
    assert await waiting
    assert budget.used == 30
    b.release()
    b.release()  # twice is harmless
    assert budget.used == 0
    assert await c.grow(500, limit=100, timeout=0)  # alone: let through
    assert not await a.grow(1, limit=100, timeout=0)
    c.release()
    assert budget.used == 0
