"""A token bucket per channel: a guest that floods is answered RATE_LIMITED and slows
only itself."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    rate: float   # commands per second, sustained
    burst: float  # commands at once
    _tokens: float = field(default=-1.0)
    _last: float = field(default=0.0)

    def take(self, now: float) -> bool:
        """Spend one token if there is one (``now``: a monotonic clock reading)."""
        if self._tokens < 0:
            self._tokens, self._last = self.burst, now
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False
