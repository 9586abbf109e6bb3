"""What a follower follows: one guest tool's list of addresses to drop.

Every adapter (nftables, ipset) offers the same three things, so the follower's loop never
knows which tool it reads:

* ``verdict()``: whether offloading the list keeps the firewall's behaviour, and which
  header field (source or destination address) its drop rule matches.  Raises
  `NotOffloadable` with the reason otherwise.
* ``snapshot()``: the whole list now, each network with the monotonic time it expires at
  (None: no timeout).
* ``watch()``: a `Watch` started *before* the snapshot is taken, so no change falls between
  them: either a descriptor that becomes readable with changes (nft monitor), or a polling
  interval after which the follower takes a new snapshot.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

SOURCE = "src"
DESTINATION = "dst"


class NotOffloadable(Exception):
    """Offloading this list would change what the middlebox does; the message says why."""


class SourceError(Exception):
    """The tool could not be read (missing, the set deleted, output not understood); the
    follower reports it and starts again from a fresh snapshot."""


class Verdict(NamedTuple):
    """The list may be offloaded: its elements are dropped when they are the packet's
    ``fields`` (SOURCE and/or DESTINATION)."""

    fields: frozenset[str]


class Change(NamedTuple):
    """One element added to or deleted from the list (``adding``), as its tool reported it.
    ``expires_at``: monotonic seconds, or None (no timeout, or a deletion)."""

    adding: bool
    network: str
    expires_at: float | None = None


class Resync(NamedTuple):
    """Something changed that is not one element (the set flushed or re-created, the rules
    edited, events lost): take a new verdict and a new snapshot."""

    reason: str


class Watch(Protocol):
    poll_interval: float | None  # seconds between snapshots for a tool without events; None with events

    def fileno(self) -> int | None:
        """A descriptor that is readable when `changes` has something; None when polled."""

    def changes(self) -> list[Change | Resync]:
        """What was reported since the last call, without blocking."""

    def close(self) -> None:
        """Stop watching (end the tool's monitor process)."""


class Source(Protocol):
    description: str  # e.g. "nft set inet filter blocklist", for messages

    def verdict(self) -> Verdict: ...

    def snapshot(self) -> dict[str, float | None]: ...

    def watch(self) -> Watch: ...
