"""What every model endpoint shares: resolving the model, holding a runner, pacing tokens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .config import Settings
from .httputil import ApiError
from .sched import Runner, SchedError, Scheduler
from .store import Installed, Name, Store

# Prompt processing runs this many times faster than generation.
PROMPT_SPEEDUP = 20.0


class Session:
    """One request's hold on a runner; close() releases it (exactly once)."""

    def __init__(self, sched: Scheduler, runner: Runner, started: float, speed: float) -> None:
        self.sched = sched
        self.runner = runner
        self.started = started
        self.loaded_at = time.monotonic()
        self.speed = speed
        self.prompt_eval_s = 0.0
        self.eval_s = 0.0
        self._closed = False

    def _per_token_s(self) -> float:
        spec = self.runner.installed.spec
        return self.runner.slowdown / spec.tokens_per_second / self.speed

    async def run(
        self, tokens: list[str], prompt_count: int, emit: Callable[[str], Awaitable[None]]
    ) -> None:
        """Wait for a parallel slot, 'evaluate' the prompt, then emit tokens at the model's pace."""
        async with self.runner.slots:
            self.sched.note_busy(self.runner)
            t0 = time.monotonic()
            await asyncio.sleep(prompt_count * self._per_token_s() / PROMPT_SPEEDUP)
            t1 = time.monotonic()
            self.prompt_eval_s = t1 - t0
            step = self._per_token_s()
            deadline = t1
            for tok in tokens:
                deadline += step
                await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                self.sched.note_busy(self.runner)  # cheap: it writes at most twice a second
                await emit(tok)
            self.eval_s = time.monotonic() - t1

    async def embed_delay(self, prompt_count: int) -> None:
        """Time to embed prompt_count tokens (prompt-speed), holding a slot."""
        async with self.runner.slots:
            self.sched.note_busy(self.runner)
            t0 = time.monotonic()
            await asyncio.sleep(prompt_count * self._per_token_s() / PROMPT_SPEEDUP)
            self.prompt_eval_s = time.monotonic() - t0

    def metrics(self, prompt_count: int, eval_count: int) -> dict[str, int]:
        """The done record's durations (nanoseconds) and counts."""
        now = time.monotonic()
        return {
            "total_duration": int((now - self.started) * 1e9),
            "load_duration": int((self.loaded_at - self.started) * 1e9),
            "prompt_eval_count": prompt_count,
            "prompt_eval_duration": int(self.prompt_eval_s * 1e9),
            "eval_count": eval_count,
            "eval_duration": int(self.eval_s * 1e9),
        }

    def close(self) -> None:
        """Release the runner."""
        if not self._closed:
            self._closed = True
            self.sched.release(self.runner)


class Engine:
    """Model lookup plus scheduling for the HTTP handlers."""

    def __init__(self, settings: Settings, store: Store, sched: Scheduler) -> None:
        self.settings = settings
        self.store = store
        self.sched = sched

    def installed(self, name: Name | None) -> Installed | None:
        """The installed model, if any."""
        return None if name is None else self.store.get(name)

    async def open(
        self,
        installed: Installed,
        options: dict[str, Any],
        keep_alive: float | None,
        started: float,
    ) -> Session:
        """Acquire a runner (loading it if needed); SchedError becomes ApiError."""
        try:
            runner = await self.sched.acquire(installed, options, keep_alive)
        except SchedError as e:
            raise ApiError(e.status, e.message) from None
        return Session(self.sched, runner, started, self.settings.speed)


def num_predict(options: dict[str, Any]) -> int | None:
    """options.num_predict as an int, or None."""
    v = options.get("num_predict")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ApiError(400, 'option "num_predict" must be of type integer')
    return int(v)
