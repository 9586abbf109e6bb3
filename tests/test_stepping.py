"""The core's long loops in steps (stepping.py): the shell's pause between them."""

from __future__ import annotations

import gc
import weakref

import pytest

from mbvisor.controller.stepping import STEP, let_go, pausing


def test_pausing_gives_every_item_in_order_with_a_pause_after_each_step():
    taken = []
    items = list(range(3 * STEP + 5))
    given = []
    for item in pausing(items, lambda: taken.append(len(given))):
        given.append(item)
    assert given == items
    assert taken == [STEP, 2 * STEP, 3 * STEP, 3 * STEP + 5]


def test_pausing_nothing_pauses_never():
    taken = []
    assert list(pausing([], lambda: taken.append(1))) == [] and taken == []


class Held:
    """An item whose freeing can be watched (a weak reference dies with it)."""


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_let_go_frees_a_step_at_a_time_with_a_pause_between_steps(kind):
    """What a reconnected switch's reconciliation compiled is freed in steps: each pause
    sees at most STEP more items freed than the one before, and at the end all are."""
    held = [Held() for _ in range(2 * STEP + 3)]
    watched = [weakref.ref(h) for h in held]
    items = held if kind == "list" else dict(enumerate(held))
    del held  # ``items`` is the last holder
    freed_at_pauses = []
    gc.collect()
    let_go(items, lambda: freed_at_pauses.append(sum(1 for w in watched if w() is None)))
    assert not items and all(w() is None for w in watched)
    assert freed_at_pauses == [STEP, 2 * STEP, 2 * STEP + 3]


def test_let_go_of_nothing_pauses_never():
    taken = []
    let_go([], lambda: taken.append(1))
    let_go({}, lambda: taken.append(1))
    assert taken == []


@pytest.mark.parametrize("step", [0, -1])
def test_a_step_of_no_item_is_refused(step):
    """A step of 0 would drop every item (pausing) or never end (let_go)."""
    with pytest.raises(ValueError, match="at least one item"):
        list(pausing([1, 2], lambda: None, step))
    for items in ([1, 2], {1: 2, 3: 4}):
        with pytest.raises(ValueError, match="at least one item"):
            let_go(items, lambda: None, step)
        assert len(items) == 2  # nothing let go of
