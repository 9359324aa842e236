"""Runner options a request is served with, so that a client asking for other ones (num_ctx,
num_batch...) is served by the loaded runner instead of making Ollama reload it (ollama#8903).

Ollama reloads a model when a request's runner options (`api.Runner`) differ from the loaded
runner's (server/sched.go needsReload); an option the request leaves out takes Ollama's default.
So a request is sent with exactly the runner options the model was loaded with: the client's other
values are replaced, missing ones filled in, extra ones dropped. Sampling options pass untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmd.config import RUNNER_BOOL_OPTIONS, RUNNER_OPTIONS

RunnerOptions = Mapping[str, int | bool]


@dataclass(frozen=True)
class Fitted:
    """A request's options after fitting them to a runner."""

    options: dict[str, Any] | None  # what the request sends (None: no options field)
    overridden: tuple[str, ...]  # runner options the client set to another value
    asked_ctx: int | None  # the num_ctx the client asked for, if it asked for one


def runner_subset(options: Mapping[str, Any] | None) -> dict[str, int | bool]:
    """The runner options of a request's (checked) options; null counts as not set, as in Go."""
    if not options:
        return {}
    return {k: _value(k, options[k]) for k in RUNNER_OPTIONS if options.get(k) is not None}


def fit(options: Mapping[str, Any] | None, runner: RunnerOptions) -> Fitted:
    """The request's options with its runner options made exactly `runner`'s."""
    asked = runner_subset(options)
    overridden = tuple(k for k in RUNNER_OPTIONS if k in asked and asked[k] != runner.get(k))
    ctx = asked.get("num_ctx")
    asked_ctx = int(ctx) if ctx is not None else None
    if options is None and not runner:
        return Fitted(None, overridden, asked_ctx)
    out = {k: v for k, v in (options or {}).items() if k not in RUNNER_OPTIONS}
    out.update(runner)
    return Fitted(out, overridden, asked_ctx)


def ollama_defaults(env: Mapping[str, str]) -> dict[str, int | bool]:
    """The runner options Ollama gives a request that sets none (as every /v1 request), as far
    as they can be set: num_ctx from the child's OLLAMA_CONTEXT_LENGTH, if set."""
    ctx = env.get("OLLAMA_CONTEXT_LENGTH", "").strip()
    return {"num_ctx": int(ctx)} if ctx.isdigit() and int(ctx) > 0 else {}


def _value(key: str, v: Any) -> int | bool:
    """An option as Ollama reads it: Go converts a JSON number to int by truncation."""
    if key in RUNNER_BOOL_OPTIONS:
        return bool(v)
    return int(v)
