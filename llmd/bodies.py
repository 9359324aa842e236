"""Request bodies the proxy reads: a shared memory budget, strict JSON, checked runner options."""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

from llmd.config import RUNNER_BOOL_OPTIONS as BOOL_OPTIONS
from llmd.config import RUNNER_INT_OPTIONS as INT_OPTIONS

# Go decodes these into int; a float beyond int64 is out of range there.
_INT64 = 2**63


class BodyBudget:
    """Bytes of request bodies held in memory at once, shared by every request on the port."""

    def __init__(self) -> None:
        self.used = 0
        self._freed = asyncio.Event()

    async def acquire(self, n: int, limit: int, timeout: float) -> bool:
        """Take n bytes of the budget, waiting up to `timeout` for room; False if none came.

        A reservation larger than the whole budget is granted when nothing else is held, so a
        body within proxy.max_body_size is never refused forever.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.used and self.used + n > limit:
            left = deadline - loop.time()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._freed.wait(), left)
            except TimeoutError:
                return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        """Give back n bytes and wake every waiter to look again."""
        self.used -= n
        self._freed.set()
        self._freed = asyncio.Event()


class BodyHold:
    """One request's share of the budget; release() may be called more than once."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.n = 0

    async def grow(self, n: int, limit: int, timeout: float) -> bool:
        """Hold n more bytes (see BodyBudget.acquire)."""
        if n <= 0:
            return True
        if not await self.budget.acquire(n, limit, timeout):
            return False
        self.n += n
        return True

    def release(self) -> None:
        """Give the whole share back."""
        if self.n:
            self.budget.release(self.n)
            self.n = 0


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        # Go's decoder refuses numbers a float64 cannot hold; Python would make them inf.
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"invalid literal {name} (JSON has no NaN or Infinity)")


def decode_json(buf: bytearray | bytes) -> str:
    """The text of a JSON body, as json.loads decodes bytes (so the caller can free buf before
    parsing); ValueError if it is not text."""
    return buf.decode(json.detect_encoding(buf), "surrogatepass")


def parse_json(text: str) -> Any:
    """The JSON document in text, as strict as Go's decoder on numbers; ValueError says why
    (nesting too deep for Python's recursion limit too, not a RecursionError).

    A lone surrogate (`"\\ud800"`) becomes U+FFFD, as Go decodes it, so that no string llmd
    holds fails to encode as UTF-8 later (in a log line, an error answer, the database).
    """
    try:
        doc = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if _MAYBE_SURROGATE.search(text) is None:
        return doc
    return _replace_surrogates(doc)


_MAYBE_SURROGATE = re.compile("[\ud800-\udfff]|\\\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _replace_surrogates(doc: Any) -> Any:
    def fix(v: Any) -> Any:
        return _SURROGATE.sub("\ufffd", v) if isinstance(v, str) else v

    doc = fix(doc)
    todo = [doc]
    while todo:  # a loop, not recursion: the document may be nested deep
        node = todo.pop()
        if isinstance(node, dict):
            items = [(fix(k), fix(v)) for k, v in node.items()]
            node.clear()
            node.update(items)
            todo.extend(v for _, v in items if isinstance(v, dict | list))
        elif isinstance(node, list):
            node[:] = [fix(v) for v in node]
            todo.extend(v for v in node if isinstance(v, dict | list))
    return doc


def dump_json(body: dict[str, Any]) -> bytes:
    """body as compact UTF-8 JSON; body is emptied first, so that its strings are freed before
    the bytes are made and a large body is held at most twice, not three times."""
    try:
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    except RecursionError:
        raise ValueError("nested too deeply") from None
    body.clear()
    return text.encode("utf-8", "surrogatepass")


def check_runner_options(options: Any) -> None:
    """Raise ValueError naming the first runner option llmd cannot use as Ollama would read it."""
    if options is None:
        return
    if not isinstance(options, dict):
        raise ValueError(f"options must be an object, got {_kind(options)}")
    for key in INT_OPTIONS:
        v = options.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"option {key!r} must be of type integer, got {_kind(v)}")
        if not -_INT64 <= v < _INT64:
            raise ValueError(f"option {key!r} is out of range: {v!r}")
    for key in BOOL_OPTIONS:
        v = options.get(key)
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"option {key!r} must be of type boolean, got {_kind(v)}")


def _kind(v: Any) -> str:
    return {
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(v), type(v).__name__)
