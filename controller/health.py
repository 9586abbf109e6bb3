"""Backend health: which backends in use stopped answering the controller's checks.

The controller asks each backend in use, every ``MBVISOR_BACKEND_CHECK_INTERVAL`` s, with
an ARP probe sent straight to its port (sender 0.0.0.0: answered, cached by nobody).  A
backend whose last answer (or, if it never answered, whose first check) is older than
``MBVISOR_BACKEND_DOWN_AFTER`` s is down: it leaves its redirects' selection, and when a
redirect has none left its traffic goes to the middlebox itself.  It is up again at its
next answer.  A backend is up until checks prove otherwise, so a new redirect takes
effect at once.  Pure bookkeeping over an explicit clock; the service sends and receives.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BackendHealth:
    """One switch's backends in use: when each was first checked and last answered."""

    down_after: float
    first_checked: dict[str, float] = field(default_factory=dict)
    last_answer: dict[str, float] = field(default_factory=dict)
    reported: frozenset[str] = frozenset()  # down as of the last ``settle``: what the flows reflect

    def checking(self, addresses, now: float) -> None:
        """The addresses being checked now; any other is forgotten (no longer in use)."""
        addresses = set(addresses)
        for address in addresses:
            self.first_checked.setdefault(address, now)
        for gone in set(self.first_checked) - addresses:
            del self.first_checked[gone]
            self.last_answer.pop(gone, None)

    def answered(self, address: str, now: float) -> None:
        if address in self.first_checked:
            self.last_answer[address] = now

    def down(self, now: float) -> frozenset[str]:
        return frozenset(address for address, first in self.first_checked.items()
                         if now - self.last_answer.get(address, first) > self.down_after)

    def settle(self, now: float) -> tuple[frozenset[str], frozenset[str]]:
        """(went down, came back) since the last settle; the flows follow ``reported``."""
        down = self.down(now)
        went, back = down - self.reported, self.reported - down
        self.reported = down
        return went, back
