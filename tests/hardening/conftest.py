"""The hardening suite's figures: each test reports what it tried, and the run prints them."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest


@dataclass
class Figure:
    """One attack or fault family: inputs tried, inputs handled as intended, failures."""

    suite: str
    tried: int = 0
    handled: int = 0
    failures: int = 0
    notes: list[str] = field(default_factory=list)


class Figures:
    """Collects the figures of every hardening test in this run."""

    def __init__(self) -> None:
        self.rows: dict[str, Figure] = {}

    def add(
        self, suite: str, *, tried: int, handled: int, failures: int = 0, note: str = ""
    ) -> None:
        """Add counts to a suite's row; `failures` are crashes or llmd-caused 5xx."""
        row = self.rows.setdefault(suite, Figure(suite))
        row.tried += tried
        row.handled += handled
        row.failures += failures
        if note:
            row.notes.append(note)


FIGURES = Figures()


@pytest.fixture
def figures() -> Figures:
    return FIGURES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES.rows:
        return
    tr = terminalreporter
    tr.section("hardening figures")
    tr.write_line(f"{'suite':<28} {'tried':>8} {'handled':>8} {'failures':>9}  notes")
    total = Figure("total")
    for row in sorted(FIGURES.rows.values(), key=lambda r: r.suite):
        tr.write_line(
            f"{row.suite:<28} {row.tried:>8} {row.handled:>8} {row.failures:>9}  "
            + "; ".join(row.notes)
        )
        total.tried += row.tried
        total.handled += row.handled
        total.failures += row.failures
    tr.write_line(f"{'total':<28} {total.tried:>8} {total.handled:>8} {total.failures:>9}")
