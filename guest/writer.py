"""Guest side of the channel: put commands in the ring and wait for the host's answers.

Several processes in one guest may write at once (``mbctl`` invocations, a vendor's
daemon): claiming a slot and publishing it happens under ``flock`` on the region's
descriptor, plus a thread lock for threads sharing one writer.  Waiting for an answer
happens outside the lock, so writers pipeline.

A slot is reused only when the host has answered its previous command *and* that
command's writer has read the answer, gave up, died, or let the time pass by which it
promised to read it (``collect_by``): a writer that stops reading (stopped, hung, buggy)
costs its own answers, not every other writer's slots.  Every wait, for the lock too,
ends at the caller's deadline, and nothing is published after it.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import threading
import time
from contextlib import contextmanager
from typing import NamedTuple

from . import ring
from .backoff import Backoff
from .channel_errors import (AnswerLost, BadRegion, ChannelBusy, ChannelReset, CommandTooLong, RegionTooSmall,
                             ResponseTimeout, RingFull)
from .region import Region


# Answers collected early on behalf of a waiter of this process (see _stash_own_answers),
# keyed by (region, epoch, seq).  Bounded: when it is full no more are collected, and this
# process's slots then free themselves when its promises pass (tickets nobody waits for
# would otherwise keep their answers here for ever).
_STASH: dict[tuple[str, int, int], ring.Response] = {}
# Guards the store, and makes each of this process's slot changes (publishing a command,
# marking one) one step for every writer of the process: a waiter's check-then-mark cannot
# straddle another thread's reuse of the slot.  Other processes cannot reuse a slot within
# its writer's promise, so no lock across processes is needed for that.
_STASH_LOCK = threading.Lock()
MAX_STASH = 1024

# How long after submitting a writer that did not say otherwise keeps the right to its
# answer (``submit(collect_within=...)``; ``request()`` promises its own deadline).
DEFAULT_COLLECT_WITHIN = 60.0
MARK_WAIT = 0.05  # how long marking an answer read tries for the writers' lock
MARK_MARGIN_MS = 1000  # a promise this far ahead: nobody may reuse the slot before the mark lands


class Ticket(NamedTuple):
    """A published command: what the writer needs to find its answer, and the time by
    which it promised to read it (``ring.clock_ms`` units; NO_PROMISE: none)."""

    seq: int
    epoch: int
    collect_by: int = ring.NO_PROMISE


def _alive(pid: int) -> bool:
    """Whether a process has this pid; 0 and numbers no pid can be (the slot's word is the
    guest's to write) are nobody."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


class ChannelWriter:
    """Writes commands into a region and collects the host's answers."""

    def __init__(self, region: Region):
        self.region = region
        self._threads = threading.Lock()
        self._pid = os.getpid()

    @contextmanager
    def _locked(self, deadline: float | None = None):
        """The writers' lock (this process's threads, then every process's flock); with a
        ``deadline`` (monotonic seconds), ChannelBusy once it passes without the lock."""
        if not self._threads.acquire(timeout=-1 if deadline is None else max(0.0, deadline - time.monotonic())):
            raise ChannelBusy(self._busy())
        try:
            self._flock(deadline)
            try:
                yield
            finally:
                fcntl.flock(self.region.fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def _flock(self, deadline: float | None) -> None:
        if deadline is None:
            fcntl.flock(self.region.fd, fcntl.LOCK_EX)
            return
        backoff = Backoff(ceiling=1e-3)
        while True:
            try:
                fcntl.flock(self.region.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ChannelBusy(self._busy()) from None
                backoff.wait(deadline)

    def _busy(self) -> str:
        return (f"{self.region.path}: another writer held the channel's lock until the deadline "
                "(a writer stuck while publishing?); nothing was sent")

    def _header(self, *, initialise_blank: bool) -> ring.Header:
        header = ring.read_header(self.region.buf)
        if header.blank and initialise_blank:
            self._initialise()
            header = ring.read_header(self.region.buf)
        problem = header.problem(self.region.size)
        if problem:
            raise BadRegion(f"{self.region.path}: {problem}")
        return header

    def _initialise(self) -> None:
        try:
            geometry = ring.geometry_for(self.region.size)
        except ring.LayoutError as error:
            raise RegionTooSmall(f"{self.region.path}: {error}") from None
        ring.initialise(self.region.buf, self.region.size, geometry, self._next_epoch())

    def _next_epoch(self) -> int:
        """Random, so a re-initialised guest never reuses an (epoch, seq) key the host saw,
        and never the current one, so the host always notices the change."""
        current = ring.read_header(self.region.buf).guest_epoch
        while (epoch := secrets.randbelow(2**32 - 1) + 1) == current:
            pass
        return epoch

    def initialise(self, geometry: ring.Geometry | None = None, timeout: float = 5.0) -> int:
        """Format the region afresh (a new epoch): pending commands and answers are dropped.
        Returns the new epoch; ChannelBusy if the lock is not had within ``timeout``."""
        with self._locked(time.monotonic() + timeout):
            if geometry is None:
                self._initialise()
            else:
                try:
                    ring.initialise(self.region.buf, self.region.size, geometry, self._next_epoch())
                except ring.LayoutError as error:
                    raise BadRegion(f"{self.region.path}: {error}") from None
            return ring.read_header(self.region.buf).guest_epoch

    def header(self, timeout: float = 5.0) -> ring.Header:
        """The current header, validated (a blank region is initialised first)."""
        with self._locked(time.monotonic() + timeout):
            return self._header(initialise_blank=True)

    def submit(self, payload: bytes, timeout: float = 5.0, collect_within: float = DEFAULT_COLLECT_WITHIN,
               collect: bool = True) -> Ticket:
        """Publish one command; waits up to ``timeout`` for the lock and a free slot, else
        ChannelBusy or RingFull, and nothing is published after the deadline.  The writer
        promises to read the answer within ``collect_within`` seconds (later, another
        writer may reuse the answered slot); ``collect=False``: nobody will read it."""
        deadline = time.monotonic() + timeout
        backoff = Backoff(ceiling=1e-3)
        first = True
        while True:
            with self._locked(deadline):
                late = not first and time.monotonic() > deadline  # the lock came free only after it
                first = False
                header = self._header(initialise_blank=True)
                geometry = header.geometry
                if len(payload) > geometry.max_command_length:
                    raise CommandTooLong(f"command of {len(payload)} bytes does not fit this ring's "
                                         f"{geometry.max_command_length}-byte slots; send it in parts")
                seq = header.publish
                if self._slot_reusable(header, seq):
                    if late:
                        raise ChannelBusy(self._busy())
                    if collect:
                        pid, collect_by = self._pid, ring.clock_ms_after(collect_within * 1000)
                    else:
                        pid, collect_by = 0, ring.NO_PROMISE
                    with _STASH_LOCK:
                        ring.encode_command(self.region.buf, geometry, seq, header.guest_epoch, payload, pid,
                                            collect_by)
                    ring.write_u64(self.region.buf, ring.OFFSET_PUBLISH, seq + 1)
                    ticket = Ticket(seq, header.guest_epoch, collect_by)
                    break
                self._stash_own_answers(header)
                if time.monotonic() >= deadline:
                    raise RingFull(self._full(header, seq))
            backoff.wait(deadline)
        self.region.ring()  # outside the lock: with a doorbell device, a ring is a VM exit
        return ticket

    def _full(self, header: ring.Header, seq: int) -> str:
        """Why the slot for ``seq`` is still taken: the host is behind, or a writer has not
        read its answer (these need different fixes)."""
        geometry = header.geometry
        pending = seq - header.host_consume
        if pending >= geometry.slot_count:
            return (f"ring full: {pending} of {geometry.slot_count} commands are waiting for the host "
                    "(is the mbvisor agent running?); nothing was sent")
        owner = ring.read_command_owner(self.region.buf, geometry, seq)
        promise = ("no time given" if owner.collect_by == ring.NO_PROMISE
                   else f"promised within {(owner.collect_by - ring.clock_ms()) % (1 << 32) / 1000:.1f} s")
        return (f"ring full: the host answered command {owner.seq}, but its writer (process "
                f"{owner.writer_pid}, alive, {promise}) has not read the answer yet; nothing was sent")

    def _slot_reusable(self, header: ring.Header, seq: int) -> bool:
        geometry = header.geometry
        if seq - header.host_consume >= geometry.slot_count:
            return False
        if seq < geometry.slot_count:
            return True
        owner = ring.read_command_owner(self.region.buf, geometry, seq)
        if (owner.seq != seq - geometry.slot_count or owner.epoch != header.guest_epoch
                or owner.state != ring.SlotState.PUBLISHED):
            return True
        if owner.writer_pid != self._pid:
            return not _alive(owner.writer_pid) or owner.promise_expired(ring.clock_ms())
        if owner.promise_expired(ring.clock_ms()):
            return True
        self._stash_own_answers(header)
        return ring.read_command_owner(self.region.buf, geometry, seq).state != ring.SlotState.PUBLISHED

    def _stash_own_answers(self, header: ring.Header) -> None:
        """Pipelining writers can block each other: each one's next slot holds an answer the
        other has not read, and neither reads while it waits in ``submit``.  A writer that
        waits for a slot therefore collects every answer of its own process now, keeps it
        for ``wait()``, and frees those slots."""
        geometry = header.geometry
        for seq in range(max(0, header.host_consume - geometry.slot_count), header.host_consume):
            owner = ring.read_command_owner(self.region.buf, geometry, seq)
            if (owner.seq != seq or owner.epoch != header.guest_epoch or owner.writer_pid != self._pid
                    or owner.state != ring.SlotState.PUBLISHED):
                continue
            ticket = Ticket(seq, header.guest_epoch)
            response = ring.decode_response(self.region.buf, geometry, seq, header.guest_epoch)
            if response is not None:
                with _STASH_LOCK:
                    if len(_STASH) >= MAX_STASH:
                        return
                    _STASH[self._stash_key(ticket)] = response
                self._mark_locked(geometry, ticket, ring.SlotState.COLLECTED)

    def _stash_key(self, ticket: Ticket) -> tuple[str, int, int]:
        return (self.region.path, ticket.epoch, ticket.seq)

    def _stashed(self, ticket: Ticket) -> ring.Response | None:
        if not _STASH:  # (read without the lock: an empty store is the common case)
            return None
        with _STASH_LOCK:
            return _STASH.pop(self._stash_key(ticket), None)

    def wait(self, ticket: Ticket, timeout: float = 5.0) -> ring.Response:
        """The host's answer to ``ticket``; ResponseTimeout leaves the command pending."""
        deadline = time.monotonic() + timeout
        # A waiting writer polls at least every millisecond: the answer's latency is what the
        # middlebox is waiting for, and the cost ends with the wait.
        backoff = Backoff(ceiling=1e-3)
        buf = self.region.buf
        while True:
            stashed = self._stashed(ticket)  # another thread of this process waiting for a slot read it
            if stashed is not None:
                return stashed
            header = ring.read_header(buf)
            if header.guest_epoch != ticket.epoch or header.problem(self.region.size):
                raise ChannelReset(f"channel was re-initialised while command {ticket.seq} waited; "
                                   "its outcome is unknown")
            response = ring.decode_response(buf, header.geometry, ticket.seq, ticket.epoch)
            if response is not None:
                self._mark(header.geometry, ticket, ring.SlotState.COLLECTED)
                return response
            owner = ring.read_command_owner(buf, header.geometry, ticket.seq)
            if (owner.seq, owner.epoch) != (ticket.seq, ticket.epoch):
                stashed = self._stashed(ticket)  # another thread of this process read it and reused the slot
                if stashed is not None:
                    return stashed
                if ring.read_header(buf).guest_epoch != ticket.epoch:
                    raise ChannelReset(f"channel was re-initialised while command {ticket.seq} waited; "
                                       "its outcome is unknown")
                raise AnswerLost(f"the answer to command {ticket.seq} was not read by the time this writer "
                                 "promised, and another writer reused its slot; its outcome is unknown", ticket.seq)
            if time.monotonic() >= deadline:
                self._mark(header.geometry, ticket, ring.SlotState.ABANDONED)
                ahead = max(0, ticket.seq - header.host_consume)  # the counter is the host's to write
                raise ResponseTimeout(
                    f"no answer to command {ticket.seq} within {timeout:g} s; it stays pending "
                    f"in the ring ({ahead} command(s) ahead of it are unanswered)", ticket.seq)
            backoff.wait(deadline)

    def _mark(self, geometry: ring.Geometry, ticket: Ticket, state: ring.SlotState) -> None:
        """Record that nobody waits for this slot's answer any more, so it may be reused.
        Once a writer's promise has passed another may take its slot, and a store between
        reading the slot's owner and writing its state would mark that one's command; so:
        well within the promise (MARK_MARGIN_MS, checked again just before the store) no
        other process may take the slot and this process's threads publish under
        _STASH_LOCK, which the store holds (the common, fast case); closer to it, under the
        writers' lock, tried for MARK_WAIT only; after it, not at all (the slot is free for
        reuse anyway)."""
        if ticket.collect_by == ring.NO_PROMISE:
            return self._mark_under_writers_lock(geometry, ticket, state)
        if not ring.clock_ms_before(ring.clock_ms(), ticket.collect_by):
            return None
        with _STASH_LOCK:
            if self._well_within(ticket):
                return self._mark_locked(geometry, ticket, state)
        return self._mark_under_writers_lock(geometry, ticket, state)

    @staticmethod
    def _well_within(ticket: Ticket) -> bool:
        return ring.clock_ms_before((ring.clock_ms() + MARK_MARGIN_MS) % (1 << 32), ticket.collect_by)

    def _mark_under_writers_lock(self, geometry: ring.Geometry, ticket: Ticket, state: ring.SlotState) -> None:
        try:
            with self._locked(time.monotonic() + MARK_WAIT):
                if ticket.collect_by == ring.NO_PROMISE or ring.clock_ms_before(ring.clock_ms(), ticket.collect_by):
                    self._mark_locked(geometry, ticket, state)
        except ChannelBusy:
            pass  # the slot stays PUBLISHED until the promise passes: slower reuse, nothing lost

    def _mark_locked(self, geometry: ring.Geometry, ticket: Ticket, state: ring.SlotState) -> None:
        """``_mark`` for a caller that holds the writers' lock."""
        owner = ring.read_command_owner(self.region.buf, geometry, ticket.seq)
        if (owner.seq, owner.epoch) == (ticket.seq, ticket.epoch):
            ring.write_u32(self.region.buf, geometry.command_offset(ticket.seq) + ring.OFFSET_SLOT_STATE,
                           state)

    def abandon(self, ticket: Ticket) -> None:
        """Nobody will read ``ticket``'s answer (its waiter gave up on an earlier one): its
        slot may be reused once answered, without waiting for the promise to pass (and an
        answer another thread of this process already read for it is dropped)."""
        self._stashed(ticket)
        header = ring.read_header(self.region.buf)
        if header.guest_epoch == ticket.epoch and not header.problem(self.region.size):
            self._mark(header.geometry, ticket, ring.SlotState.ABANDONED)

    def request(self, payload: bytes, timeout: float = 5.0) -> ring.Response:
        """Submit and wait, sharing one deadline (also the promise to read the answer)."""
        deadline = time.monotonic() + timeout
        ticket = self.submit(payload, timeout, collect_within=timeout)
        return self.wait(ticket, max(0.0, deadline - time.monotonic()))

