"""Backend health: which backends in use stopped answering the controller's checks.

The controller asks each backend in use, every ``MBVISOR_BACKEND_CHECK_INTERVAL`` s, with
an ARP probe (a neighbour solicitation for IPv6) sent straight to its port.  A backend is
down when a check has gone unanswered for ``MBVISOR_BACKEND_DOWN_AFTER`` s: it leaves its
redirects' selection, and when a redirect has none left its traffic goes to the middlebox
itself.  It is up again at its next answer.  The clock starts at the oldest *unanswered
check*, not at the last answer: a controller too busy to send checks for a while proves
nothing against its backends, so a busy controller never makes them flap.  A backend is
up until checks prove otherwise, so a new redirect takes effect at once.  Pure
bookkeeping over an explicit clock; the service sends and receives.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BackendHealth:
    """One switch's backends in use: when each one's oldest unanswered check was sent."""

    down_after: float
    unanswered: dict[str, float] = field(default_factory=dict)  # address -> oldest unanswered check
    reported: frozenset[str] = frozenset()  # down as of the last ``settle``: what the flows reflect

    def checking(self, addresses, now: float) -> None:
        """Checks sent now to ``addresses``; any other backend is forgotten (no longer in use)."""
        in_use = set(addresses)
        for address in in_use:
            self.unanswered.setdefault(address, now)
        for gone in set(self.unanswered) - in_use:
            del self.unanswered[gone]

    def answered(self, address: str, now: float) -> None:
        self.unanswered.pop(address, None)

    def down(self, now: float) -> frozenset[str]:
        return frozenset(address for address, sent in self.unanswered.items() if now - sent > self.down_after)

    def settle(self, now: float) -> tuple[frozenset[str], frozenset[str]]:
        """(went down, came back) since the last settle; the flows follow ``reported``."""
        down = self.down(now)
        went, back = down - self.reported, self.reported - down
        self.reported = down
        return went, back
