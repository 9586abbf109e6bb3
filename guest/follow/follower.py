"""The follower: keeps one middlebox's offloaded filters equal to the lists it follows.

At start each source's watch is started before its snapshot is taken (no change falls
between them) and its verdict is asked for: a list that may not be offloaded stops the
follower before anything is sent.  The host's filters are then read page by page
(``I <mac> <skip>``) and the difference is sent.  Afterwards the follower sleeps on the
watches' descriptors and on the next due time (a polled source, an element's timeout, the
periodic re-sync, a retry) and sends what changed; changes a few milliseconds apart go in
one frame.

Nothing is queued: what is sent is always the difference between the lists and what the
follower believes the host holds, so nothing is lost while the channel is busy or the host
refuses, and nothing is sent twice.  The belief is checked against the host's own list at
every re-sync (every minute by default; a list so large that reading it back costs more is
re-read less often, so that re-syncing costs at most 0.05 % of a core: every ~3 minutes for
10,000 filters) and after any answer that could not be read, which repairs an operator's
cancel, a restarted host or a lost answer.  A change that arrives while a periodic re-sync
reads the host's pages is sent at once and the read starts again (for up to 30 s).  Several sources are
followed as their union.  Standard library only.
"""

from __future__ import annotations

import fcntl
import heapq
import math
import os
import select
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import IO, Callable, Iterable

from .. import answers
from .. import fields as kinds
from ..backoff import Backoff
from ..channel_errors import ChannelBusy, ChannelError, CommandTooLong, RingFull
from ..commands import Layer, Query
from ..errors import CommandError
from ..grammar import format_frame
from ..ring import Response
from ..writer import ChannelWriter, Ticket
from . import sync
from .source import SOURCE, Change, NotOffloadable, Resync, Source, SourceError, Verdict, Watch

DEFAULT_RESYNC_EVERY = 60.0
DEFAULT_LOCK_DIR = "/run/mbctl"
COALESCE = 0.005          # a change this soon after the previous one joins its frame
COALESCE_AT_MOST = 0.05   # ... but a steady stream is still sent this often
PAGED_READ_ATTEMPTS = 3   # a list that changes under every read is taken as last read; the next re-sync repairs
IN_FLIGHT = 4             # frames published before the first is answered (at most half the ring)
FAILURES_SHOWN = 10       # elements of one kind of failure named one by one per batch; the others counted
REMOVE_WITHIN = 30.0      # remove_on_exit tries this long (the rate limit may ask it to wait)
DEFER_RESYNC_AT_MOST = 30.0  # a periodic re-sync gives way to waiting changes for this long, then runs


class FollowError(Exception):
    """The follower cannot do its job; the message says why."""


class LockError(FollowError):
    """The one-follower-per-middlebox lock could not be taken."""


class AlreadyFollowed(LockError):
    """Another follower holds this middlebox's lock."""


class HostRefused(FollowError):
    """The host would not list the middlebox's filters (not registered, ...), or not in a
    form the follower can read."""


class _Deferred(Exception):
    """A periodic re-sync gave way to changes waiting in a watch: send them, read later."""


class _Retry(Exception):
    """The host declined for a passing reason (rate limit, controller away): send again later."""

    def __init__(self, rate_limited: bool):
        super().__init__("rate limited" if rate_limited else "host unavailable")
        self.rate_limited = rate_limited


def _gravity(error: BaseException | None) -> int:
    """Which of a batch's failures ``_flush`` must hear of: a declined frame (send again
    later) < a frame not sent (the ring full, the lock busy) < anything else (the channel
    failed after sending: what the host did must be read from it)."""
    if error is None:
        return 0
    return 1 if isinstance(error, _Retry) else 2 if isinstance(error, (RingFull, ChannelBusy)) else 3


def hold_lock(mac: str, directory: str) -> IO[str]:
    """One follower per middlebox: an exclusive flock on ``<directory>/follow-<mac>.lock``
    that holds the owner's pid.  The kernel drops it when the process ends, however it ends,
    so a crashed follower never blocks the next one.  Named by the MAC's canonical text, so
    ``52:54:00:AB:CD:EF`` and ``52-54-00-ab-cd-ef`` are one middlebox."""
    mac = kinds.MAC_ADDRESS.parse(mac)
    path = os.path.join(directory, f"follow-{mac.replace(':', '-')}.lock")
    try:
        os.makedirs(directory, exist_ok=True)
        handle = open(path, "a+", encoding="ascii")
    except OSError as error:
        raise LockError(f"cannot take the follower's lock {path}: {error.strerror} (see --lock-dir)") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise AlreadyFollowed(f"{mac} is already followed by process {holder} (lock {path}); one follower per "
                              "middlebox: stop that one first") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


@dataclass
class Stats:
    """What the follower sent, for its status lines (and tests)."""

    frames: int = 0
    adds: int = 0
    deletes: int = 0
    host_reads: int = 0


@dataclass
class _Followed:
    """One source and what the follower knows of it.  ``fields`` is empty while the list
    may not be offloaded; ``watch`` is None while the source is broken (restarted at
    ``retry_at``)."""

    source: Source
    watch: Watch | None = None
    fields: frozenset[str] = frozenset()
    elements: dict[str, float | None] = field(default_factory=dict)
    next_poll: float = math.inf
    retry_at: float = math.inf
    retries: Backoff = field(default_factory=lambda: Backoff(floor=1.0, ceiling=30.0, spins=0))


def _to_stderr(line: str) -> None:
    print(f"mbctl follow: {line}", file=sys.stderr, flush=True)


def _field_names(fields: Iterable[str]) -> str:
    return "/".join(sorted("source" if field == SOURCE else "destination" for field in fields)) or "withdrawn"


def _about(source: Source, error: Exception) -> str:
    """The error's message naming its source once (some adapters' messages name it already)."""
    message = str(error)
    return message if message.startswith(source.description) else f"{source.description}: {message}"


def _element(entry: sync.Entry) -> str:
    field, network = entry
    return f"{network} ({_field_names([field])})"


class Stopper:
    """A self-pipe: ``stop()``, from a signal handler or another thread, makes ``fileno()``
    readable, so a follower asleep in ``select`` wakes at once."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)

    def fileno(self) -> int:
        return self._read

    def stop(self) -> None:
        try:
            os.write(self._write, b".")
        except OSError:  # already asked (the pipe is full) or closed
            pass

    def close(self) -> None:
        descriptors = (self._read, self._write)
        self._read = self._write = -1  # first: a late stop() must not write to a reused number
        for descriptor in descriptors:
            if descriptor >= 0:
                os.close(descriptor)


class Follower:
    """Follows ``sources`` for the middlebox ``mac`` through ``writer``'s channel.

    ``run()`` starts and then follows until ``stop()`` (safe from a signal handler or
    another thread); ``run(once=True)`` returns after the first complete sync.  ``close()``
    stops the watches and releases the lock; the filters stay on the host unless
    ``remove_on_exit``.  Use as a context manager to close in any case."""

    def __init__(self, writer: ChannelWriter, mac: str, sources: list[Source], *,
                 resync_every: float = DEFAULT_RESYNC_EVERY, timeout: float = 5.0, verbose: bool = False,
                 remove_on_exit: bool = False, lock_dir: str = DEFAULT_LOCK_DIR,
                 report: Callable[[str], None] = _to_stderr, resync_cpu_share: float = sync.RESYNC_CPU_SHARE):
        self.writer, self.mac = writer, kinds.MAC_ADDRESS.parse(mac)  # as the host answers it, and locks it
        self.followed = [_Followed(source) for source in sources]
        self.resync_every, self.timeout, self.verbose = resync_every, timeout, verbose
        self.resync_cpu_share = resync_cpu_share  # re-syncs of a large list are spaced to cost at most this
        self.remove_on_exit, self.lock_dir, self.report = remove_on_exit, lock_dir, report
        self.stats = Stats()
        self.on_host: set[sync.Entry] = set()      # what the follower believes the host holds of its shape
        self.dirty: set[sync.Entry] = set()        # entries to compare with the host at the next flush
        self.failed: dict[sync.Entry, str] = {}    # refused for a reason that stays: left until the next re-sync
        self._retry_failed = False                 # a re-sync: send the refused ones again too
        self._reported: dict[sync.Entry, str] = {}
        self._expiries: list[tuple[float, int, str]] = []  # (expires_at, source index, network)
        self._must_read_host = True
        self._resync_at = math.inf
        self._resync_due_since: float | None = None  # when the periodic re-sync fell due (_yield_to_changes)
        self._channel_ready_at = 0.0
        self._channel_retries = Backoff(floor=0.1, ceiling=5.0, spins=0)
        self._last_problem: str | None = None
        self._max_commands = self._frame_commands = 1
        self._max_bytes = 0
        self._in_flight = 1  # frames published at once (start() reads the ring)
        self._lock: IO[str] | None = None
        self._started = False  # start() finished: only then may remove_on_exit touch the host
        self._synced = False
        self._started_at = 0.0
        self._stopper = Stopper()

    # --- life cycle ----------------------------------------------------------------------

    def __enter__(self) -> "Follower":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Lock, watch, judge and read every source.  NotOffloadable, SourceError or
        AlreadyFollowed end it here, before anything is sent."""
        self._started_at = time.monotonic()
        self._lock = hold_lock(self.mac, self.lock_dir)
        try:
            geometry = self.writer.header(self.timeout).geometry
            self._max_commands, self._max_bytes = sync.frame_limits(geometry)
            self._in_flight = max(1, min(IN_FLIGHT, geometry.slot_count // 2))  # the other half for other writers
            self._frame_commands = self._max_commands
            for followed in self.followed:
                followed.watch = followed.source.watch()
                self._schedule_poll(followed, self._started_at)
            for index, followed in enumerate(self.followed):
                try:
                    self._set_verdict(index, followed.source.verdict())
                    self._replace(index, followed.source.snapshot())
                except (NotOffloadable, SourceError) as error:
                    raise type(error)(_about(followed.source, error)) from None
        except BaseException:
            self.close()
            raise
        for index in range(len(self.followed)):
            self._take_changes(index)  # what the watches saw while the snapshots were taken
        self._started = True

    def run(self, once: bool = False) -> int:
        """Follow until ``stop()``, or with ``once`` until the lists and the host first
        agree.  Returns how many elements are not offloaded (refused by the host)."""
        if not self._started:
            self.start()
        while True:
            self._flush(strict=once)
            if not self._synced and not self._pending():
                self._synced = True
                self._say_started()
            if once and self._synced:
                return self.not_offloaded()
            if not self._wait():
                return self.not_offloaded()
            self._do_what_is_due(time.monotonic())

    def stop(self) -> None:
        """End ``run`` at its next wake-up (at once: it wakes for this)."""
        self._stopper.stop()

    def close(self) -> None:
        """Stop every watch and release the lock; with ``remove_on_exit`` first delete the
        follower's filters from the host.  Idempotent."""
        for followed in self.followed:
            self._close_watch(followed)
        if self._lock is not None:
            if self.remove_on_exit and self._started:
                self._remove_everything()
            self._lock.close()
            self._lock = None
        self._stopper.close()

    def not_offloaded(self) -> int:
        """Elements the lists hold that the host refused (until the next re-sync tries again)."""
        return sum(1 for entry in self.failed if self._wants(entry))

    # --- the lists -------------------------------------------------------------------------

    def _wants(self, entry: sync.Entry) -> bool:
        field_, network = entry
        return any(field_ in followed.fields and network in followed.elements for followed in self.followed)

    def _desired(self) -> set[sync.Entry]:
        desired: set[sync.Entry] = set()
        for followed in self.followed:
            desired |= sync.entries(followed.fields, followed.elements)
        return desired

    def _touch(self, fields: frozenset[str], networks: Iterable[str]) -> None:
        """These entries may differ from the host now: compare them at the next flush (a
        change is a new chance for an entry the host refused before)."""
        for entry in sync.entries(fields, networks):
            self.dirty.add(entry)
            self.failed.pop(entry, None)

    def _set_verdict(self, index: int, verdict: Verdict) -> None:
        followed = self.followed[index]
        fields = frozenset(verdict.fields)
        if fields != followed.fields:
            self._touch(fields | followed.fields, followed.elements)
            followed.fields = fields

    def _canonical(self, index: int, network: str) -> str | None:
        try:
            return sync.canonical_network(network)
        except CommandError as error:
            self.report(f"{self.followed[index].source.description}: element {network!r} left out: {error.detail}")
            return None

    def _expire_at(self, index: int, network: str, expires_at: float | None) -> None:
        if expires_at is not None:
            heapq.heappush(self._expiries, (expires_at, index, network))

    def _replace(self, index: int, snapshot: dict[str, float | None]) -> None:
        """The source's whole list, as a snapshot read it (but for what expired meanwhile)."""
        followed = self.followed[index]
        now = time.monotonic()
        elements = {}
        for network, expires_at in snapshot.items():
            canonical = self._canonical(index, network)
            if canonical is not None and (expires_at is None or expires_at > now):
                elements[canonical] = expires_at
        for network, expires_at in elements.items():
            if network not in followed.elements or followed.elements[network] != expires_at:
                self._expire_at(index, network, expires_at)
        self._touch(followed.fields, followed.elements.keys() ^ elements.keys())
        followed.elements = elements

    def _apply(self, index: int, change: Change) -> None:
        followed = self.followed[index]
        network = self._canonical(index, change.network)
        if network is None:
            return
        if change.adding and (change.expires_at is None or change.expires_at > time.monotonic()):
            if network not in followed.elements:
                self._touch(followed.fields, (network,))
            followed.elements[network] = change.expires_at
            self._expire_at(index, network, change.expires_at)
        elif network in followed.elements:
            del followed.elements[network]
            self._touch(followed.fields, (network,))

    def _take_changes(self, index: int) -> bool:
        """Apply what the source's watch reported; True if that read the source afresh."""
        followed = self.followed[index]
        reloaded = False
        if followed.watch is None:
            return reloaded
        try:
            for item in followed.watch.changes():
                if isinstance(item, Resync):
                    if self.verbose:
                        self.report(f"{followed.source.description}: reading it again ({item.reason})")
                    self._reload(index)
                    reloaded = True
                    if followed.watch is None:  # broken meanwhile
                        break
                else:
                    self._apply(index, item)
        except SourceError as error:
            self._broken(index, error)
        return reloaded

    def _reload(self, index: int) -> None:
        """A new verdict and snapshot of one source.  A list that may no longer be
        offloaded is withdrawn from the host (and judged again at each re-sync)."""
        followed = self.followed[index]
        try:
            try:
                self._set_verdict(index, followed.source.verdict())
            except NotOffloadable as error:
                if followed.fields:
                    self.report(f"{_about(followed.source, error)}: may not be offloaded any more; its filters are "
                                "removed from the host")
                self._set_verdict(index, Verdict(frozenset()))
            self._replace(index, followed.source.snapshot())
        except SourceError as error:
            self._broken(index, error)

    def _broken(self, index: int, error: SourceError) -> None:
        """Stop the source's watch and start it again later; its last list is kept meanwhile."""
        followed = self.followed[index]
        self._close_watch(followed)
        pause = followed.retries.next_pause()
        followed.retry_at = time.monotonic() + pause
        followed.next_poll = math.inf
        self.report(f"{_about(followed.source, error)}; starting it again in {pause:g} s")

    def _restart(self, index: int) -> None:
        followed = self.followed[index]
        followed.retry_at = math.inf
        try:
            followed.watch = followed.source.watch()
        except SourceError as error:
            self._broken(index, error)
            return
        self._schedule_poll(followed, time.monotonic())
        self._reload(index)
        if followed.watch is not None:
            followed.retries.reset()
            self.report(f"{followed.source.description}: followed again")

    @staticmethod
    def _schedule_poll(followed: _Followed, now: float) -> None:
        interval = followed.watch.poll_interval if followed.watch is not None else None
        followed.next_poll = math.inf if interval is None else now + interval

    @staticmethod
    def _close_watch(followed: _Followed) -> None:
        if followed.watch is not None:
            try:
                followed.watch.close()
            except Exception:  # noqa: BLE001 - a watch that fails to close is gone all the same
                pass
            followed.watch = None

    # --- waking up -------------------------------------------------------------------------

    def _pending(self) -> bool:
        return self._must_read_host or bool(self.dirty)

    def _next_due(self) -> float:
        due = [self._channel_ready_at if self._pending() else math.inf]
        due += [followed.next_poll for followed in self.followed]
        due += [followed.retry_at for followed in self.followed]
        if self._expiries:
            due.append(self._expiries[0][0])
        if not self._must_read_host:
            due.append(self._resync_at)
        return min(due)

    def _watched(self) -> dict[int, int]:
        """The descriptors of the watches that have one, with their source's index."""
        return {followed.watch.fileno(): index for index, followed in enumerate(self.followed)
                if followed.watch is not None and followed.watch.fileno() is not None}

    def _wait(self) -> bool:
        """Sleep until a watch has changes or something is due; take the changes, and
        those that follow within COALESCE.  False once stopped."""
        watched = self._watched()
        timeout = max(0.0, self._next_due() - time.monotonic())
        ready, _, _ = select.select([self._stopper.fileno(), *watched], [], [], min(timeout, 3600.0))
        until = time.monotonic() + COALESCE_AT_MOST
        while ready and self._stopper.fileno() not in ready:
            for descriptor in ready:
                self._take_changes(watched[descriptor])
            if time.monotonic() >= until or len(self.dirty) >= self._frame_commands:
                break
            watched = self._watched()  # a source that broke closed its watch
            ready, _, _ = select.select([self._stopper.fileno(), *watched], [], [], COALESCE)
        return self._stopper.fileno() not in ready

    def _do_what_is_due(self, now: float) -> None:
        for index, followed in enumerate(self.followed):
            if followed.retry_at <= now:
                self._restart(index)
            elif followed.next_poll <= now and followed.watch is not None:
                if not self._take_changes(index) and followed.watch is not None:
                    self._reload(index)  # a polled source: judged and read at every poll
                self._schedule_poll(followed, now)
        while self._expiries and self._expiries[0][0] <= now:
            expires_at, index, network = heapq.heappop(self._expiries)
            followed = self.followed[index]
            if network in followed.elements and followed.elements[network] == expires_at:
                del followed.elements[network]
                self._touch(followed.fields, (network,))
        if not self._must_read_host and self._resync_at <= now:
            self._must_read_host = True
            self._resync_due_since = now
            for index, followed in enumerate(self.followed):
                if not followed.fields and followed.watch is not None:
                    self._reload(index)  # a list withdrawn before: may it be offloaded again?

    # --- the host ------------------------------------------------------------------------

    def _flush(self, strict: bool) -> None:
        """Make the host equal to the lists, as far as the channel lets us now.  ``strict``
        (or before the first sync): a host that will not list the filters ends the
        follower; otherwise it is reported and asked again at the next re-sync."""
        if not self._pending() or time.monotonic() < self._channel_ready_at:
            return
        try:
            if self._must_read_host:
                try:
                    self._read_host()
                except _Deferred:  # send the waiting changes against the belief, as between re-syncs; read next
                    watched = self._watched()
                    for descriptor in select.select(list(watched), [], [], 0)[0]:
                        self._take_changes(watched[descriptor])
            self._send_dirty()
        except _Retry as retry:
            if retry.rate_limited:
                self._frame_commands = max(1, self._frame_commands // 2)
            self._channel_ready_at = time.monotonic() + self._channel_retries.next_pause()
        except CommandTooLong:
            raise  # frames are cut to the slot: this is a bug, not weather
        except (RingFull, ChannelBusy) as error:  # nothing was sent
            self._channel_trouble(error, strict)
        except ChannelError as error:  # sent, but what the host did is unknown: ask it
            self._must_read_host = True
            self._channel_trouble(error, strict)
        except HostRefused as error:
            if strict or not self._synced:
                raise
            if str(error) != self._last_problem:
                self.report(f"{error}; asking again in {self.resync_every:g} s")
            self._last_problem = str(error)
            self._channel_ready_at = time.monotonic() + self.resync_every
        else:
            self._channel_retries.reset()
            self._last_problem = None

    def _channel_trouble(self, error: ChannelError, strict: bool) -> None:
        if strict:
            raise error
        pause = self._channel_retries.next_pause()
        self._channel_ready_at = time.monotonic() + pause
        if str(error) != self._last_problem:
            self.report(f"channel: {error}; trying again (every {self._channel_retries.ceiling:g} s at most)")
        self._last_problem = str(error)

    def _request(self, text: str, count: int) -> list[answers.Answer]:
        """Send one frame of ``count`` commands; one record per command."""
        return self._answer_records(self.writer.request(text.encode(), self.timeout), count)

    def _answer_records(self, response: Response, count: int) -> list[answers.Answer]:
        records = self._records(response)
        return records if len(records) == count else records[:1] * count  # one record spoke for the frame

    @staticmethod
    def _records(response: Response) -> list[answers.Answer]:
        try:
            return answers.parse(response.text)
        except answers.AnswerFormatError:  # a host that does not answer in records
            return [answers.answer(response.status_name, "-", response.text or "no answer text")]

    def _read_host(self) -> None:
        """What the host holds of the follower's shape, read page by page; every entry is
        compared again and refused ones are tried again (a re-sync).  The next periodic
        re-sync is spaced by what this one cost (``sync.next_resync_after``)."""
        believed = self.on_host
        cpu_before = time.process_time()
        self.on_host = self._paged_read()
        self.stats.host_reads += 1
        self._must_read_host = False
        self._resync_due_since = None
        # spaced by what this read cost, or by what reading the list the host will hold
        # once synced should cost (a first sync reads an empty host: cheap, but the next not)
        cost = max(time.process_time() - cpu_before, len(self._desired()) * sync.RESYNC_CPU_PER_FILTER)
        self._resync_at = time.monotonic() + sync.next_resync_after(self.resync_every, cost, self.resync_cpu_share)
        if self._synced and believed != self.on_host:
            self.report(f"re-sync: {len(believed ^ self.on_host)} filter(s) on the host were changed by someone "
                        "else (an operator, a restarted host, a lost answer); repairing")
        self._retry_failed = True
        self.dirty |= self._desired() | self.on_host

    def _paged_read(self) -> set[sync.Entry]:
        """The host's filters of the follower's shape, page by page.  Each page after the
        first starts one line early: that line must be the one the last page ended with,
        or the list changed between the pages (a filter deleted before the page and another
        added after it keeps the count but moves every line) and it is read again."""
        found: set[sync.Entry] = set()
        for _ in range(PAGED_READ_ATTEMPTS):
            found, seen, total, last = set(), 0, None, None
            while True:
                page = self._page(max(0, seen - 1))
                lines = page.lines
                if total is not None:
                    if page.total != total or not lines or lines[0] != last:
                        break  # the list changed between pages: read it again
                    lines = lines[1:]
                total = page.total
                found.update(entry for entry in (sync.owned_entry(line, self.mac) for line in lines) if entry)
                seen += len(lines)
                if seen >= total:
                    return found
                if not lines:
                    raise HostRefused("the host's answer slots are too small to hold two filter lines")
                last = lines[-1]
                self._yield_to_changes()
        return found

    def _yield_to_changes(self) -> None:
        """Between two pages of a periodic re-sync: if a watch has changes, give up this
        read (_Deferred) so they are sent now rather than after the whole list (about
        2 s for 10,000 filters); the read starts again afterwards.  Only for the periodic
        re-sync (one after a lost answer or a refusal is needed to know the host), and
        for DEFER_RESYNC_AT_MOST after it fell due, so a steady stream of changes cannot
        put it off for ever."""
        due_since = self._resync_due_since
        if due_since is None or time.monotonic() - due_since > DEFER_RESYNC_AT_MOST:
            return
        watched = self._watched()
        if watched and select.select(list(watched), [], [], 0)[0]:
            raise _Deferred()

    def _page(self, skip: int) -> sync.Page:
        record = self._request(format_frame([Query(self.mac, Layer.IP, skip)]), 1)[0]
        if record.ok:
            try:
                return sync.read_page(record)
            except ValueError as error:
                raise HostRefused(f"cannot read the host's list of filters: {error}") from None
        if sync.passing(record):
            raise _Retry(record.status == "RATE_LIMITED")
        raise HostRefused(f"the host would not list {self.mac}'s filters: {record.status} {record.code}: "
                          f"{record.message}")

    def _send_dirty(self) -> None:
        """Send the difference for every entry touched since the last flush, in frames,
        up to ``IN_FLIGHT`` of them published at once: the host takes the next frame as
        soon as it answered one, instead of waiting for this process to notice the answer
        and write the next (a 10,000-element first sync is 100 frames).  Answers are read
        in order.  A frame holding deletes is published only once every frame of adds
        before it was answered and applied (deletes go on in flight together): adds first, so a network replaced by a wider or narrower
        one is never uncovered, even when a frame of adds is declined.  After the first
        failure nothing more is published; the frames in flight are still read, unless the
        channel failed (an answer lost or late: what they did is then the host's to say,
        ``_flush`` reads its list).  Every frame whose outcome was not taken in full is
        sent again at the next flush (the plan skips what is done)."""
        scope = self.dirty if self._retry_failed else self.dirty - self.failed.keys()
        self.dirty = set()
        adds, deletes = sync.plan({entry for entry in scope if self._wants(entry)}, scope & self.on_host)
        batch = sync.frames(self.mac, adds, deletes, self._frame_commands, self._max_bytes)
        frame_commands = self._frame_commands
        refused: list[tuple[sync.Entry, answers.Answer]] = []
        in_flight: deque[tuple[int, Ticket, float]] = deque()  # (its number in batch, its ticket, when sent)
        taken: set[int] = set()  # frames whose every outcome was taken
        failure: BaseException | None = None
        try:
            for number, frame in enumerate(batch):
                deleting = not all(step.adding for step in frame.steps)
                while in_flight and failure is None and (len(in_flight) == self._in_flight or (
                        deleting and any(step.adding for n, _, _ in in_flight for step in batch[n].steps))):
                    failure = self._settle_first(batch, in_flight, taken, refused)
                if failure is not None:
                    break
                try:
                    ticket = self.writer.submit(frame.text.encode(), self.timeout,
                                                collect_within=self._in_flight * self.timeout)
                except ChannelError as error:  # this frame was not sent; those in flight were
                    failure = error
                    break
                in_flight.append((number, ticket, time.monotonic()))
            while in_flight:
                if failure is not None and not isinstance(failure, (_Retry, RingFull, ChannelBusy)):
                    self.writer.abandon(in_flight.popleft()[1])  # the channel failed: ask the host
                    continue
                error = self._settle_first(batch, in_flight, taken, refused)
                if _gravity(error) > _gravity(failure):
                    failure = error  # a failed channel outranks a declined frame: the host must be read
            if failure is not None:
                if isinstance(failure, _Retry):
                    self._frame_commands = min(self._frame_commands, frame_commands)  # not doubled meanwhile
                raise failure
        except BaseException:
            for ticket in (entry[1] for entry in in_flight):
                self.writer.abandon(ticket)
            raise
        finally:
            for number, frame in enumerate(batch):
                if number not in taken:
                    self.dirty.update(step.entry for step in frame.steps)
            self._report_refused(refused)
        self._retry_failed = False

    def _settle_first(self, batch: list[sync.Frame], in_flight: deque, taken: set[int],
                      refused: list) -> BaseException | None:
        """Read the oldest frame in flight and take its outcome; the error instead of
        raising it (but one that is no Exception, e.g. KeyboardInterrupt, is raised)."""
        number, ticket, submitted = in_flight.popleft()
        frame = batch[number]
        try:
            response = self.writer.wait(ticket, max(0.0, submitted + self._in_flight * self.timeout - time.monotonic()))
        except Exception as error:
            return error
        except BaseException:  # stopped while waiting: nobody will read it
            self.writer.abandon(ticket)
            raise
        try:
            self._take_outcome(frame, self._answer_records(response, len(frame.steps)), submitted, refused)
        except Exception as error:
            return error
        taken.add(number)
        return None

    def _take_outcome(self, frame: sync.Frame, records: list[answers.Answer], started: float, refused: list) -> None:
        adds = sum(step.adding for step in frame.steps)
        self.stats.frames += 1
        self.stats.adds += adds
        self.stats.deletes += len(frame.steps) - adds
        retry = rate_limited = False
        for step, record in zip(frame.steps, records):
            result = sync.outcome(step, record)
            if result == sync.DONE:
                (self.on_host.add if step.adding else self.on_host.discard)(step.entry)
                self.failed.pop(step.entry, None)
                self._reported.pop(step.entry, None)
            elif result == sync.RETRY:
                retry = True
                rate_limited = rate_limited or record.status == "RATE_LIMITED"
            else:
                self.failed[step.entry] = record.message
                refused.append((step.entry, record))
        if self.verbose:
            self.report(f"sent {adds} add(s), {len(frame.steps) - adds} delete(s): "
                        f"{'not all applied, sending again' if retry else 'answered'} "
                        f"in {(time.monotonic() - started) * 1000:.1f} ms")
        if retry:
            raise _Retry(rate_limited)
        self._frame_commands = min(self._max_commands, self._frame_commands * 2)

    def _report_refused(self, refused: list[tuple[sync.Entry, answers.Answer]]) -> None:
        """Each refused element once (again only if the host's reason changes); past
        FAILURES_SHOWN of one kind in one batch, a count."""
        shown: dict[tuple[str, str], int] = {}
        for entry, record in refused:
            reason = f"{record.status} {record.code}: {record.message}"
            if self._reported.get(entry) == reason:
                continue
            self._reported[entry] = reason
            kind = (record.status, record.code)
            shown[kind] = shown.get(kind, 0) + 1
            if shown[kind] <= FAILURES_SHOWN:
                self.report(f"not offloaded: {_element(entry)}: {reason}")
        for (status, code), count in shown.items():
            if count > FAILURES_SHOWN:
                self.report(f"not offloaded: {count - FAILURES_SHOWN} more element(s): {status} {code}")

    def _remove_everything(self) -> None:
        """``remove_on_exit``: delete every filter of the follower's shape the host holds,
        trying again while the host asks to wait (the rate limit), for REMOVE_WITHIN."""
        deadline = time.monotonic() + REMOVE_WITHIN
        pauses = Backoff(floor=0.1, ceiling=2.0, spins=0)
        found = None
        try:
            while True:
                try:
                    on_host = self._paged_read()
                    found = len(on_host) if found is None else found
                    self._delete_all(on_host)
                    break
                except _Retry:
                    pause = pauses.next_pause()
                    if time.monotonic() + pause > deadline:
                        raise FollowError(f"the host asked to wait for more than {REMOVE_WITHIN:g} s") from None
                    time.sleep(pause)
            self.report(f"removed the follower's {found} filter(s) from the host")
        except (ChannelError, FollowError) as error:
            self.report(f"could not remove the follower's filters from the host: {error}")

    def _delete_all(self, on_host: set[sync.Entry]) -> None:
        """_Retry if the host declined a delete for a passing reason (then read it again)."""
        for frame in sync.frames(self.mac, (), sorted(on_host), self._max_commands, self._max_bytes):
            for step, record in zip(frame.steps, self._request(frame.text, len(frame.steps))):
                result = sync.outcome(step, record)
                if result == sync.FAILED:
                    raise FollowError(f"{record.status} {record.code}: {record.message}")
                if result == sync.RETRY:
                    raise _Retry(record.status == "RATE_LIMITED")

    def _say_started(self) -> None:
        followed = ", ".join(f"{f.source.description} ({_field_names(f.fields)})" for f in self.followed)
        elements = len({network for f in self.followed for network in f.elements})
        self.report(f"following {followed} for {self.mac}: {elements} element(s); sent {self.stats.adds} add(s) and "
                    f"{self.stats.deletes} delete(s) in {self.stats.frames} frame(s); {self.not_offloaded()} not "
                    f"offloaded; {time.monotonic() - self._started_at:.2f} s")
