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
import os
import select
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from . import ring
from .answers import Answer, answer, render
from .backoff import Backoff
from .region import Region, RegionFile, RegionIO, RegionShrunk, read_counters

log = logging.getLogger(__name__)
_UNSEEN = object()  # no header looked at yet: the first poll always looks
BELL_SWEEP = 1.0    # a reader woken by a doorbell still looks this often (a lost ring costs at most this)
SPURIOUS_RING_PAUSE = 2e-3  # a ring that found nothing is heard again only this much later (<= 500 looks/s)


@dataclass(frozen=True)
class Incoming:
    """A valid command taken from the ring; ``(channel, epoch, seq)`` is its idempotency key;
    ``answer_limit``: the bytes of text its response slot holds."""

    channel: str
    epoch: int
    seq: int
    payload: bytes
    answer_limit: int = 0


@dataclass
class ReaderStats:
    commands: int = 0
    corrupt: int = 0
    resumed_answers: int = 0
    epochs: int = 0
    bad_header_polls: int = 0


@dataclass
class FaultLog:
    """Logs the first fault of a kind, then at most one line per ``interval`` seconds with
    the number left out: a guest writing garbage in a loop must not be able to fill the
    host's disk or slow it with log lines.  The kinds are a fixed set, so is the memory."""

    logger: logging.Logger
    interval: float = 10.0
    clock: Callable[[], float] = time.monotonic
    _seen: dict[str, tuple[float, int]] = field(default_factory=dict)

    def __call__(self, kind: str, level: int, message: str, *args) -> None:
        now = self.clock()
        logged_at, left_out = self._seen.get(kind, (None, 0))
        if logged_at is not None and now - logged_at < self.interval:
            self._seen[kind] = (logged_at, left_out + 1)
            return
        if left_out:
            message += f" ({left_out} more like this in the last {now - logged_at:.0f} s)"
        self.logger.log(level, message, *args)
        self._seen[kind] = (now, 0)


@dataclass
class ChannelReader:
    """Consumes one region.  ``poll()`` returns the next command (the same one until it is
    answered), ``answer()`` writes its response and moves the consume counter on.

    One thread owns a reader (polls, answers, reads its state); others look only at what
    the owner copies out, or at ``read_counters`` of the region's descriptor.  The region is
    read and written with pread/pwrite (``RegionIO``), never through a mapping, so a
    truncated file is a problem of this channel, not a SIGBUS for the process."""

    region: Region | RegionFile
    name: str = ""
    stats: ReaderStats = field(default_factory=ReaderStats)
    problem: str | None = None
    faults: FaultLog = field(default_factory=lambda: FaultLog(log))
    _io: RegionIO = field(init=False, repr=False)
    _geometry: ring.Geometry | None = None
    _epoch: int = 0
    _consume: int = 0
    _unusable_at: object = _UNSEEN
    _behind_at: object = None  # raw counters while publish is behind consume (nothing to do)

    def __post_init__(self) -> None:
        self.name = self.name or self.region.path
        self._io = RegionIO(self.region.fd, self.region.size)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def consume(self) -> int:
        return self._consume

    def idle_at(self) -> object:
        """The region counters (guest epoch, publish) at which ``poll()`` has nothing to do:
        a poller comparing ``read_counters`` with this needs nothing else of the reader."""
        if self._geometry is None:
            return self._unusable_at
        return self._behind_at or (self._epoch, self._consume)

    def pending(self) -> int:
        """Commands published but not answered, as of now (0 while the region is unusable
        or after a re-initialisation not polled yet).  Reads only: changes nothing."""
        counters = read_counters(self.region.fd)
        if self._geometry is None or counters is None or counters[0] != self._epoch:
            return 0
        return max(0, min(counters[1] - self._consume, self._geometry.slot_count))

    def superseded(self) -> bool:
        """Whether the guest re-initialised the region since the last poll (a new epoch):
        a command taken before belongs to an epoch that no longer exists."""
        counters = read_counters(self.region.fd)
        return counters is None or counters[0] != self._epoch

    def poll(self, max_damaged: int = ring.MAX_SLOT_COUNT) -> Incoming | None:
        """The next valid command, answering damaged slots on the way (at most
        ``max_damaged`` per call, so a guest publishing garbage cannot hold the caller)."""
        if self._idle():
            return None
        try:
            return self._take(max_damaged)
        except RegionShrunk as error:
            self._unusable(str(error), read_counters(self.region.fd))
            return None

    def _take(self, max_damaged: int) -> Incoming | None:
        for _ in range(max_damaged):
            header = self._attach()
            if header is None or header.publish == self._consume:
                return None
            geometry = header.geometry
            if self._answered_before(geometry):
                # Answered before a restart, counter not yet moved: count it, do not replay it.
                self.stats.resumed_answers += 1
                self._advance()
                continue
            slot = self._command(geometry)
            if isinstance(slot, str):
                # Publish comes after the slot is written, so a guest that follows the
                # protocol never shows a torn slot here; look once more, then answer it.
                slot = self._command(geometry)
            if not isinstance(slot, str):
                return Incoming(self.name, self._epoch, slot.seq, slot.payload, geometry.max_response_length)
            self.stats.corrupt += 1
            self.faults("corrupt", logging.WARNING, "channel %s: command %d rejected: %s", self.name,
                        self._consume, slot)
            self.answer_with(self._consume, ring.Status.CORRUPT,
                             [answer("CORRUPT", "corrupt", f"command slot rejected: {slot}")])
        return None

    def _answered_before(self, geometry: ring.Geometry) -> bool:
        self._io.load(geometry.response_offset(self._consume), geometry.response_slot_size)
        return ring.decode_response(self._io.buf, geometry, self._consume, self._epoch) is not None

    def _command(self, geometry: ring.Geometry) -> ring.CommandSlot | str:
        self._io.load(geometry.command_offset(self._consume), geometry.command_slot_size)
        return ring.decode_command(self._io.buf, geometry, self._consume, self._epoch)

    def _idle(self) -> bool:
        """The cheap check an idle poll needs: nothing changed since the last look (same
        epoch, nothing newly published; or the same unusable header).  One small pread:
        keeps a reader of an idle region at about a microsecond per poll."""
        return read_counters(self.region.fd) == self.idle_at()

    @property
    def answer_limit(self) -> int:
        """Bytes of text the current ring's response slots hold (0 before a ring is seen)."""
        return 0 if self._geometry is None else self._geometry.max_response_length

    def answer_with(self, seq: int, status: int, answers: list) -> bool:
        """``answer`` with the answer list (guest/answers.py) fitted to the slot; a list
        whose bare records cannot fit (a handler that did not check ``fits``) becomes its
        first record alone, cut to the slot and flagged if it must be."""
        try:
            text = render(answers, self.answer_limit)
        except ValueError:
            first = answers[0] if answers else answer("INTERNAL", "internal")
            text = f"{first.status} {first.code}"
        return self.answer(seq, status, text)

    def answer(self, seq: int, status: int, text: str) -> bool:
        """Write the answer to ``seq`` (the command ``poll()`` returned) and count it.
        Returns False, writing nothing, if the guest re-initialised the region meanwhile
        (the command belonged to an epoch that no longer exists) or truncated it."""
        if seq != self._consume or self._geometry is None:
            raise ValueError(f"answer for {seq} out of order; the next command is {self._consume}")
        if self.superseded():
            self.faults("dropped", logging.INFO, "channel %s: answer to %d dropped, the guest "
                        "re-initialised the region", self.name, seq)
            return False
        geometry = self._geometry
        ring.encode_response(self._io.buf, geometry, seq, self._epoch, int(status), text)
        self._io.store(geometry.response_offset(seq), geometry.response_slot_size)
        self.stats.commands += 1
        self._advance()
        return True

    def _advance(self) -> None:
        self._consume += 1
        self._write_u64(ring.OFFSET_CONSUME, self._consume)

    def _write_u64(self, offset: int, value: int) -> None:
        ring.write_u64(self._io.buf, offset, value)
        self._io.store(offset, 8)

    def _attach(self) -> ring.Header | None:
        """Validate the header; adopt a new epoch (or the region's first one) when it changes."""
        self._io.load(0, ring.HEADER_SIZE)
        header = ring.read_header(self._io.buf)
        problem = None if header.blank else header.problem(self.region.size)
        if header.blank or problem:
            self._unusable(problem or "region not initialised by the guest yet",
                           (header.guest_epoch, header.publish), logging.WARNING if problem else logging.INFO)
            return None
        self.problem = None
        if header.guest_epoch != self._epoch or header.geometry != self._geometry:
            self._adopt(header)
        if header.publish < self._consume:
            # Only a re-initialisation (new epoch) may move publish back: nothing to do, and
            # the poller must see these raw counters as idle (or it wakes us in a loop).
            self._behind_at = (header.guest_epoch, header.publish)
            return dataclasses.replace(header, publish=self._consume)
        self._behind_at = None
        if header.publish - self._consume > header.geometry.slot_count:
            # A counter the protocol cannot produce: take the slots one by one; their
            # sequence numbers and CRCs decide what is real.
            return dataclasses.replace(header, publish=self._consume + 1)
        return header

    def _unusable(self, problem: str, counters: tuple[int, int] | None, level: int = logging.WARNING) -> None:
        """Stop using the region until its counters change; say why once per reason."""
        if problem != self.problem:
            self.faults("unusable", level, "channel %s unusable: %s", self.name, problem)
        self.problem = problem
        self._unusable_at = counters
        self.stats.bad_header_polls += 1
        self._geometry = None

    def _adopt(self, header: ring.Header) -> None:
        self.stats.epochs += 1
        self._geometry = header.geometry
        self._epoch = header.guest_epoch
        if header.host_epoch == header.guest_epoch:
            self._consume = header.consume
            self.faults("epoch", logging.INFO, "channel %s: resuming epoch %#x at command %d", self.name,
                        self._epoch, self._consume)
        else:
            self._consume = 0
            self._write_u64(ring.OFFSET_CONSUME, 0)
            ring.write_u32(self._io.buf, ring.OFFSET_HOST_EPOCH, self._epoch)
            self._io.store(ring.OFFSET_HOST_EPOCH, 4)
            self.faults("epoch", logging.INFO, "channel %s: new guest epoch %#x", self.name, self._epoch)


# (status, the answer list), or (status, a text written as it is: a ring-level test's own).
Handler = Callable[[Incoming], tuple[int, "list[Answer] | str"]]


def _sleep_on(bell, seconds: float) -> None:
    """Until the bell rings or ``seconds`` pass; poll(), not select(), which refuses a
    descriptor above 1023."""
    waiting = select.poll()
    waiting.register(bell.fileno(), select.POLLIN)
    waiting.poll(seconds * 1000)


def serve(reader: ChannelReader, handler: Handler, stop: threading.Event,
          backoff: Backoff | None = None, bell=None, sweep: float = BELL_SWEEP) -> None:
    """Answer commands with ``handler`` until ``stop`` is set; a failing handler answers
    ``INTERNAL`` and the loop goes on, so one bad command never stops a channel.
    Without a ``bell`` the region is polled with ``backoff``; with one (an object with
    ``fileno()`` and ``clear()``, agents/bell.py) the loop, once the backoff's yield-only
    polls after a command are over, sleeps until the guest rings, or ``sweep`` seconds at
    most: a guest whose ring was lost is still served."""
    backoff = backoff or Backoff()
    while not stop.is_set():
        incoming = reader.poll()
        if incoming is None and bell is not None and backoff.next_pause() > 0:  # past the yield-only polls
            rung = bell.clear()  # then look again: a command published before this is found now, one after it rings
            incoming = reader.poll()
            if incoming is None:
                if rung:  # rung for nothing: a guest ringing on and on is heard at most every pause
                    stop.wait(SPURIOUS_RING_PAUSE)
                _sleep_on(bell, sweep)
                continue
        if incoming is None:
            if bell is None:
                backoff.wait()
            else:
                os.sched_yield()  # a pipelining writer's next command is on its way: no sleep yet
            continue
        backoff.reset()
        try:
            status, answers = handler(incoming)
        except Exception as error:  # the handler's bug must not take the channel down
            log.exception("channel %s: handler failed on command %d", reader.name, incoming.seq)
            status, answers = ring.Status.INTERNAL, [answer("INTERNAL", "internal", f"internal error: {error}")]
        if isinstance(answers, str):
            reader.answer(incoming.seq, status, answers)
        else:
            reader.answer_with(incoming.seq, status, answers)
