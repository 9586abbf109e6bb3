"""OpenFlow conversations with one connected switch: multipart requests, atomic bundles,
barriers, and the errors that belong to each.

It knows nothing of middleboxes or flows: the reconciler hands it messages, it answers
with what the switch said.  Every wait has a deadline that grows with the work asked of
the switch, so a hung switch costs a bounded time, and a disconnect wakes every waiter at
once.  Replies are routed by xid; nothing here holds a lock, so other switches and the
REST API run while one switch thinks.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from mbvisor.guest.reader import FaultLog

from . import wire
from . import pacing
from .pacing import Pacer
from .compat import hub

log = logging.getLogger("mbvisor.controller")

BASE_TIMEOUT = 5.0          # seconds for any answer from the switch ...
LISTING_CEILING = 600.0     # ... and for all the parts of one multipart reply
MAX_LISTED = 2_000_000      # entries of one multipart reply (a switch that never ends is dropped)
PER_BYTE_TIMEOUT = 2e-6     # ... plus this per byte of a bundle it must apply (100k flow mods, 11 MB: +22 s)
CHUNK_BYTES = 1 << 16       # a bundle's messages are written to the switch this many bytes at a time


class SwitchUnreachable(Exception):
    """The switch disconnected or did not answer in time: nothing is known to be applied."""


@dataclass(eq=False)  # waiters are told apart by identity (a disconnect wakes each once)
class Waiter:
    """One conversation: the xids it owns, the replies' bodies and the switch's errors."""

    done: object  # hub.Event
    body: list = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lost: str | None = None
    barrier: int | None = None  # a bundle's conversation ends with this barrier's reply


def describe_error(message) -> str:
    """An OpenFlow error as text an operator can look up (type/code as in ofp-errors).
    OVS reports bundle errors to OpenFlow 1.3 as ONF experimenter errors, whose code is
    their exp_type (2313: a message of the bundle failed)."""
    if message.type == message.datapath.ofproto.OFPET_EXPERIMENTER:
        return f"OpenFlow bundle error (experimenter {message.experimenter:#x} type {message.exp_type})"
    return f"OpenFlow error type {message.type} code {message.code}"


class SwitchLink:
    def __init__(self, datapath):
        self.datapath = datapath
        self.waiters: dict[int, Waiter] = {}
        self.bundle_ids = itertools.count(1)
        self.closed: str | None = None
        self.unattended = FaultLog(log)  # errors nobody waits for: a misbehaving switch must not flood the log

    @property
    def dpid(self) -> int:
        return self.datapath.id

    # --- sending ------------------------------------------------------------------------

    def _send(self, message, waiter: Waiter | None = None) -> None:
        if self.closed:
            raise SwitchUnreachable(self.closed)
        if message.xid is None:
            self.datapath.set_xid(message)
        if waiter is not None:
            self.waiters[message.xid] = waiter
        if self.datapath.send_msg(message) is False:
            raise SwitchUnreachable(f"switch {self.dpid:016x} is disconnecting")

    def send_unconfirmed(self, message) -> None:
        """A message nobody waits for (a packet-out); lost quietly if the switch is gone."""
        try:
            self._send(message)
        except SwitchUnreachable:
            pass

    def _wait(self, waiter: Waiter, timeout: float, what: str, progressing: bool = False) -> None:
        """Until the conversation ends, at most ``timeout`` s; ``progressing``: a multipart
        reply still coming (another part within ``timeout`` s) may take longer (a restarted
        controller lists 200,000 flows in about 11 s), up to LISTING_CEILING s and
        MAX_LISTED entries: a switch that keeps sending parts is given up on."""
        started = time.monotonic()
        try:
            with pacing.on_switch():  # bulk requests are read meanwhile (pacing.preparing)
                while True:
                    parts = len(waiter.body)
                    answered = waiter.done.wait(timeout=min(timeout, pacing.ANSWER_GRACE))
                    if not answered and timeout > pacing.ANSWER_GRACE:
                        with pacing.elsewhere():  # a hung switch holds no reconciliation back
                            answered = waiter.done.wait(timeout=timeout - pacing.ANSWER_GRACE)
                    if answered:
                        break
                    if not (progressing and len(waiter.body) > parts):
                        raise SwitchUnreachable(f"switch {self.dpid:016x} did not answer {what} within "
                                                f"{timeout:.1f} s")
                    if len(waiter.body) > MAX_LISTED or time.monotonic() - started > LISTING_CEILING:
                        raise SwitchUnreachable(f"switch {self.dpid:016x} was still answering {what} after "
                                                f"{time.monotonic() - started:.0f} s and {len(waiter.body)} entries")
            if waiter.lost:
                raise SwitchUnreachable(waiter.lost)
        finally:
            for xid in [xid for xid, owner in self.waiters.items() if owner is waiter]:
                del self.waiters[xid]

    def request(self, message) -> list:
        """A multipart request; the bodies of all its replies joined.  The switch has
        BASE_TIMEOUT s for each reply, however many there are."""
        waiter = Waiter(hub.Event())
        self._send(message, waiter)
        self._wait(waiter, BASE_TIMEOUT, type(message).__name__, progressing=True)
        if waiter.errors:
            raise SwitchUnreachable(f"switch {self.dpid:016x} refused {type(message).__name__}: "
                                    + "; ".join(waiter.errors))
        return waiter.body

    def flow_stats(self, cookie: int, mask: int) -> list:
        """Every table's flows whose cookie matches ``cookie`` under ``mask``, with counters."""
        datapath = self.datapath
        parser, ofp = datapath.ofproto_parser, datapath.ofproto
        return self.request(parser.OFPFlowStatsRequest(datapath, 0, ofp.OFPTT_ALL, ofp.OFPP_ANY, ofp.OFPG_ANY,
                                                       cookie, mask, parser.OFPMatch()))

    def flow_count(self, cookie: int, mask: int) -> int:
        """How many flows of every table have a cookie matching ``cookie`` under ``mask``:
        counted by the switch, without listing them."""
        datapath = self.datapath
        parser, ofp = datapath.ofproto_parser, datapath.ofproto
        (reply,) = self.request(parser.OFPAggregateStatsRequest(datapath, 0, ofp.OFPTT_ALL, ofp.OFPP_ANY, ofp.OFPG_ANY,
                                                                cookie, mask, parser.OFPMatch()))
        return reply.flow_count

    def confirm(self, message) -> list[str]:
        """One message outside a bundle (a meter mod: bundles take flows and groups),
        then a barrier; the switch's errors, empty when it is in effect."""
        waiter = Waiter(hub.Event(), barrier=-1)  # an error must not end the wait: the barrier does
        self._send(message, waiter)
        barrier = self.datapath.ofproto_parser.OFPBarrierRequest(self.datapath)
        self._send(barrier, waiter)
        waiter.barrier = barrier.xid
        self._wait(waiter, BASE_TIMEOUT, type(message).__name__)
        return waiter.errors

    def commit(self, messages: Callable[[wire.BundleFrame], Iterable[bytes]],
               meanwhile: Callable[[], None] | None = None) -> list[str]:
        """Send the messages of ``messages(frame)`` as one atomic, ordered bundle, then a
        barrier.  Each item it yields is one or more messages framed for this bundle by
        ``frame`` (``frame.wrap`` for any message, ``frame.flow_mods`` for many flows at
        once).  Returns the switch's errors: empty means every message is in effect,
        otherwise the switch refused the bundle and holds exactly what it held before.
        An empty bundle is not sent.

        ``messages`` may be a generator that compiles as it goes: what it yields is
        written in chunks of ``CHUNK_BYTES``, so the switch parses the first messages
        while the rest are still being prepared, and each chunk is one write, not one per
        message.  If the generator raises, the bundle is discarded and the error goes to
        the caller.

        ``meanwhile`` is called once the commit is sent, before its answer is awaited: the
        caller's work that does not depend on the answer (and that it can take back if the
        switch refuses) runs while the switch applies the bundle."""
        datapath = self.datapath
        parser, ofp = datapath.ofproto_parser, datapath.ofproto
        flags = ofp.ONF_BF_ATOMIC | ofp.ONF_BF_ORDERED
        bundle = next(self.bundle_ids) & 0xFFFFFFFF
        waiter = Waiter(hub.Event())
        opening = parser.ONFBundleCtrlMsg(datapath, bundle, ofp.ONF_BCT_OPEN_REQUEST, flags, [])
        datapath.set_xid(opening)  # the frame needs its xid now; it is sent with the first message
        opened = False
        chunk = bytearray()
        size = 0
        pacer = Pacer()
        try:
            for framed in messages(wire.BundleFrame(bundle, flags, opening.xid)):
                if not opened:
                    self._send(opening, waiter)
                    opened = True
                chunk += framed
                size += len(framed)
                if len(chunk) >= CHUNK_BYTES or pacer.due():
                    self._write(bytes(chunk))
                    chunk.clear()
                    pacer.rest()  # the send loop writes it; echo replies, other switches and REST run
        except Exception:
            if opened and not self.closed:
                self._discard(bundle, flags, waiter)
            raise
        if not opened:
            return []
        if chunk:
            self._write(bytes(chunk))
        if waiter.errors:  # refused while streaming: the commit would only fail too
            self._discard(bundle, flags, waiter)
            return waiter.errors
        self._send(parser.ONFBundleCtrlMsg(datapath, bundle, ofp.ONF_BCT_COMMIT_REQUEST, flags, []), waiter)
        barrier = parser.OFPBarrierRequest(datapath)
        self._send(barrier, waiter)
        waiter.barrier = barrier.xid
        if meanwhile is not None:
            meanwhile()
        self._wait(waiter, BASE_TIMEOUT + size * PER_BYTE_TIMEOUT, f"a bundle of {size} bytes")
        return waiter.errors

    def _discard(self, bundle: int, flags: int, waiter: Waiter) -> None:
        """An abandoned bundle goes at once, not at the switch's idle timeout; its
        conversation ends here (nobody waits for the reply)."""
        parser, ofp = self.datapath.ofproto_parser, self.datapath.ofproto
        try:
            self._send(parser.ONFBundleCtrlMsg(self.datapath, bundle, ofp.ONF_BCT_DISCARD_REQUEST, flags, []))
        except SwitchUnreachable:
            pass
        for xid in [xid for xid, owner in self.waiters.items() if owner is waiter]:
            del self.waiters[xid]

    def _write(self, data: bytes) -> None:
        if self.closed:
            raise SwitchUnreachable(self.closed)
        if self.datapath.send(data) is False:
            raise SwitchUnreachable(f"switch {self.dpid:016x} is disconnecting")

    # --- receiving ----------------------------------------------------------------------

    def receive(self, message) -> None:
        """Route a reply (multipart, barrier, error, bundle control) to its waiter."""
        waiter = self.waiters.get(message.xid)
        ofp = self.datapath.ofproto
        name = type(message).__name__
        if name == "OFPErrorMsg":
            if waiter is None:
                self.unattended("error", logging.WARNING, "switch %016x: %s for xid %d (nobody waiting)",
                           self.dpid, describe_error(message), message.xid)
                return
            waiter.errors.append(describe_error(message))
            if waiter.barrier is None:
                waiter.done.set()  # a refused request is answered by its error alone
            return
        if waiter is None:
            return
        if name == "OFPBarrierReply":
            if waiter.barrier == message.xid:
                waiter.done.set()
            return
        if name.endswith("StatsReply"):
            body = message.body
            waiter.body.extend(body if isinstance(body, list) else [body])
            if not message.flags & ofp.OFPMPF_REPLY_MORE:
                waiter.done.set()

    def close(self, reason: str) -> None:
        """The connection is gone: every waiter learns it now, not at its deadline."""
        self.closed = reason
        for waiter in set(self.waiters.values()):
            waiter.lost = reason
            waiter.done.set()
