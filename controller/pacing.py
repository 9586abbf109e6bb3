"""Long work shares the event loop: it yields after every SLICE seconds of running.

Under eventlet a green thread runs until it yields.  A 100,000-command request parsed,
planned, compiled and recorded in one go would hold every other switch's commands, the
REST API and the echo replies (a switch drops a controller silent for 5 s).  Yielding
every N items gives slices as long as N items happen to take; a clock gives the same
slice whatever the items cost.  A yield costs about 20 us, so 1 ms slices cost ~2 %; against
2 ms they cut what another switch's command waits during a 100k-filter install by a third
(p50 23 -> 15 ms, p99 49-67 -> 41-43 ms).
"""

from __future__ import annotations

import time

from .compat import hub

SLICE = 0.001  # seconds of work between two yields


class Pacer:
    """``pace()`` in a loop; or ``due()`` then ``rest()`` when something must be done
    before yielding (a partial write flushed)."""

    def __init__(self, slice_seconds: float | None = None):
        self.slice = SLICE if slice_seconds is None else slice_seconds
        self.deadline = time.monotonic() + self.slice

    def due(self) -> bool:
        return time.monotonic() >= self.deadline

    def rest(self) -> None:
        hub.sleep(0)
        self.deadline = time.monotonic() + self.slice

    def __call__(self) -> None:
        if time.monotonic() >= self.deadline:
            self.rest()
