"""Long loops of the pure core, in steps: the shell's pause between them.

The core compiles and compares whole switches (a reconnected one: 25,000 flows).  Under
eventlet the shell's green thread holds every other switch's commands, the REST API and
the echo replies until it yields, so the core calls the ``pause`` it is given between
steps, and the shell passes a ``pacing.Pacer`` (which yields once its slice is over).
Steps are small, so that a slice ends close to when it is due: 1,024 flows compared
between two looks at the clock held the loop up to 6 ms while a reconnected switch
reconverged, on a machine where a background slice is 0.3 ms.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Iterator

Pause = Callable[[], None]
STEP = 32  # flows (or plain filters) between two pauses: ~50 us of work; a look at the clock ~0.2 us


def pausing(items: Iterable, pause: Pause, step: int = STEP) -> Iterator:
    """``items``, with ``pause()`` after every ``step`` (at least 1) of them."""
    _check(step)
    iterator = iter(items)
    while batch := tuple(itertools.islice(iterator, step)):
        yield from batch
        pause()


def let_go(items: list | dict, pause: Pause, step: int = STEP) -> None:
    """Empty ``items`` (the last holder of what it holds) a step at a time, with
    ``pause()`` between steps: freeing a reconnected switch's 25,000 compiled flows at
    once held the loop 6 ms."""
    _check(step)
    if isinstance(items, dict):
        while items:
            for _ in range(min(step, len(items))):
                items.popitem()
            pause()
        return
    while items:
        del items[-step:]
        pause()


def _check(step: int) -> None:
    if step < 1:  # 0 would drop every item (pausing) or never end (let_go)
        raise ValueError(f"a step is at least one item, not {step}")
