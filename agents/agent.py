"""The host agent: serves every middlebox VM's channel on this hypervisor.

One poller thread wakes the channel's worker when a command is published.  It sleeps in
epoll on the doorbells of channels whose guests ring (``ivshmem-doorbell``, agents/bell.py;
looked at anyway once every ``bell_sweep``), and looks at the two counters of every other
channel (a small pread each) with an adaptive back-off.  Each
channel has its own worker, so a channel waiting on the controller, flooding or sending
garbage never holds another one up.  A worker takes its channel's commands in order, one
frame at a time: vets it (grammar, the VM's own MAC, rate limit), forwards it with its
idempotency key, and writes the answer when the controller confirmed or refused it.
Frames of different channels bound for the same switch at the same time share one
request (``batching.Lane``); a retry goes alone.

Failure contract (docs/agent.md): a transient failure (controller unreachable, 503, switch
not connected) is retried for ``forward_deadline`` seconds, then the guest is answered
UNAVAILABLE (not applied as far as the agent knows; the idempotency key makes sending it
again safe); a permanent one (400, 401, 409, 500) is answered at once.  A forward is
abandoned when the guest re-initialises its region meanwhile.

Ownership: the worker is the only thread that touches its channel's ``ChannelReader``;
it publishes a snapshot (``Channel.snapshot``, ``Channel.idle_at``) after each step, which
the status writer and the poller read.  Regions are opened only as regular files in the
allowed directories, never through a symlink, and read with pread/pwrite, so a truncated
or hostile region is a problem of its channel alone.  Nothing a guest writes ends a
channel's service: it is answered, counted, and logged at a bounded rate.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mbvisor.guest import ring
from mbvisor.guest.answers import Answer, answer, fits
from mbvisor.guest.backoff import Backoff
from mbvisor.guest.channel_errors import BadRegion, ChannelError
from mbvisor.guest.ivshmem import DoorbellError
from mbvisor.guest.reader import SPURIOUS_RING_PAUSE, ChannelReader, FaultLog, Incoming
from mbvisor.guest.region import RegionFile, open_channel_file, read_counters

from .batching import Alone, Lane
from .bell import Bells, HostBell, open_bell
from .controller_client import ControllerClient, ControllerFailed, ControllerUnavailable
from .discovery import Refusal, Scan, VmChannel
from .inventory import Publication, Publisher
from .ratelimit import TokenBucket
from .vetting import combine, frame_wide, too_many, vet

log = logging.getLogger("mbvisor.agent")
FRAME_KEY_SPACE = 1024  # the k-th command of a frame: key seq = (seq mod KEY_SEQ_SPACE) * 1024 + k
KEY_SEQ_SPACE = 1 << 43  # so every key seq is below 2^53: exact as a JSON number anywhere
DAMAGED_PER_POLL = 16    # damaged slots answered CORRUPT per poll, then DAMAGED_PAUSE
DAMAGED_PAUSE = 0.05     # so a guest publishing garbage costs at most ~320 answers/s
FAULT_PAUSE = 0.1        # after an unexpected error in a worker, before it looks again
STATUS_REFRESH = 30.0   # an unchanged status file is rewritten this often (its time: the agent lives)


class _Stop(threading.Event):
    """The agent's stop event: setting it also wakes the poller from its epoll sleep."""

    def __init__(self, wake: Callable[[], None]):
        super().__init__()
        self._wake = wake

    def set(self) -> None:
        super().set()
        self._wake()


@dataclass(frozen=True)
class AgentSettings:
    rate: float = 200.0          # commands per second per channel, sustained
    burst: float = 400.0
    discovery_interval: float = 2.0  # between rounds when OVS reports no change (retries need them)
    idle_ceiling: float = 10e-3  # longest pause of the poller when every polled channel is idle
    bell_sweep: float = 1.0      # a channel with a doorbell is looked at this often without a ring
    doorbell_dirs: tuple[str, ...] = ("/run/mbvisor/ivshmem",)  # where ivshmem server sockets may be
    status_file: Path | None = None
    forward_deadline: float = 30.0   # how long a transient controller failure is retried
    channel_dirs: tuple[str, ...] = ("/dev/shm",)  # where channel regions may be
    removal_ceiling: float = 60.0    # longest pause between retries of a departed VM's removal
                                     # (and of a bridge's inventory)
    inventory_refresh: float = 60.0  # an accepted inventory is published again this often


@dataclass
class ChannelStats:
    forwarded: int = 0
    answered_locally: int = 0
    refused: int = 0
    rate_limited: int = 0
    retries: int = 0
    unavailable: int = 0   # answered UNAVAILABLE after forward_deadline
    failed: int = 0        # permanent controller failures, answered at once
    abandoned: int = 0     # forwards dropped because the guest re-initialised
    faults: int = 0        # unexpected errors in the worker (each logged at a bounded rate)
    last_seq: int | None = None
    last_status: str | None = None


# What a channel's status says before its worker published anything (or when it has none).
EMPTY_SNAPSHOT = {"epoch": None, "answered": 0, "pending": 0, "problem": None, "waiting_for_controller": False,
                  "corrupt": 0, **dataclasses.asdict(ChannelStats())}


@dataclass
class Channel:
    vm: VmChannel
    bucket: TokenBucket
    reader: ChannelReader | None = None  # None: not opened, ``problem`` says why
    problem: str | None = None
    identity: tuple[int, int] | None = None  # (device, inode) of the open region file
    fd: int = -1
    wake: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    stats: ChannelStats = field(default_factory=ChannelStats)
    faults: FaultLog = field(default_factory=lambda: FaultLog(log))
    waiting_for_controller: bool = False
    working: bool = False  # the worker drains the ring by itself; the poller need not wake it
    thread: threading.Thread | None = None
    lane: Lane | None = None  # its switch's way to the controller, shared with that switch's channels
    snapshot: dict = field(default_factory=dict)  # the worker's last published state
    idle_at: object = None                        # region counters at which nothing is to do
    bell: HostBell | None = None  # its guest's doorbell, changed by its worker only; None: polled
    offered_bell: HostBell | None = None  # connected by discovery, for the worker to take
    bell_problem: str | None = None  # why a channel annotated with a doorbell is polled


@dataclass
class Removal:
    """A departed VM's offloads still to be removed: retried until the controller answers."""

    vm: VmChannel
    mac: str
    backoff: Backoff
    attempts: int = 0
    due: float = 0.0
    worker: threading.Thread | None = None  # the departed channel's worker, until it ended


def open_channel_region(path: str, directories: tuple[str, ...]) -> RegionFile:
    """A channel's region, if ``path`` names a regular file directly in one of
    ``directories`` (no symlink, no '..', no other place the host could be made to write)."""
    directory, name = os.path.split(path)
    if _as_written(directory) not in {_as_written(d) for d in directories}:
        raise BadRegion(f"{path[:300]!r} is not in a channel directory ({', '.join(directories)}; "
                        "see --channel-dir)")
    return open_channel_file(directory, name)


def _as_written(directory: str) -> str:
    """A directory as given, without trailing slashes: compared as text, never resolved."""
    return directory.rstrip("/") or ("/" if directory else "")


class Agent:
    def __init__(self, discover: Callable[[], Scan | list[VmChannel]], client: ControllerClient,
                 settings: AgentSettings = AgentSettings(), changes: threading.Event | None = None,
                 discovery_status: Callable[[], dict] | None = None):
        """``discover`` gives a :class:`Scan`, or only the channels (then no inventory is
        published: nothing says which ports are whose).  ``changes``, if given, is set when
        what ``discover`` sees changed (agents/ovsdb_follow.py): a round runs at once, and
        otherwise every ``discovery_interval`` for what it retries."""
        self.discover = discover
        self.changes = changes
        self.discovery_status = discovery_status  # what agent-status says of the discovery source
        self.client = client
        self.settings = settings
        self.channels: dict[str, Channel] = {}
        self.removals: dict[tuple[int, str], Removal] = {}
        self.publishers: dict[int, Publisher] = {}
        self.lanes: dict[int, Lane] = {}  # per switch; only discovery adds or drops one
        self.refused: tuple[Refusal, ...] = ()
        self.faults = FaultLog(log)
        self.bells = Bells()
        self._answered = threading.Event()  # a polled channel's worker answered: its next frame is near
        self._offering = threading.Lock()  # guards every channel's offered_bell
        self.stop = _Stop(self.bells.interrupt)
        self._written: tuple[dict | None, float] = (None, 0.0)  # the status last written, and when

    # --- life cycle ---------------------------------------------------------------------

    def run(self) -> None:
        """Until ``stop`` is set: wake the workers of channels with work, found by their
        doorbells or by polling.  Discovery runs in its own thread, so scanning OVS never
        delays a command."""
        self.round()
        discovery = threading.Thread(target=self._discover, name="discovery", daemon=True)
        discovery.start()
        backoff = Backoff(ceiling=self.settings.idle_ceiling)
        next_sweep = time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic()
            sweep = now >= next_sweep
            if sweep:
                next_sweep = now + self.settings.bell_sweep
            answered = self._answered.is_set()
            self._answered.clear()
            if self.poll_once(sweep) or answered:
                backoff.reset()
            channels = list(self.channels.values())
            if any(c.bell is None and c.reader is not None for c in channels):
                pause = backoff.next_pause()
            elif any(c.bell is not None for c in channels):
                pause = next_sweep - time.monotonic()
            else:
                pause = None  # nothing to look at until discovery brings a channel (it interrupts)
            for channel in self.bells.wait(pause):
                channel.wake.set()
        if self.changes is not None:
            self.changes.set()  # the discovery thread may be waiting on it
        discovery.join(timeout=10)
        self.shutdown()
        self.bells.close()

    def poll_once(self, sweep: bool = True) -> bool:
        """Wake every idle worker whose region's counters moved (of channels with a
        doorbell only when ``sweep``); whether any was woken.  Reads only the region
        files' counters and the workers' snapshots."""
        busy = False
        for channel in list(self.channels.values()):
            if channel.working or channel.reader is None or channel.stop.is_set():
                continue
            if channel.bell is not None and not sweep:
                continue
            try:
                moved = read_counters(channel.fd) != channel.idle_at
            except OSError:
                continue  # closed by its worker meanwhile
            if moved:
                channel.wake.set()
                busy = True
        return busy

    def _discover(self) -> None:
        while True:
            if self.changes is None:
                self.stop.wait(self.settings.discovery_interval)
            elif self.changes.wait(self.settings.discovery_interval):
                self.changes.clear()
            if self.stop.is_set():
                return
            self.round()

    def round(self) -> None:
        """One discovery round.  Whatever fails in it is logged and the next round runs:
        discovery dying would leave VMs unserved and departed VMs' offloads in place."""
        for step in (self.refresh, self.retry_removals, self.write_status):
            try:
                step()
            except Exception as error:
                self.faults(step.__name__, logging.ERROR, "discovery round: %s failed: %r", step.__name__, error)

    def shutdown(self, grace: float = 5.0) -> None:
        """Stop every worker and give them ``grace`` seconds in all to end (a command they
        have not answered stays pending in its region for the next agent)."""
        closed = [self._close(name) for name in list(self.channels)]
        for publisher in self.publishers.values():
            publisher.close()
        deadline = time.monotonic() + grace
        for thread in [c.thread for c in closed] + [p.thread for p in self.publishers.values()]:
            if thread is not None:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        log.info("agent stopped")

    def refresh(self) -> None:
        """Follow VMs as they come and go; reopen regions replaced under their path, and try
        again those that could not be opened; hand each bridge's inventory to its publisher;
        keep a lane for each switch that has a channel."""
        scan = self.discover()
        scan = scan if isinstance(scan, Scan) else Scan(list(scan))
        before = {name: id(channel) for name, channel in self.channels.items()}
        try:
            self._follow_scan(scan)
        finally:  # also when the round failed half-way: a channel it opened must be looked at
            if {name: id(channel) for name, channel in self.channels.items()} != before:
                self.bells.interrupt()  # a channel opened or closed: the poller's pause depends on which it polls

    def _follow_scan(self, scan: Scan) -> None:
        self._note_refusals(scan.refused)
        if scan.inventories is not None:
            self._offer_inventories(scan)
        found = {vm.name: vm for vm in scan.channels}
        refused = {(r.bridge, r.interface) for r in scan.refused}
        problems = {}
        for name, channel in list(self.channels.items()):
            vm = found.get(name)
            if vm is None and (channel.vm.bridge, channel.vm.interface) in refused:
                # Still there, but its annotation is refused (another port claims its MAC, say):
                # no channel until it is fixed, and its offloads stay, withheld by the controller
                # while the annotations do not vouch for it (a port deleted retires them there).
                self._close(name)
            elif vm is not None and vm != channel.vm and dataclasses.replace(
                    vm, rate=channel.vm.rate, burst=channel.vm.burst) == channel.vm:
                channel.vm, channel.bucket = vm, self._bucket(vm)  # only its rate limit changed: it goes on
                log.info("channel %s: rate limit now %s", vm.name, self._limit_text(vm))
            elif vm != channel.vm:
                self._forget(self._close(name), vm)
            elif self._stale(channel):
                self._close(name)
                problems[name] = channel.problem
        for name, vm in found.items():
            if name not in self.channels:
                self.channels[name] = self._open(vm, problems.get(name))
        for channel in self.channels.values():
            if (channel.vm.doorbell and channel.bell is None and channel.offered_bell is None
                    and channel.reader is not None):
                self._attach_bell(channel)  # its server was not there yet, or went and came back
        served = {channel.vm.dpid for channel in self.channels.values()}
        self.lanes = {dpid: lane for dpid, lane in self.lanes.items() if dpid in served}

    @staticmethod
    def _stale(channel: Channel) -> bool:
        """Not opened yet, or its path now names another file (a VM restarted with a fresh
        region).  A path gone for good keeps the open file: the VM may still map it."""
        if channel.reader is None:
            return True
        try:
            info = os.stat(channel.vm.region, follow_symlinks=False)
        except OSError:
            return False
        if (info.st_dev, info.st_ino) == channel.identity:
            return False
        log.info("channel %s: %s was replaced; reopening it", channel.vm.name, channel.vm.region)
        return True

    def _open(self, vm: VmChannel, previous_problem: str | None = None) -> Channel:
        """A channel for ``vm``: served by a new worker, or with the reason it cannot be
        (logged once, not every round it stays so)."""
        channel = Channel(vm, self._bucket(vm))
        try:
            region = open_channel_region(vm.region, self.settings.channel_dirs)
        except Exception as error:  # any path or file a VM's record names costs that VM alone
            channel.problem = str(error) if isinstance(error, ChannelError) else f"cannot open: {error!r}"[:300]
            channel.snapshot = {"problem": channel.problem}
            if channel.problem != previous_problem:
                log.warning("channel %s: not served: %s", vm.name, channel.problem)
            return channel
        channel.reader = ChannelReader(region, vm.name)
        channel.lane = self.lanes.setdefault(vm.dpid, Lane(self.client.execute))
        channel.identity, channel.fd, channel.idle_at = region.identity(), region.fd, channel.reader.idle_at()
        if vm.doorbell:
            self._attach_bell(channel)
        channel.thread = threading.Thread(target=self._work, args=(channel,), name=f"channel {vm.name}", daemon=True)
        channel.thread.start()
        log.info("channel %s: serving %s for %s on %016x port %d%s", vm.name, vm.region, ",".join(vm.macs),
                 vm.dpid, vm.port, ", woken by its doorbell" if channel.bell else "")
        return channel

    def _attach_bell(self, channel: Channel) -> None:
        """Connect to the channel's ivshmem server for its doorbell; on failure the channel
        is polled, and the next discovery rounds try again (logged once per reason)."""
        try:
            bell = open_bell(channel.vm.doorbell, self.settings.doorbell_dirs)
        except DoorbellError as error:
            self._polled_because(channel, str(error))
            return
        if not bell.serves(os.fstat(channel.fd)):
            bell.close()
            self._polled_because(channel, f"the doorbell server at {channel.vm.doorbell} serves another region "
                                          f"than {channel.vm.region}")
            return
        with self._offering:
            if channel.offered_bell is None and not channel.stop.is_set():
                channel.offered_bell, bell = bell, None
        if bell is not None:  # one was offered already, or the channel is closing
            bell.close()
        channel.wake.set()  # its worker takes it, and looks once: rings before went unheard

    def _take_offered_bell(self, channel: Channel) -> None:
        """The worker's own: only it changes ``channel.bell``, so no other thread can lose
        a bell while it is being registered (a closed descriptor's number may be reused)."""
        with self._offering:
            bell, channel.offered_bell = channel.offered_bell, None
        if bell is None:
            return
        try:
            self.bells.add(bell, channel)
        except (OSError, ValueError) as error:
            bell.close()
            self._polled_because(channel, f"epoll refused the doorbell of {channel.vm.doorbell}: {error}")
            return
        channel.bell, channel.bell_problem = bell, None
        log.info("channel %s: doorbell %s connected", channel.vm.name, channel.vm.doorbell)

    @staticmethod
    def _polled_because(channel: Channel, problem: str) -> None:
        if problem != channel.bell_problem:
            log.warning("channel %s: polled, not woken by its doorbell: %s", channel.vm.name, problem)
        channel.bell_problem = problem

    def _lose_bell(self, channel: Channel, problem: str) -> None:
        """The worker's own: the bell is gone (its server ended); polled from now on.  The
        reason is recorded (and logged) first, so a status that says polled has it."""
        self._polled_because(channel, problem)
        self._close_bell(channel)
        self.bells.interrupt()

    def _close_bell(self, channel: Channel) -> None:
        bell, channel.bell = channel.bell, None
        if bell is not None:
            self.bells.remove(bell)
            bell.close()

    def _close_bells(self, channel: Channel) -> None:
        """At the worker's end: its bell, and one offered that it never took."""
        self._close_bell(channel)
        with self._offering:
            offered, channel.offered_bell = channel.offered_bell, None
        if offered is not None:
            offered.close()

    def _close(self, name: str) -> Channel:
        """Tell the channel's worker to stop, without waiting for it: a worker in the middle
        of a forward (up to a request time-out) must not hold discovery up.  The worker
        closes its region itself when it ends, so no descriptor is closed (and reused) under
        a request still in flight."""
        channel = self.channels.pop(name)
        channel.stop.set()
        channel.wake.set()
        log.info("channel %s: closing", name)
        return channel

    def _note_refusals(self, refused: tuple[Refusal, ...]) -> None:
        """Log each interface refused, once (not every round it stays so), and when it is
        served again."""
        for refusal in sorted(set(refused) - set(self.refused), key=lambda r: (r.bridge, r.interface)):
            log.error("interface %s on %s not trusted: %s", refusal.interface, refusal.bridge, refusal.reason)
        for name in sorted({r.interface for r in self.refused} - {r.interface for r in refused}):
            log.info("interface %s: its annotation is no longer refused", name)
        self.refused = refused

    # --- inventories ----------------------------------------------------------------------

    def _offer_inventories(self, scan: Scan) -> None:
        """Every served bridge's inventory to its publisher (started when the bridge is
        first seen); a bridge no longer served gets an empty one, then its publisher ends."""
        for dpid in [d for d, p in self.publishers.items() if p.finished]:
            del self.publishers[dpid]
        for dpid, entries in scan.inventories.items():
            if dpid not in self.publishers:
                publication = Publication(dpid, scan.bridges.get(dpid, ""), refresh=self.settings.inventory_refresh,
                                          backoff=Backoff(floor=self.settings.discovery_interval,
                                                          ceiling=self.settings.removal_ceiling, spins=0))
                self.publishers[dpid] = Publisher(publication, self.client)
            self.publishers[dpid].offer(entries, scan.incarnations.get(dpid, frozenset()))
            if self.publishers[dpid].thread is None:
                self.publishers[dpid].start()  # after the first offer: never publishes an empty guess
        for dpid, publisher in self.publishers.items():
            if dpid not in scan.inventories:
                publisher.retire()

    # --- departed VMs -------------------------------------------------------------------

    def _forget(self, closed: Channel, replacement: VmChannel | None) -> None:
        """A VM left its port (or changed identity): its offloads go, so a reused port or
        MAC never inherits its drop rules.  Kept as pending until the controller confirms,
        and sent only once the channel's worker has ended (a command it still forwards
        must not land after the removal)."""
        gone = closed.vm
        same_place = replacement is not None and (replacement.dpid, replacement.port) == (gone.dpid, gone.port)
        keep = set(replacement.macs) if same_place else set()
        for mac in gone.macs:
            if mac not in keep:
                self.removals[(gone.dpid, mac)] = Removal(
                    gone, mac, Backoff(floor=self.settings.discovery_interval,
                                       ceiling=self.settings.removal_ceiling, spins=0), worker=closed.thread)

    def retry_removals(self) -> None:
        """Ask the controller for every pending removal that is due; 200 or 404 ends it.
        One that fails waits longer each time (up to ``removal_ceiling``).  A VM back on
        the same port with the same MAC cancels it: it is the same VM, as in ``_forget``."""
        live = {(c.vm.dpid, mac, c.vm.port) for c in self.channels.values() for mac in c.vm.macs}
        now = time.monotonic()
        for key, removal in list(self.removals.items()):
            vm = removal.vm
            if (vm.dpid, removal.mac, vm.port) in live:
                del self.removals[key]
                log.info("VM %s is back on %016x port %d: its offloads of %s stay", vm.vm_id, vm.dpid, vm.port,
                         removal.mac)
            elif removal.due <= now and not (removal.worker is not None and removal.worker.is_alive()):
                self._remove(key, removal, now)

    def _remove(self, key: tuple[int, str], removal: Removal, now: float) -> None:
        vm = removal.vm
        removal.attempts += 1
        try:
            removed = self.client.delete_middlebox(vm.dpid, removal.mac)
        except (ControllerUnavailable, ControllerFailed) as error:
            if removal.attempts == 1:
                log.warning("VM %s gone, but its offloads of %s could not be removed yet: %s; retrying",
                            vm.vm_id, removal.mac, error)
            removal.due = now + removal.backoff.next_pause()
            return
        del self.removals[key]
        log.info("VM %s gone from %016x port %d: offloads of %s %s%s", vm.vm_id, vm.dpid, vm.port, removal.mac,
                 "removed" if removed else "(none)",
                 f" after {removal.attempts} attempts" if removal.attempts > 1 else "")

    # --- one channel: everything below runs in the channel's worker thread ---------------

    def _work(self, channel: Channel) -> None:
        """The worker: the only thread that touches ``channel.reader`` (and, once
        attached, the channel's bell: it clears and re-arms it, and closes it at the end)."""
        try:
            while not channel.stop.is_set():
                channel.wake.wait()  # set by the poller, or by _close to stop
                channel.wake.clear()
                channel.working = True
                answered = channel.reader.consume
                try:
                    self._take_offered_bell(channel)
                    self._hear_bell(channel)
                    if not self._drain(channel):
                        return  # stopping while a command waits: it stays pending in the ring
                except Exception as error:  # a hostile region or a bug: this channel goes on
                    self._fault(channel, "worker", error)
                    channel.stop.wait(FAULT_PAUSE)
                finally:
                    self._publish(channel)
                    channel.working = False
                if channel.bell is None:
                    if channel.reader.consume != answered:
                        self._hurry_poller()
                else:
                    if channel.reader.consume == answered:  # woken for nothing: a guest ringing on and
                        channel.stop.wait(SPURIOUS_RING_PAUSE)  # on, or a server that never stops talking
                    self.bells.rearm(channel.bell)
        finally:
            self._close_bells(channel)
            channel.reader.region.close()

    def _hurry_poller(self) -> None:
        """A polled guest that just had its answer usually sends its next frame within a
        millisecond (a loader, a follower's first sync), while the poller, idle since the
        frame was taken, may be asleep for up to ``idle_ceiling``: wake it now and have it
        start its backoff again, so that frame is found in microseconds, not milliseconds."""
        self._answered.set()
        self.bells.interrupt()

    def _hear_bell(self, channel: Channel) -> None:
        """Clear the bell before looking (a ring after this wakes the worker again) and
        read the server's notifications; a bell that cannot be read, or a server that
        has gone or is out of step, is lost (polled from now on)."""
        bell = channel.bell
        if bell is None:
            return
        try:
            bell.clear()
        except OSError as error:
            self._lose_bell(channel, f"the doorbell of {channel.vm.doorbell} cannot be read: {error}")
            return
        if not bell.drain():
            self._lose_bell(channel, f"its ivshmem server at {channel.vm.doorbell} closed the connection or sent "
                                     "a broken message")

    def _drain(self, channel: Channel) -> bool:
        """Answer the pending commands in order; False if stopped before an answer."""
        reader, stats = channel.reader, channel.stats
        while not channel.stop.is_set():
            corrupt = reader.stats.corrupt
            incoming = reader.poll(DAMAGED_PER_POLL)
            if reader.stats.corrupt != corrupt:
                channel.stop.wait(DAMAGED_PAUSE)  # bounds the work a garbage-writing guest causes
            if incoming is None:
                return True
            answer = self._answer_for(channel, incoming)
            if answer is None or channel.stop.is_set():
                return False
            if reader.answer_with(incoming.seq, *answer):
                stats.last_seq, stats.last_status = incoming.seq, ring.Status(answer[0]).name
            self._publish(channel)
        return True

    def _answer_for(self, channel: Channel, incoming: Incoming) -> tuple[int, list[Answer]] | None:
        """(status, one answer per command of the frame), or None if stopped meanwhile."""
        try:
            return self._handle(channel, incoming)
        except Exception as error:  # a bug costs this command, not the channel
            self._fault(channel, "handler", error)
            return ring.Status.INTERNAL, [answer("INTERNAL", "internal",
                                                 f"internal error in the agent: {error!r}; not applied")]

    def _fault(self, channel: Channel, kind: str, error: Exception) -> None:
        channel.stats.faults += 1
        channel.faults(kind, logging.ERROR, "channel %s: %s error: %r", channel.vm.name, kind, error)

    def _handle(self, channel: Channel, incoming: Incoming) -> tuple[int, list[Answer]] | None:
        verdict = vet(incoming.payload, channel.vm.macs)
        count = len(verdict.forward) or len(verdict.answers) or 1
        bucket = channel.bucket  # discovery may give the channel a new one meanwhile
        if not bucket.take(time.monotonic(), count):
            channel.stats.rate_limited += count
            records = count if fits(count, incoming.answer_limit) else 1  # else one says it for all
            return ring.Status.RATE_LIMITED, frame_wide(ring.Status.RATE_LIMITED, "rate-limited",
                                                        self._rate_text(bucket, count), records)
        if not fits(count, incoming.answer_limit):
            channel.stats.answered_locally += 1
            return ring.Status.REFUSED, [too_many(count, incoming.answer_limit)]
        if not verdict.forward:
            channel.stats.answered_locally += 1
            if verdict.status == ring.Status.REFUSED:
                channel.stats.refused += 1
                refused = next(a for a in verdict.answers if a.code == "foreign-mac")
                channel.faults("refused", logging.WARNING, "channel %s: refused command %d: %s", channel.vm.name,
                               incoming.seq, refused.message)
            return verdict.status, list(verdict.answers)
        vm = channel.vm
        key = (incoming.seq % KEY_SEQ_SPACE) * FRAME_KEY_SPACE
        requests = [{"dpid": f"{vm.dpid:016x}", "port": vm.port, "command": text, "channel": vm.key,
                     "epoch": incoming.epoch, "seq": key + k} for k, text in enumerate(verdict.forward)]
        return self._forward(channel, requests)

    def _bucket(self, vm: VmChannel) -> TokenBucket:
        """The VM's own rate limit (its annotations, docs/agent.md), else the agent's."""
        return TokenBucket(vm.rate or self.settings.rate, vm.burst or self.settings.burst)

    def _limit_text(self, vm: VmChannel) -> str:
        bucket = self._bucket(vm)
        return f"{bucket.rate:g} commands/s, burst {bucket.burst:g}"

    @staticmethod
    def _rate_text(bucket: TokenBucket, count: int) -> str:
        if count > bucket.burst:
            return (f"a frame of {count} commands is more than this VM's burst of {bucket.burst:g}; "
                    "split it into smaller frames; nothing was applied")
        return (f"more than {bucket.rate:g} commands/s from this VM; this frame of {count} command(s) "
                "was not applied, slow down")

    def _forward(self, channel: Channel, requests: list[dict]) -> tuple[int, list[Answer]] | None:
        """The controller's answer.  The first try goes through the switch's lane, with
        whatever other channels send meanwhile; asking again (a batch failed as a whole, a
        retry) goes alone, so a channel in trouble burdens no other's request.  Transient
        failures are retried until ``forward_deadline``, then answered UNAVAILABLE; None if
        stopped meanwhile.  A guest re-initialising meanwhile abandons the forward (the
        answer is then dropped)."""
        deadline = time.monotonic() + self.settings.forward_deadline
        backoff = Backoff(floor=0.05, ceiling=2.0, spins=0)
        lane = channel.lane
        while not channel.stop.is_set():
            if channel.reader.superseded():
                channel.stats.abandoned += 1
                return ring.Status.UNAVAILABLE, frame_wide(ring.Status.UNAVAILABLE, "abandoned",
                                                           "abandoned: the guest re-initialised the region",
                                                           len(requests))
            try:
                answers = lane.forward(requests) if lane else self.client.execute(requests)
            except Alone:
                lane = None
                continue
            except ControllerUnavailable as error:
                problem = str(error)
            except ControllerFailed as error:
                self._controller_back(channel)
                channel.stats.failed += 1
                channel.faults("failed", logging.WARNING, "channel %s: %s", channel.vm.name, error)
                return error.status, frame_wide(error.status, "controller-failed", f"{error}; not applied",
                                                len(requests))
            else:
                self._controller_back(channel)
                channel.stats.forwarded += len(requests)
                return combine(answers, [r["command"] for r in requests])
            lane = None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                channel.stats.unavailable += 1
                return ring.Status.UNAVAILABLE, frame_wide(ring.Status.UNAVAILABLE, "unavailable", (
                    f"controller or switch unavailable for {self.settings.forward_deadline:g} s ({problem}); "
                    "the command was NOT applied as far as the agent knows; sending it again is safe"),
                    len(requests))
            if not channel.waiting_for_controller:
                log.warning("channel %s: %s; commands wait", channel.vm.name, problem)
            channel.waiting_for_controller = True
            channel.stats.retries += 1
            channel.stop.wait(min(backoff.next_pause(), remaining))
        return None

    @staticmethod
    def _controller_back(channel: Channel) -> None:
        if channel.waiting_for_controller:
            log.info("channel %s: controller back", channel.vm.name)
        channel.waiting_for_controller = False

    def _publish(self, channel: Channel) -> None:
        """Copy what other threads may know of the channel out of its reader."""
        reader = channel.reader
        channel.idle_at = reader.idle_at()
        channel.snapshot = {
            "epoch": f"{reader.epoch:#010x}", "answered": reader.consume, "pending": reader.pending(),
            "problem": reader.problem, "waiting_for_controller": channel.waiting_for_controller,
            "corrupt": reader.stats.corrupt, **dataclasses.asdict(channel.stats)}

    # --- status -------------------------------------------------------------------------

    def status(self) -> dict:
        """Built from the workers' snapshots only; never touches a reader."""
        channels = []
        for channel in list(self.channels.values()):
            vm = channel.vm
            channels.append({
                "channel": vm.name, "vm_id": vm.vm_id, "interface": vm.interface, "region": vm.region,
                "dpid": f"{vm.dpid:016x}", "port": vm.port, "macs": list(vm.macs), **EMPTY_SNAPSHOT,
                **channel.snapshot, "doorbell": vm.doorbell or None,
                "woken_by": "doorbell" if channel.bell is not None else "polling",
                "doorbell_problem": channel.bell_problem})
        removals = [{"vm_id": r.vm.vm_id, "dpid": f"{r.vm.dpid:016x}", "mac": r.mac, "attempts": r.attempts}
                    for r in list(self.removals.values())]
        return {"pid": os.getpid(), "time": time.time(), "controller": self.client.url, "channels": channels,
                "pending_removals": removals,
                "inventories": [publisher.status() for _, publisher in sorted(list(self.publishers.items()))],
                "lanes": [{"dpid": f"{dpid:016x}", **lane.status()} for dpid, lane in sorted(list(self.lanes.items()))],
                "refused_interfaces": [{"bridge": r.bridge, "interface": r.interface, "reason": r.reason}
                                       for r in self.refused],
                "ovsdb": self.discovery_status() if self.discovery_status else None}

    def write_status(self) -> None:
        """The status file, when anything in it but the time changed, and at least every
        STATUS_REFRESH seconds (its ``time`` says the agent is alive): rewriting 64
        channels' status every round was most of an idle agent's work.  Compact JSON;
        ``mbvisor agent-status --json`` prints it indented."""
        path = self.settings.status_file
        if path is None:
            return
        status = self.status()
        now = time.monotonic()
        content = {key: value for key, value in status.items() if key != "time"}
        if content == self._written[0] and now - self._written[1] < STATUS_REFRESH:
            return
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(status, separators=(",", ":")) + "\n")
        temporary.replace(path)
        self._written = (content, now)
