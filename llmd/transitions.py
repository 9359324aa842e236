"""Guarded state machines: a transition table and the error for a change it does not list."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar

E = TypeVar("E", bound=enum.Enum)


class IllegalTransition(RuntimeError):
    """A state change that the state machine's transition table does not allow."""

    def __init__(self, subject: str, old: enum.Enum, new: enum.Enum) -> None:
        super().__init__(f"{subject}: illegal state change {_label(old)} -> {_label(new)}")
        self.subject = subject
        self.old = old
        self.new = new


def _label(state: enum.Enum) -> str:
    # States valued by their lowercase names read best as the value; others by their name.
    return state.value if isinstance(state.value, str) else state.name


def guard(table: Mapping[E, frozenset[E]], subject: str, old: E, new: E) -> None:
    """Raise IllegalTransition unless `table` lists `old -> new` (a self-change only if listed)."""
    if new not in table.get(old, frozenset()):
        raise IllegalTransition(subject, old, new)
