"""Rate limit for repeated log lines: a burst passes, the rest is counted and summarised."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

# A line may repeat this often per window before it is held back...
BURST = 5
# ...and the window after which it may pass again, with a summary of what was held back.
WINDOW_S = 60.0
# Distinct lines tracked at once; past this, new lines pass untracked (a log of unique lines
# is not the flood this is for).
MAX_KEYS = 10_000
# Only warnings and errors are limited: the floods this is for (accept() failures, a dead
# child's tracebacks) are at those levels, while info lines (a child's per-request lines) are
# mostly distinct, and tracking each of them would cost memory for nothing.
MIN_LEVEL = logging.WARNING


@dataclass
class _Seen:
    first: float
    passed: int = 0
    held: int = 0


class RepeatFilter(logging.Filter):
    """Let a line (same logger, level, text and exception type) through BURST times per
    WINDOW_S; hold back the rest and write "... repeated N more times" when its window ends."""

    def __init__(
        self,
        emit: Callable[[logging.LogRecord], object],
        *,
        burst: int = BURST,
        window: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._emit = emit
        self._burst = burst
        self._window = window
        self._clock = clock
        self._seen: dict[tuple[str, int, str, str], _Seen] = {}
        self._next_sweep = 0.0
        self._summarising = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self._summarising or record.levelno < MIN_LEVEL:
            return True
        now = self._clock()
        self._sweep(now)
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        key = (record.name, record.levelno, record.getMessage(), exc)
        seen = self._seen.get(key)
        if seen is None or now - seen.first >= self._window:
            if seen is not None:
                self._summary(key, seen)
            elif len(self._seen) >= MAX_KEYS:
                return True
            seen = self._seen[key] = _Seen(first=now)
        if seen.passed < self._burst:
            seen.passed += 1
            return True
        seen.held += 1
        return False

    def flush(self) -> None:
        """Write the summary of every line held back so far (at exit)."""
        for key, seen in list(self._seen.items()):
            self._summary(key, seen)
        self._seen.clear()

    def _sweep(self, now: float) -> None:
        """Summaries of windows that ended without a new line to carry them; forget those keys."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        for key, seen in list(self._seen.items()):
            if now - seen.first >= self._window:
                self._summary(key, seen)
                del self._seen[key]

    def _summary(self, key: tuple[str, int, str, str], seen: _Seen) -> None:
        if not seen.held:
            return
        name, level, text, _ = key
        rec = logging.LogRecord(
            name,
            level,
            __file__,
            0,
            "%s ... repeated %d more times in %gs",
            (text.split("\n", 1)[0][:300], seen.held, self._window),
            None,
        )
        seen.held = 0
        self._summarising = True
        try:
            self._emit(rec)
        finally:
            self._summarising = False


def install(handler: logging.Handler) -> RepeatFilter:
    """Put a RepeatFilter on a handler; its summaries go out through the same handler."""
    f = RepeatFilter(handler.handle)
    handler.addFilter(f)
    return f
