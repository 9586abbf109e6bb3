"""A token bucket per channel: a guest that floods is answered RATE_LIMITED and slows
only itself.  A token is one command, not one frame: a frame of 100 commands costs 100,
so packing commands into frames does not multiply the rate."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    rate: float   # commands per second, sustained
    burst: float  # commands at once
    _tokens: float = field(default=-1.0)
    _last: float = field(default=0.0)

    def take(self, now: float, count: int = 1) -> bool:
        """Spend ``count`` tokens if there are that many, else none (``now``: a monotonic
        clock reading).  More than ``burst`` at once is never granted."""
        if self._tokens < 0:
            self._tokens, self._last = self.burst, now
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= count:
            self._tokens -= count
            return True
        return False
