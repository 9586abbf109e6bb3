"""Adaptive polling: fast while there is work, nearly free while idle.

Shared memory gives no doorbell the host can wait on without a driver (ivshmem-plain
has no interrupts), so both sides poll.  Polling right after activity keeps round trips
short; doubling the pause while nothing happens keeps an idle poller at about a hundred
cheap wake-ups per second.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


@dataclass
class Backoff:
    """Yield-only for the first ``spins`` polls, then sleep ``floor``..``ceiling`` seconds,
    doubling each idle poll.  ``reset()`` on activity."""

    floor: float = 50e-6
    ceiling: float = 10e-3
    spins: int = 20
    _idle_polls: int = 0
    _pause: float = 0.0

    def reset(self) -> None:
        self._idle_polls = 0
        self._pause = 0.0

    def next_pause(self) -> float:
        """The pause for this idle poll (0 means just yield the CPU)."""
        self._idle_polls += 1
        if self._idle_polls <= self.spins:
            return 0.0
        self._pause = min(self.ceiling, max(self.floor, self._pause * 2))
        return self._pause

    def wait(self, deadline: float | None = None) -> None:
        pause = self.next_pause()
        if deadline is not None:
            pause = max(0.0, min(pause, deadline - time.monotonic()))
        if pause == 0.0:
            os.sched_yield()  # time.sleep(0) really sleeps (~75 us of timer slack here)
        else:
            time.sleep(pause)
