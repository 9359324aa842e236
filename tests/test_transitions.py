"""The transition guard shared by llmd's state machines."""

from __future__ import annotations

import enum

import pytest

from llmd.transitions import IllegalTransition, guard


class Light(enum.Enum):
    OFF = "off"
    ON = "on"
    BROKEN = "broken"


class Step(enum.Enum):
    FIRST = enum.auto()
    SECOND = enum.auto()


TABLE = {
    Light.OFF: frozenset({Light.ON, Light.BROKEN}),
    Light.ON: frozenset({Light.ON, Light.OFF, Light.BROKEN}),  # ON -> ON listed: allowed
    Light.BROKEN: frozenset[Light](),
}


@pytest.mark.parametrize(
    ("old", "new"),
    [(Light.OFF, Light.ON), (Light.OFF, Light.BROKEN), (Light.ON, Light.OFF), (Light.ON, Light.ON)],
)
def test_listed_transition_passes(old: Light, new: Light) -> None:
    """A change the table lists, a listed self-change included, passes."""
    guard(TABLE, "lamp", old, new)


@pytest.mark.parametrize(
    ("old", "new"),
    [(Light.BROKEN, Light.ON), (Light.BROKEN, Light.OFF), (Light.OFF, Light.OFF)],
)
def test_unlisted_transition_raises_naming_both_states(old: Light, new: Light) -> None:
    """A change the table does not list, an unlisted self-change included, raises and names
    the subject and both states."""
    with pytest.raises(IllegalTransition) as e:
        guard(TABLE, "lamp", old, new)
    assert str(e.value) == f"lamp: illegal state change {old.value} -> {new.value}"
    assert (e.value.subject, e.value.old, e.value.new) == ("lamp", old, new)
    assert isinstance(e.value, RuntimeError)


def test_state_missing_from_the_table_allows_nothing() -> None:
    """A state that is no key of the table can be left for no state."""
    with pytest.raises(IllegalTransition):
        guard({Light.OFF: frozenset({Light.ON})}, "lamp", Light.ON, Light.OFF)


def test_states_without_string_values_are_named_by_name() -> None:
    """An enum whose values are not strings is named by its members' names."""
    with pytest.raises(IllegalTransition, match=r"^job 7: illegal state change SECOND -> FIRST$"):
        guard({Step.FIRST: frozenset({Step.SECOND})}, "job 7", Step.SECOND, Step.FIRST)
