"""Host side of the channel: take the guest's commands in order and answer each one.

The guest is not trusted: any byte of the region may change at any time.  The reader
therefore re-validates the header on every poll, bounds every offset by the region
size, and answers a slot that is torn or corrupt with ``Status.CORRUPT`` instead of
acting on it.  It writes only the consume counter, the host epoch and response slots.

Restart: the consume counter lives in the region, and a response slot already holding
the answer to the next command (the host died between answering and counting) is
recognised, so nothing answered is handed out again.  Re-initialisation: a new guest
epoch restarts the sequence at zero; commands of the old epoch are gone.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable

from . import ring
from .backoff import Backoff
from .region import Region

log = logging.getLogger(__name__)
_PUBLISH = struct.Struct("<Q")
_EPOCH = struct.Struct("<I")


@dataclass(frozen=True)
class Incoming:
    """A valid command taken from the ring; ``(channel, epoch, seq)`` is its idempotency key."""

    channel: str
    epoch: int
    seq: int
    payload: bytes


@dataclass
class ReaderStats:
    commands: int = 0
    corrupt: int = 0
    resumed_answers: int = 0
    epochs: int = 0
    bad_header_polls: int = 0


@dataclass
class ChannelReader:
    """Consumes one region.  ``poll()`` returns the next command (the same one until it is
    answered), ``answer()`` writes its response and moves the consume counter on."""

    region: Region
    name: str = ""
    stats: ReaderStats = field(default_factory=ReaderStats)
    problem: str | None = None
    _geometry: ring.Geometry | None = None
    _epoch: int = 0
    _consume: int = 0
    _unusable_at: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.name = self.name or self.region.path

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def consume(self) -> int:
        return self._consume

    def pending(self) -> int:
        """Commands published but not answered (0 while the region is unusable)."""
        header = self._attach()
        if header is None:
            return 0
        return max(0, min(header.publish - self._consume, header.geometry.slot_count))

    def poll(self) -> Incoming | None:
        """The next valid command, answering damaged slots on the way (at most one ring's
        worth per call, so a guest publishing garbage cannot hold the caller)."""
        if self._idle():
            return None
        for _ in range(ring.MAX_SLOT_COUNT):
            header = self._attach()
            if header is None or header.publish == self._consume:
                return None
            buf, geometry = self.region.buf, header.geometry
            if ring.decode_response(buf, geometry, self._consume, self._epoch) is not None:
                # Answered before a restart, counter not yet moved: count it, do not replay it.
                self.stats.resumed_answers += 1
                self._advance()
                continue
            slot = ring.decode_command(buf, geometry, self._consume, self._epoch)
            if isinstance(slot, str):
                # Publish comes after the slot is written, so a guest that follows the
                # protocol never shows a torn slot here; look once more, then answer it.
                slot = ring.decode_command(buf, geometry, self._consume, self._epoch)
            if not isinstance(slot, str):
                return Incoming(self.name, self._epoch, slot.seq, slot.payload)
            self.stats.corrupt += 1
            log.warning("channel %s: command %d rejected: %s", self.name, self._consume, slot)
            self.answer(self._consume, ring.Status.CORRUPT, f"command slot rejected: {slot}")
        return None

    def _idle(self) -> bool:
        """The cheap check an idle poll needs: nothing changed since the last look (same
        epoch, nothing newly published; or the same unusable header).  Keeps a reader of
        an idle region at a few microseconds per poll."""
        publish, = _PUBLISH.unpack_from(self.region.buf, ring.OFFSET_PUBLISH)
        epoch, = _EPOCH.unpack_from(self.region.buf, ring.OFFSET_GUEST_EPOCH)
        if self._geometry is None:
            return (epoch, publish) == self._unusable_at
        return epoch == self._epoch and publish == self._consume

    def has_work(self) -> bool:
        """Whether ``poll()`` may find something: cheap enough to ask of many regions often."""
        return not self._idle()

    def answer(self, seq: int, status: int, text: str) -> bool:
        """Write the answer to ``seq`` (the command ``poll()`` returned) and count it.
        Returns False, writing nothing, if the guest re-initialised the region meanwhile:
        the command belonged to an epoch that no longer exists."""
        if seq != self._consume or self._geometry is None:
            raise ValueError(f"answer for {seq} out of order; the next command is {self._consume}")
        if ring.read_header(self.region.buf).guest_epoch != self._epoch:
            log.info("channel %s: answer to %d dropped, the guest re-initialised the region", self.name, seq)
            return False
        ring.encode_response(self.region.buf, self._geometry, seq, self._epoch, int(status), text)
        self.stats.commands += 1
        self._advance()
        return True

    def _advance(self) -> None:
        self._consume += 1
        ring.write_u64(self.region.buf, ring.OFFSET_CONSUME, self._consume)

    def _attach(self) -> ring.Header | None:
        """Validate the header; adopt a new epoch (or the region's first one) when it changes."""
        header = ring.read_header(self.region.buf)
        problem = None if header.blank else header.problem(self.region.size)
        if header.blank or problem:
            self._unusable_at = (header.guest_epoch, header.publish)
            if problem and problem != self.problem:
                log.warning("channel %s unusable: %s", self.name, problem)
            self.problem = problem or "region not initialised by the guest yet"
            self.stats.bad_header_polls += 1
            self._geometry = None
            return None
        self.problem = None
        if header.guest_epoch != self._epoch or header.geometry != self._geometry:
            self._adopt(header)
        if header.publish < self._consume:
            # Only a re-initialisation (new epoch) may move publish back: nothing to do.
            return dataclasses.replace(header, publish=self._consume)
        if header.publish - self._consume > header.geometry.slot_count:
            # A counter the protocol cannot produce: take the slots one by one; their
            # sequence numbers and CRCs decide what is real.
            return dataclasses.replace(header, publish=self._consume + 1)
        return header

    def _adopt(self, header: ring.Header) -> None:
        self.stats.epochs += 1
        self._geometry = header.geometry
        self._epoch = header.guest_epoch
        if header.host_epoch == header.guest_epoch:
            self._consume = header.consume
            log.info("channel %s: resuming epoch %#x at command %d", self.name, self._epoch, self._consume)
        else:
            self._consume = 0
            ring.write_u64(self.region.buf, ring.OFFSET_CONSUME, 0)
            ring.write_u32(self.region.buf, ring.OFFSET_HOST_EPOCH, self._epoch)
            log.info("channel %s: new guest epoch %#x", self.name, self._epoch)


Handler = Callable[[Incoming], tuple[int, str]]


def serve(reader: ChannelReader, handler: Handler, stop: threading.Event,
          backoff: Backoff | None = None) -> None:
    """Answer commands with ``handler`` until ``stop`` is set; a failing handler answers
    ``INTERNAL`` and the loop goes on, so one bad command never stops a channel."""
    backoff = backoff or Backoff()
    while not stop.is_set():
        incoming = reader.poll()
        if incoming is None:
            backoff.wait()
            continue
        backoff.reset()
        try:
            status, text = handler(incoming)
        except Exception as error:  # the handler's bug must not take the channel down
            log.exception("channel %s: handler failed on command %d", reader.name, incoming.seq)
            status, text = ring.Status.INTERNAL, f"internal error: {error}"
        reader.answer(incoming.seq, status, text)
