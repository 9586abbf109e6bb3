"""Publishing each served bridge's annotated ports (its *inventory*) to the controller.

The controller's trust model decides from these inventories whose commands to accept and
where backends are, so the controller must always hold the operator's current view:

* a scan that finds a bridge's inventory changed publishes it at once
  (``PUT /v1/switches/{dpid}/ports``, which replaces the switch's whole inventory);
* a failed attempt is retried with a pause doubling from the discovery interval up to 60 s,
  like a departed VM's removal;
* an inventory the controller accepted is published again every 60 s, so a controller
  restarted from an older database learns the current one without anyone noticing;
* a bridge that is no longer served (gone, or without a datapath id) gets an empty
  inventory once, so the controller stops trusting its ports.

Each bridge has its own publisher thread: a controller that takes 30 s to answer one PUT
holds up neither the commands (their workers never wait for a publisher) nor the other
bridges.  ``Publication`` is the pure bookkeeping (tested without threads or HTTP);
``Publisher`` is its thread.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from mbvisor.guest.backoff import Backoff

from .controller_client import ControllerClient, ControllerFailed, ControllerUnavailable
from mbvisor.controller.requests import inventory_body
from mbvisor.controller.trust import PortIdentity

log = logging.getLogger("mbvisor.agent")


@dataclass
class Publication:
    """One bridge's inventory: what the last scan found (``wanted``), whether the
    controller is known to hold exactly that (``in_sync``), and when to try next."""

    dpid: int
    bridge: str
    backoff: Backoff
    refresh: float = 60.0
    wanted: tuple[PortIdentity, ...] = ()
    in_sync: bool = False       # the controller accepted ``wanted`` and nothing failed since
    accepted: tuple[PortIdentity, ...] | None = None  # what it last accepted
    accepted_at: float = 0.0    # monotonic
    published_at: float | None = None  # wall clock, for the status
    due: float = 0.0            # monotonic: no attempt before (a failure's back-off)
    attempts: int = 0           # failed attempts since the last success
    error: str | None = None    # the last failure
    refused: tuple[dict, ...] = ()  # the controller's refused entries in its last answer
    retiring: bool = False      # no longer served: once the empty inventory is accepted, done
    fresh: bool = False         # ``wanted`` changed since the last attempt
    incarnation: frozenset[str] = frozenset()  # the OVS rows of ``wanted`` (a re-created port is new)

    def offer(self, entries: tuple[PortIdentity, ...], now: float, incarnation: frozenset[str] = frozenset()) -> bool:
        """A scan's entries (and their interfaces' OVS rows); True if they changed (then
        they are due at once, whatever the back-off of an earlier failure said)."""
        self.retiring = False
        if entries == self.wanted and incarnation == self.incarnation and (self.in_sync or self.attempts):
            return False
        self.wanted, self.incarnation, self.in_sync, self.due, self.fresh = entries, incarnation, False, now, True
        self.backoff.reset()
        return True

    def retire(self, now: float) -> bool:
        """The bridge is not served any more: its ports are no one's to vouch for."""
        changed = self.offer((), now)
        self.retiring = True
        return changed

    @property
    def done(self) -> bool:
        return self.retiring and self.in_sync

    def wait(self, now: float) -> float:
        """Seconds until the next attempt (0: now)."""
        if not self.in_sync:
            return max(0.0, self.due - now)
        return max(0.0, self.accepted_at + self.refresh - now)

    def succeeded(self, sent: tuple[PortIdentity, ...], answer: dict, now: float) -> list[str]:
        """The controller accepted ``sent``; the log lines this calls for (a change of
        what it holds or refuses, or the end of a run of failures; a plain refresh is
        silent)."""
        lines = []
        if sent != self.accepted or self.attempts:
            vms = sum(1 for entry in sent if isinstance(entry, PortIdentity))
            lines.append(f"{vms} port(s)" + (f" and {len(sent) - vms} underlay port(s)" if len(sent) > vms else "")
                         + " published"
                         + (f" after {self.attempts} failed attempt(s)" if self.attempts else ""))
        refused = tuple(dict(r) for r in answer.get("refused", ()))
        if refused != self.refused:
            lines += [f"the controller refuses port {r.get('port')} ({r.get('interface')}): {r.get('reason')}"
                      for r in refused] or ["the controller refuses none of its ports any more"]
        self.refused, self.accepted, self.accepted_at = refused, sent, now
        self.in_sync = sent == self.wanted
        self.published_at, self.attempts, self.error, self.fresh = time.time(), 0, None, False
        self.backoff.reset()
        return lines

    def failed(self, error: str, now: float) -> bool:
        """An attempt failed; whether to log it: the first failure of a run, or the first
        attempt at a changed inventory (its error may be new), not every retry."""
        first = self.attempts == 0 or self.fresh
        self.attempts += 1
        self.error, self.in_sync, self.fresh = error, False, False
        self.due = now + self.backoff.next_pause()
        return first

    def status(self) -> dict:
        state = "published" if self.in_sync else ("failing" if self.attempts else "pending")
        vms = sum(1 for entry in self.wanted if isinstance(entry, PortIdentity))
        return {"dpid": f"{self.dpid:016x}", "bridge": self.bridge, "ports": vms, "underlay": len(self.wanted) - vms,
                "state": state,
                "published_at": self.published_at, "attempts": self.attempts, "error": self.error,
                "refused": list(self.refused)}


@dataclass
class Publisher:
    """The thread that publishes one bridge's inventory whenever its ``Publication`` says."""

    publication: Publication
    client: ControllerClient
    lock: threading.Lock = field(default_factory=threading.Lock)
    wake: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> "Publisher":
        self.thread = threading.Thread(target=self._run, name=f"inventory {self.publication.bridge}", daemon=True)
        self.thread.start()
        return self

    def offer(self, entries: tuple[PortIdentity, ...], incarnation: frozenset[str] = frozenset()) -> None:
        with self.lock:
            if self.publication.offer(entries, time.monotonic(), incarnation):
                self.wake.set()

    def retire(self) -> None:
        with self.lock:
            if self.publication.retire(time.monotonic()):
                self.wake.set()

    def close(self) -> None:
        self.stop.set()
        self.wake.set()

    @property
    def finished(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()

    def status(self) -> dict:
        with self.lock:
            return self.publication.status()

    def _run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                if self.publication.done:
                    return
                pause, sent = self.publication.wait(time.monotonic()), self.publication.wanted
            if pause > 0:
                self.wake.wait(pause)
                self.wake.clear()
                continue
            try:
                self._publish(sent)
            except Exception as error:  # a bug must not end this bridge's publishing
                log.exception("inventory of %s: unexpected error", self.publication.bridge)
                with self.lock:
                    self.publication.failed(f"internal error: {error!r}", time.monotonic())

    def _publish(self, sent: tuple[PortIdentity, ...]) -> None:
        where = f"inventory of {self.publication.bridge} ({self.publication.dpid:016x})"
        try:
            body = inventory_body(sent)
            answer = self.client.put_ports(self.publication.dpid, body["ports"], body["underlay"])
        except (ControllerUnavailable, ControllerFailed) as error:
            with self.lock:
                if self.publication.failed(str(error), time.monotonic()):
                    log.warning("%s not published: %s; retrying", where, error)
            return
        with self.lock:
            lines = self.publication.succeeded(sent, answer, time.monotonic())
        for line in lines:
            (log.warning if "refuses port" in line else log.info)("%s: %s", where, line)
