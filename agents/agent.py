"""The host agent: serves every middlebox VM's channel on this hypervisor.

One poller thread looks at every channel's two counters (microseconds each) with an
adaptive back-off and wakes the channel's worker when a command is published.  Each
channel has its own worker, so a channel waiting on the controller, flooding or sending
garbage never holds another one up.  A worker takes its channel's commands in order, one
frame at a time: vets it (grammar, the VM's own MAC, rate limit), forwards it with its
idempotency key, and writes the answer only when the controller confirmed or refused it.
While the controller is unreachable the command stays pending (the guest sees no answer
yet) and is retried; a restarted agent resumes from the consume counter in the region,
and the idempotency key makes a command forwarded twice take effect once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mbvisor.guest import ring
from mbvisor.guest.backoff import Backoff
from mbvisor.guest.channel_errors import ChannelError
from mbvisor.guest.reader import ChannelReader, Incoming
from mbvisor.guest.region import open_file, open_shm

from .controller_client import ControllerClient, ControllerUnavailable
from .discovery import VmChannel
from .ratelimit import TokenBucket
from .vetting import combine, vet

log = logging.getLogger("mbvisor.agent")
FRAME_KEY_SPACE = 1024  # idempotency seq of a frame's k-th command: seq * 1024 + k


@dataclass(frozen=True)
class AgentSettings:
    rate: float = 200.0          # commands per second per channel, sustained
    burst: float = 400.0
    discovery_interval: float = 2.0
    idle_ceiling: float = 10e-3  # longest pause of the poller when every channel is idle
    status_file: Path | None = None


@dataclass
class ChannelStats:
    forwarded: int = 0
    answered_locally: int = 0
    refused: int = 0
    rate_limited: int = 0
    retries: int = 0
    last_seq: int | None = None
    last_status: str | None = None


@dataclass
class Channel:
    vm: VmChannel
    reader: ChannelReader
    bucket: TokenBucket
    wake: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    stats: ChannelStats = field(default_factory=ChannelStats)
    waiting_for_controller: bool = False
    working: bool = False  # the worker drains the ring by itself; the poller need not wake it
    thread: threading.Thread | None = None


def open_channel_region(path: str):
    """QEMU's region: a /dev/shm name goes through POSIX shm, anything else is a file."""
    if path.startswith("/dev/shm/") and path.count("/") == 3:
        return open_shm(path)
    return open_file(path)


class Agent:
    def __init__(self, discover: Callable[[], list[VmChannel]], client: ControllerClient,
                 settings: AgentSettings = AgentSettings()):
        self.discover = discover
        self.client = client
        self.settings = settings
        self.channels: dict[str, Channel] = {}
        self.stop = threading.Event()

    # --- life cycle ---------------------------------------------------------------------

    def run(self) -> None:
        """Until ``stop`` is set: poll every channel, wake the workers of those with work.
        Discovery runs in its own thread, so scanning OVS never delays a command."""
        self.refresh()
        discovery = threading.Thread(target=self._discover, name="discovery", daemon=True)
        discovery.start()
        backoff = Backoff(ceiling=self.settings.idle_ceiling)
        while not self.stop.is_set():
            busy = False
            for channel in list(self.channels.values()):
                try:
                    if not channel.working and channel.reader.has_work():
                        channel.wake.set()
                        busy = True
                except ValueError:
                    continue  # closed by discovery meanwhile
            if busy:
                backoff.reset()
            backoff.wait()
        discovery.join(timeout=10)
        self.shutdown()

    def _discover(self) -> None:
        while not self.stop.wait(self.settings.discovery_interval):
            self.refresh()

    def shutdown(self) -> None:
        for name in list(self.channels):
            self._close(name)
        log.info("agent stopped")

    def refresh(self) -> None:
        """Follow VMs as they come and go."""
        try:
            found = {vm.name: vm for vm in self.discover()}
        except Exception as error:  # ovsdb briefly unreachable: keep serving what we have
            log.warning("discovery failed: %s", error)
            return
        for name, channel in list(self.channels.items()):
            if name not in found or found[name] != channel.vm:
                self._close(name)
                self._forget(channel.vm, found.get(name))
        for name, vm in found.items():
            if name not in self.channels:
                self._open(vm)
        self.write_status()

    def _open(self, vm: VmChannel) -> None:
        try:
            region = open_channel_region(vm.region)
        except ChannelError as error:
            log.warning("channel %s (%s): %s", vm.name, vm.region, error)
            return
        channel = Channel(vm, ChannelReader(region, vm.name), TokenBucket(self.settings.rate, self.settings.burst))
        channel.thread = threading.Thread(target=self._work, args=(channel,), name=f"channel {vm.name}", daemon=True)
        self.channels[vm.name] = channel
        channel.thread.start()
        log.info("channel %s: serving %s for %s on %016x port %d", vm.name, vm.region, ",".join(vm.macs),
                 vm.dpid, vm.port)

    def _close(self, name: str) -> None:
        channel = self.channels.pop(name)
        channel.stop.set()
        channel.wake.set()
        channel.thread.join(timeout=5)
        channel.reader.region.close()
        log.info("channel %s: closed", name)

    def _forget(self, gone: VmChannel, replacement: VmChannel | None) -> None:
        """A VM left its port (or changed identity): its offloads go, so a reused port or
        MAC never inherits its drop rules."""
        keep = set(replacement.macs) if replacement and replacement.port == gone.port else set()
        for mac in gone.macs:
            if mac in keep:
                continue
            try:
                removed = self.client.delete_middlebox(gone.dpid, mac)
                log.info("VM %s gone from %016x port %d: offloads of %s %s", gone.vm_id, gone.dpid, gone.port,
                         mac, "removed" if removed else "(none)")
            except (ControllerUnavailable, PermissionError) as error:
                log.warning("VM %s gone, but its offloads of %s could not be removed: %s", gone.vm_id, mac, error)

    # --- one channel --------------------------------------------------------------------

    def _work(self, channel: Channel) -> None:
        while not channel.stop.is_set():
            channel.wake.wait()  # set by the poller, or by _close to stop
            channel.wake.clear()
            channel.working = True
            try:
                if self._drain(channel) is None:
                    return  # stopping while the controller is away: the command stays pending
            finally:
                channel.working = False

    def _drain(self, channel: Channel) -> bool | None:
        """Answer every pending command in order; None if stopped before an answer."""
        while not channel.stop.is_set() and (incoming := channel.reader.poll()) is not None:
            try:
                answer = self._handle(channel, incoming)
            except Exception as error:  # a bug costs this command, not the channel
                log.exception("channel %s: command %d failed", channel.vm.name, incoming.seq)
                answer = (ring.Status.INTERNAL, f"internal error in the agent: {error}")
            if answer is None:
                return None
            status, text = answer
            channel.reader.answer(incoming.seq, status, text)
            channel.stats.last_seq, channel.stats.last_status = incoming.seq, ring.Status(status).name
        return True

    def _handle(self, channel: Channel, incoming: Incoming) -> tuple[int, str] | None:
        if not channel.bucket.take(time.monotonic()):
            channel.stats.rate_limited += 1
            return ring.Status.RATE_LIMITED, (f"more than {self.settings.rate:g} commands/s from this VM; "
                                              "this one was not applied, slow down")
        verdict = vet(incoming.payload, channel.vm.macs)
        if not verdict.forward:
            channel.stats.answered_locally += 1
            if verdict.status == ring.Status.REFUSED:
                channel.stats.refused += 1
                log.warning("channel %s: refused command %d: %s", channel.vm.name, incoming.seq,
                            verdict.text.splitlines()[0])
            return verdict.status, verdict.text
        vm = channel.vm
        requests = [{"dpid": f"{vm.dpid:016x}", "port": vm.port, "command": text, "channel": vm.name,
                     "epoch": incoming.epoch, "seq": incoming.seq * FRAME_KEY_SPACE + k}
                    for k, text in enumerate(verdict.forward)]
        answers = self._forward(channel, requests)
        if answers is None:
            return None
        channel.stats.forwarded += len(requests)
        return combine(answers)

    def _forward(self, channel: Channel, requests: list[dict]) -> list[dict] | None:
        """The controller's answers; waits (retrying) while it is unreachable."""
        backoff = Backoff(floor=0.05, ceiling=2.0, spins=0)
        while not channel.stop.is_set():
            try:
                answers = self.client.execute(requests)
                if channel.waiting_for_controller:
                    log.info("channel %s: controller back", channel.vm.name)
                channel.waiting_for_controller = False
                return answers
            except ControllerUnavailable as error:
                if not channel.waiting_for_controller:
                    log.warning("channel %s: %s; commands wait", channel.vm.name, error)
                channel.waiting_for_controller = True
                channel.stats.retries += 1
                channel.stop.wait(backoff.next_pause())
        return None

    # --- status -------------------------------------------------------------------------

    def status(self) -> dict:
        channels = []
        for channel in self.channels.values():
            vm, reader = channel.vm, channel.reader
            channels.append({
                "channel": vm.name, "vm_id": vm.vm_id, "interface": vm.interface, "region": vm.region,
                "dpid": f"{vm.dpid:016x}", "port": vm.port, "macs": list(vm.macs),
                "epoch": f"{reader.epoch:#010x}", "answered": reader.consume, "pending": reader.pending(),
                "problem": reader.problem, "waiting_for_controller": channel.waiting_for_controller,
                "corrupt": reader.stats.corrupt, **channel.stats.__dict__})
        return {"pid": os.getpid(), "time": time.time(), "controller": self.client.url, "channels": channels}

    def write_status(self) -> None:
        path = self.settings.status_file
        if path is None:
            return
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.status(), indent=1) + "\n")
        temporary.replace(path)
