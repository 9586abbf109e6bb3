"""The attacked QEMU middlebox: a real VM (TCG) on a netlab bridge run by the real controller,
the real host agent serving its ivshmem channel, and an attacker namespace on the same
bridge.  Used by ``tests/test_qemu_guest.py`` and ``bench/qemu_interrupts.py``.

    from mbvisor.topologies.netlab import Lab
    from mbvisor.topologies.qemu.scenario import GUEST_IP, attacked_middlebox

    with Lab() as lab, attacked_middlebox(lab, state_dir) as mb:
        start = mb.counters()              # guest virtio input interrupts, guest eth0 rx, switch drops
        mb.attacker.send_udp(GUEST_IP, 9, count=100)
        ...
        mb.offload()                       # the guest's own mbctl: register + filter the attacker
        mb.withdraw()                      # mbctl filter del: the attack reaches the guest again
    # VM, tap, region, agent and controller are gone here (the lab removes bridge and namespace)

Both sides have static neighbour entries (the guest through ``mbv.arp=``, the attacker through
``set_arp``), the tap has IPv6 off and the guest ``ipv6.disable=1``: the guest's counters move
only for the attack.  See docs/qemu.md.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

from mbvisor.controller.flows import cookie_of

from ..agent_run import AgentProcess
from ..controller_run import Controller
from ..netlab import Bridge, Host, Lab, wait_until
from .vm import MiddleboxVM, VMError, build_image, requirements

GUEST_IP, GUEST_MAC = "10.0.0.5", "52:54:00:4d:42:05"
ATTACKER_IP = "10.0.0.66"
PACKAGES = "qemu-system-x86 linux-image-cloud-amd64 busybox-static iptables"


class RequirementsMissing(VMError):
    """This machine lacks what a QEMU middlebox needs (the message names the packages)."""


class Counters(NamedTuple):
    """What the attack moves: the guest's virtio-net input interrupts (summed over CPUs), its
    eth0 rx_packets, and the packets of the bridge's drop flows.  ``b - a`` is the change."""
    interrupts: int
    guest_rx: int
    switch_drops: int

    def __sub__(self, other: "Counters") -> "Counters":          # type: ignore[override]
        return Counters(*(a - b for a, b in zip(self, other)))


def interrupts_and_rx(vm: MiddleboxVM) -> tuple[int, int]:
    """(virtio-net input interrupts summed over CPUs, eth0 rx_packets) inside the guest."""
    code, out = vm.run("cat /proc/interrupts; echo RX=$(cat /sys/class/net/eth0/statistics/rx_packets)")
    if code != 0:
        raise VMError(f"reading the guest's counters failed ({code}):\n{out}")
    total, seen = 0, False
    for line in out.splitlines():
        fields = line.split()
        if fields and re.fullmatch(r"virtio\d+-input\.\d+", fields[-1]):
            total += sum(int(f) for f in fields[1:] if f.isdigit())
            seen = True
    rx = re.search(r"RX=(\d+)", out)
    if not seen or rx is None:
        raise VMError(f"no virtio input interrupt line or eth0 counter in the guest's answer:\n{out}")
    return total, int(rx.group(1))


def mbctl(vm: MiddleboxVM, arguments: str) -> tuple[int, dict]:
    """The real mbctl inside the guest, on the real ivshmem device (no --shm)."""
    code, out = vm.run(f"python3 -m mbvisor.guest.mbctl --json --timeout 20 {arguments}", timeout=90)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return code, json.loads(lines[-1]) if lines else {"output": out}


def drops(bridge: Bridge) -> int:
    """Packets counted by the bridge's drop flows."""
    return sum(f.n_packets for f in bridge.flows() if f.actions == "drop")


@dataclass
class Scenario:
    vm: MiddleboxVM
    bridge: Bridge
    attacker: Host
    controller: Controller
    agent: AgentProcess
    image: dict
    build_seconds: float
    registered: bool = False

    def counters(self) -> Counters:
        return Counters(*interrupts_and_rx(self.vm), drops(self.bridge))

    def guest(self, *commands: str) -> str:
        """Run each command in the guest; VMError with its output unless it exits 0."""
        output = []
        for command in commands:
            code, out = self.vm.run(command, timeout=60)
            if code != 0:
                raise VMError(f"{command!r} in the guest exited {code}:\n{out}")
            output.append(out)
        return "\n".join(output)

    def tap_to_guest(self) -> int:
        """Packets the host handed to the guest: its tap's tx counter."""
        return int(Path(f"/sys/class/net/{self.vm.tap}/statistics/tx_packets").read_text())

    def mbctl_ok(self, arguments: str) -> dict:
        """Run mbctl in the guest; its answer, or VMError unless the host applied it."""
        code, answer = mbctl(self.vm, arguments)
        if code != 0 or answer.get("status") != "OK":
            raise VMError(f"mbctl {arguments} in the guest: exit {code}, answer {answer}")
        return answer

    def filter_flows(self) -> list[str]:
        """The bridge's drop flows for the attacker's source address with the guest's cookie
        (port security drops that address arriving from other ports, with the base cookie)."""
        cookie = f"cookie={cookie_of(GUEST_MAC):#x},"
        return [line for line in self.bridge.dump_flows()
                if cookie in line and f"nw_src={ATTACKER_IP}" in line and "actions=drop" in line]

    def offload(self) -> None:
        """The guest registers as a firewall (once) and filters the attacker's address with its
        own mbctl; VMError unless the host applied both and the drop flow is on the bridge."""
        if not self.registered:
            self.mbctl_ok(f"register firewall --ip {GUEST_IP}")
            self.registered = True
        self.mbctl_ok(f"filter add --layer ip --src {ATTACKER_IP}")
        if not self.filter_flows():
            raise VMError(f"no drop flow for {ATTACKER_IP} on {self.bridge.name} after mbctl filter add:\n"
                          + "\n".join(self.bridge.dump_flows()))

    def withdraw(self, timeout: float = 10.0) -> None:
        """``mbctl filter del`` of that filter; waits until its drop flow is gone."""
        self.mbctl_ok(f"filter del --layer ip --src {ATTACKER_IP}")
        wait_until(lambda: not self.filter_flows(), timeout=timeout, interval=0.1,
                   what=f"the drop flow for {ATTACKER_IP} to leave {self.bridge.name}")


@contextlib.contextmanager
def attacked_middlebox(lab: Lab, state_dir: Path, doorbell: bool = False) -> Iterator[Scenario]:
    """Build (or reuse) the guest image, start controller, bridge, attacker, agent and VM,
    and remove VM, agent and controller on exit, also on failure.  ``doorbell``: the VM
    has an ivshmem-doorbell device, and the agent looks at its channel only when it rings
    (its sweep is longer than the scenario: a command the ring did not announce would time
    out).  Raises
    :class:`RequirementsMissing` (with the apt hint) when the machine lacks something, and
    VMError on exit if the VM left anything behind."""
    missing = requirements()
    if missing:
        raise RequirementsMissing("the QEMU middlebox needs: " + "; ".join(missing) + f" (apt-get install {PACKAGES})")
    state_dir = Path(state_dir)
    started = time.monotonic()
    image = build_image()
    built = time.monotonic() - started
    controller = Controller(state_dir).start()
    agent = vm = None
    try:
        bridge = lab.bridge(controller=controller.target, fail_mode="secure")
        attacker = lab.host("attacker", ip=f"{ATTACKER_IP}/24")
        attacker.annotate("attacker", vm_id="vm-attacker")  # a VM of another tenant (the guest's is its name)
        controller.wait_switch(bridge.dpid)
        sockets = state_dir / "ivshmem"
        agent = AgentProcess(controller, state_dir, bridges=(bridge.name,),
                             options=("--doorbell-dir", str(sockets), "--bell-sweep", "3600") if doorbell else ()
                             ).start()
        name = f"{lab.prefix}-mb"                 # vm-id, and the region /dev/shm/<name>
        vm = MiddleboxVM(bridge.name, name, GUEST_MAC, image, state_dir / "vm", tap=f"{lab.prefix}t",
                         append=f"mbv.ip={GUEST_IP}/24 mbv.arp={ATTACKER_IP},{attacker.mac}",
                         doorbell_dir=sockets if doorbell else None).start()
        vm.wait_ready(timeout=90)
        agent.wait_serving(f"{name}/{vm.tap}")
        attacker.set_arp(GUEST_IP, GUEST_MAC)     # no ARP traffic in the counts
        yield Scenario(vm, bridge, attacker, controller, agent, image, built)
    finally:
        leftovers = []
        if vm is not None:
            vm.stop()
            leftovers = vm.leftovers()
        if agent is not None:
            agent.stop()
        controller.stop()
        if leftovers:
            raise VMError(f"the VM left {leftovers} behind")
